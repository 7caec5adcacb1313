"""lint-trt's pre-flight table: passes on graphs with the optimize --target trt contract, fails naming the node
otherwise. The real parser's verdict, and its agreement with this table, is test_lint_agreement.py."""

import onnx
import pytest
import trt_graphs as graphs
from onnx import TensorProto, helper

from dllm_trt.cli import main
from dllm_trt.engines.lint import lint_artifacts, lint_graph
from dllm_trt.errors import DllmError
from dllm_trt.trt.support import VERSIONS, load_support


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    return graphs.write_optimized(tmp_path_factory.mktemp("lint") / "opt")


def _lint(model, graph="step", version="11.x"):
    _, findings = lint_graph(model, graph, load_support(version), graphs.FACTS)
    return findings


def _errors(findings):
    return [f for f in findings if f.severity == "error"]


def test_the_contract_graphs_pass_for_10_15_and_11(optimized):
    for version in ("10.15", "11.x"):
        report = lint_artifacts(optimized, version, "h100")
        assert report.passed, report.table()
        # the full layers' head dim 512 has no fused kernel: said, with what the build does about it
        assert {f.op for f in report.warnings} == {"Attention"}
        assert all("head size 512" in f.message and "decomposed" in f.message for f in report.warnings)
        assert report.ops[("step", "dllm_trt::DllmMoE")].count == 2


def test_cli_prints_the_table_and_exits_0(optimized, capsys):
    assert main(["lint-trt", str(optimized), "--table-only"]) == 0
    out = capsys.readouterr().out
    assert "RMSNormalization" in out and "lint-trt passed" in out and "operators.md" in out


def test_10_14_has_no_rmsnormalization_and_the_cli_exits_1_naming_the_node(optimized, capsys):
    assert main(["lint-trt", str(optimized), "--trt-version", "10.14", "--table-only"]) == 1
    out = capsys.readouterr().out
    assert "error: step: RMSNormalization 'RMSNormalization_" in out and "10.15" in out


def _replace(model, node_name, new_node):
    nodes = [new_node if n.name == node_name else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _first(model, op_type):
    return next(n for n in model.graph.node if n.op_type == op_type)


def test_an_unsupported_op_is_named():
    model = graphs.step()
    neg = _first(model, "Neg")
    model = _replace(model, neg.name, helper.make_node("Unique", neg.input, neg.output, name="bad_op"))
    errors = _errors(_lint(model))
    assert [(e.node, e.op) for e in errors] == [("bad_op", "Unique")]
    assert "lists it as unsupported" in errors[0].message


def test_an_unsupported_dtype_is_named():
    model = graphs.step()
    mm = helper.make_node("MatMul", ["ids_a", "ids_b"], ["ids_c"], name="int_matmul")
    model.graph.node.append(mm)
    model.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.INT32, [2, 2]) for n in ("ids_a", "ids_b")])
    model.graph.output.append(helper.make_tensor_value_info("ids_c", TensorProto.INT32, [2, 2]))
    errors = _errors(_lint(model))
    assert errors and all(e.node == "int_matmul" for e in errors)
    assert "is INT32; TensorRT 11.x supports MatMul on FP32, FP16, BF16" in errors[0].message


def test_an_unsupported_attribute_and_past_inputs_on_attention_are_named():
    model = graphs.step()
    attn = _first(model, "Attention")
    bad = helper.make_node(
        "Attention", list(attn.input) + ["", ""], attn.output, name="capped", scale=1.0, softcap=30.0
    )
    errors = _errors(_lint(_replace(model, attn.name, bad)))
    assert [(e.node, "softcap" in e.message) for e in errors] == [("capped", True)]


def test_softmax_precision_which_the_parser_rejects_fails():
    model = graphs.step()
    attention = _first(model, "Attention")
    attention.attribute.append(helper.make_attribute("softmax_precision", 1))
    errors = _errors(_lint(model))
    assert [e.node for e in errors] == [attention.name]
    assert "Setting softmax precision is not supported" in errors[0].message


def test_custom_ops_must_be_registered_plugins():
    model = graphs.step()
    model.graph.node.append(helper.make_node("FancyMoE", ["canvas_ids"], ["fancy"], name="fancy", domain="acme"))
    moe = _first(model, "DllmMoE")
    moe.attribute[[a.name for a in moe.attribute].index("plugin_namespace")].s = b"other"
    errors = _errors(_lint(model))
    messages = {e.node: e.message for e in errors}
    assert "neither parsed by TensorRT" in messages["fancy"]
    assert "plugin_namespace='other'" in messages[moe.name]


def test_a_dynamic_canvas_and_vocab_are_refused():
    model = graphs.step()
    noise = next(v for v in model.graph.input if v.name == "sampling_noise")
    noise.type.tensor_type.shape.dim[2].dim_param = "vocab"
    errors = _errors(_lint(model))
    assert {(e.node, e.op) for e in errors} == {("sampling_noise", "interface")}
    assert "axis 2 is dynamic ('vocab'); TensorRT needs it static (64 for this model)" in errors[0].message


def test_an_opset_beyond_the_version_is_refused():
    errors = _errors(_lint(graphs.step(opset=25), version="10.15"))
    assert errors and errors[0].op == "opset" and "9..24" in errors[0].message


def test_manifest_and_profiles_are_checked(tmp_path):
    opt = graphs.write_optimized(tmp_path / "opt")
    manifest_path = opt / "manifest.json"
    text = manifest_path.read_text().replace('"sampled_ids"', '"sampled"', 1)
    manifest_path.write_text(text)
    report = lint_artifacts(opt, "11.x", "h100", profile_overrides=["cache_sliding=0:4:100"])
    lines = [f.line() for f in report.errors]
    assert any("'sampled'" in line and "not in the graph" in line for line in lines)
    assert any("sliding_window - 1 = 7" in line for line in lines)


def test_not_an_optimize_output_for_trt_is_refused(tmp_path):
    opt = graphs.write_optimized(tmp_path / "opt", target="ort-cpu")
    with pytest.raises(DllmError, match="'optimize' output for target 'ort-cpu'.*--target trt"):
        lint_artifacts(opt, None, "h100")
    assert main(["lint-trt", str(opt)]) == 2


def test_the_support_table_names_its_sources():
    for version in VERSIONS:
        support = load_support(version)
        assert support.status("Attention") == "supported"
        assert any("operators.md" in s or "release" in s for s in support.sources.values())
    assert load_support("10.14").status("RotaryEmbedding") == "unsupported"
    assert load_support("11.x").status("Swish") == "supported"
    with pytest.raises(DllmError, match="unknown TensorRT version '9.0'"):
        load_support("9.0")


def test_graph_fixture_is_valid_onnx():
    for model in (graphs.step(), graphs.step(opset=25)):
        onnx.checker.check_model(model)
