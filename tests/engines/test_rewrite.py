"""The graph rewrites build applies before parsing: MoE lowering (structure and numerics) and attention fallback."""

import pytest
import torch
import trt_graphs as graphs
from onnx import TensorProto, helper

from dllm_trt.engines import moe_chain_plugin as chain
from dllm_trt.engines.lint import lint_graph
from dllm_trt.engines.rewrite import decompose_wide_attention, lower_moe, prepare_for_parser
from dllm_trt.engines.support import load_support
from dllm_trt.kernels.moe_triton import moe_reference, triton_available


def _ops(model):
    return [n.op_type for n in model.graph.node]


def test_lower_moe_replaces_every_dllm_moe_with_the_plugin_chain():
    model = graphs.denoiser()
    moe_outputs = [n.output[0] for n in model.graph.node if n.op_type == "DllmMoE"]
    assert lower_moe(model) == 2
    ops = _ops(model)
    assert "DllmMoE" not in ops
    for op in (*chain.CHAIN_OPS, "ReduceSum"):
        assert ops.count(op) >= 2
    casts = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    for out in moe_outputs:  # the original output names survive: consumers are untouched
        assert helper.get_attribute_value(casts[out].attribute[0]) == TensorProto.BFLOAT16
    up = next(n for n in model.graph.node if n.op_type == chain.EXPERT_UP)
    attrs = {a.name: helper.get_attribute_value(a) for a in up.attribute}
    assert attrs == {"plugin_namespace": b"dllm_trt", "plugin_version": b"1", "top_k": 2}
    bucket = next(n for n in model.graph.node if n.op_type == chain.BUCKET)
    assert {a.name: helper.get_attribute_value(a) for a in bucket.attribute}["num_experts"] == 4
    _, findings = lint_graph(model, "denoiser", load_support("11.x"), graphs.FACTS)
    assert not [f for f in findings if f.severity == "error"]  # the lowered graph is itself TensorRT-ready


def test_prepare_for_parser_counts():
    support = load_support("11.x")
    model = graphs.encoder()
    assert prepare_for_parser(model, support) == {"lower_moe": 2, "decompose_wide_attention": 1}
    assert "DllmMoE" not in _ops(model)


def test_only_the_wide_attention_becomes_decomposable_and_an_explicit_zero_is_respected():
    support = load_support("11.x")
    model = graphs.denoiser()
    assert decompose_wide_attention(model, support) == 1
    flags = [[a.name for a in n.attribute if a.name == "TRT_decomposable"] for n in model.graph.node
             if n.op_type == "Attention"]  # fmt: skip
    assert flags == [[], ["TRT_decomposable"]]  # head 16 fused, head 512 not
    forbidden = graphs.denoiser()
    wide = [n for n in forbidden.graph.node if n.op_type == "Attention"][1]
    wide.attribute.append(helper.make_attribute("TRT_decomposable", 0))
    assert decompose_wide_attention(forbidden, support) == 0


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install 'dllm-trt[triton]')")
@pytest.mark.parametrize(
    "dtype, bm, tol", [(torch.float32, 16, 2e-5), (torch.float32, 64, 2e-5), (torch.bfloat16, 16, 3e-2)]
)
def test_the_lowered_chain_computes_dllm_moe(dtype, bm, tol):
    """Route -> Bucket -> Up -> Down -> ReduceSum -> Cast with the plugins' own specs and grids (CPU interpreter)."""
    gen = torch.Generator().manual_seed(0)
    n, h, e, i, k = 37, 96, 16, 48, 4  # 37 tokens: partial tiles in every kernel
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    logits = torch.randn(n, e, generator=gen)
    logits[3] = 0.0  # an exact tie across the top-k boundary: lowest index wins, as in fused_moe
    scale = torch.rand(e, generator=gen) + 0.5
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, generator=gen) / i**0.5).to(dtype)
    out = chain.lowered_moe(hidden, logits, scale, gate_up, down, k, bm)
    ref = moe_reference(hidden, logits, scale, gate_up, down, k)
    assert out.dtype == dtype
    rows = [r for r in range(n) if r != 3]  # torch.topk's tie order is unspecified (kernels.moe_triton)
    torch.testing.assert_close(out[rows].float(), ref[rows].float(), atol=tol, rtol=tol)
