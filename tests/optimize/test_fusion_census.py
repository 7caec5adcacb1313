"""Every fusion counted against the model's own census: a layer a rule misses is named with the rule's reason,
and on the GPU targets an unfused attention or MoE layer fails optimize unless --allow-unfused."""

import json

import onnx_ir as ir
import pytest
from unfusable import unfusable_copy

from dllm_trt.cli import main
from dllm_trt.contract import OUTSIDE_LAYERS
from dllm_trt.optimize.fusion_census import node_layers


def test_the_census_counts_what_the_model_runs(tiny_export):
    """The tiny model: 11 RMSNorms a layer plus 3 outside (final norm, self-conditioning pre/post), RoPE on Q and
    K, one attention and one MoE a layer, one sampling head; read off transformers' modules at export."""
    model = json.loads((tiny_export / "manifest.json").read_text())["model"]
    layers = len(model["layers"])
    census = model["fusible_ops"]
    assert census["rms_norm"] == {**{str(i): 11 for i in range(layers)}, OUTSIDE_LAYERS: 3}
    assert census["rotary_embedding"] == {str(i): 2 for i in range(layers)}
    assert census["attention"] == census["moe"] == {str(i): 1 for i in range(layers)}
    assert census["sampling_head"] == {OUTSIDE_LAYERS: 1}


def test_every_node_is_placed_in_its_layer(tiny_export):
    """Each layer's nodes sit between its first weight and the next layer's: the norms with weights say so."""
    model = ir.load(str(tiny_export / "step.onnx"))
    layers = node_layers(model.graph)
    for node, layer in layers.items():
        for value in node.inputs:
            name = (value.name or "") if value is not None and value.is_initializer() else ""
            if name.startswith("model.decoder.layers."):
                assert layer == name.split(".")[3], (node.name, name, layer)
            elif name in ("model.decoder.norm.weight", "model.decoder.self_conditioning.pre_norm.weight"):
                assert layer == OUTSIDE_LAYERS, (node.name, name)
    assert {str(i) for i in range(2)} | {OUTSIDE_LAYERS} == set(layers.values())


def test_unfused_layers_fail_the_gpu_target_naming_each_with_the_rules_reason(tiny_export, tmp_path, capsys):
    edited = unfusable_copy(tiny_export, tmp_path / "odd", attention_layer=1, moe_layer=0)
    out = tmp_path / "trt"
    code = main(["optimize", str(edited), "--target", "trt", "-o", str(out)])
    err = capsys.readouterr().err
    print(err)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("dllm-trt: error:")]
    assert len(lines) == 1, err
    assert "attention layer 1: 0 of 1 fused" in lines[0] and "moe layer 0: 0 of 1 fused" in lines[0]
    assert "attention layer 0" not in lines[0] and "moe layer 1" not in lines[0]
    assert "--allow-unfused" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".trt.tmp-*"))  # nothing half-written


def test_allow_unfused_writes_the_graphs_and_the_report_lists_the_misses(tiny_export, tmp_path, capsys):
    edited = unfusable_copy(tiny_export, tmp_path / "odd", attention_layer=1, moe_layer=0)
    out = tmp_path / "trt"
    # --parity final: the unfused layers compute the model, which the final parity check proves
    code = main(["optimize", str(edited), "--target", "trt", "-o", str(out), "--allow-unfused", "--parity", "final"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "left unfused: attention layer 1" in err and "left unfused: moe layer 0" in err
    fusions = json.loads((out / "manifest.json").read_text())["fusions"]
    assert (fusions["attention"]["fused"], fusions["moe"]["fused"]) == (1, 1)
    [attention_miss], [moe_miss] = fusions["attention"]["misses"], fusions["moe"]["misses"]
    assert attention_miss["layer"] == "1" and attention_miss["reason"]
    assert moe_miss["layer"] == "0" and moe_miss["reason"]
    report = (out / "fusion_report.md").read_text()
    assert "## Fusions against the model" in report and "| attention | 2 | 1 | layer 1: 0 of 1:" in report
    print(report)


@pytest.mark.parametrize("target", ["ort-cpu"])
def test_a_cpu_target_writes_unfused_layers_and_says_so(tiny_export, tmp_path, capsys, target):
    edited = unfusable_copy(tiny_export, tmp_path / "odd", attention_layer=0, moe_layer=1)
    # --parity none: this test is about what is written and said; the test above proves the unfused parity
    code = main(["optimize", str(edited), "--target", target, "-o", str(tmp_path / "o"), "--parity", "none"])
    assert code == 0
    assert "left unfused: attention layer 0" in capsys.readouterr().err
