"""fp8 and nvfp4: the quantization arithmetic (kernels.quantization) and the optimize pass that stores
quantized experts and projections (optimize.quantize), read back from the written graph."""

import ml_dtypes
import numpy as np
import onnx
import onnx.numpy_helper as nh
import pytest

from dllm_trt import optimize
from dllm_trt.contract import MOE_INPUTS
from dllm_trt.errors import DllmError
from dllm_trt.kernels.quantization import (
    dequantize_experts,
    dequantize_fp8,
    dequantize_nvfp4,
    pack_fp4,
    quantize_fp8,
    quantize_nvfp4,
    unpack_fp4,
)
from dllm_trt.optimize.stage import _check_quantizable

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def test_nvfp4_follows_the_recipe_on_a_hand_made_expert():
    w = np.zeros((1, 1, 32), np.float32)
    w[0, 0, :4] = [12.0, -6.0, 1.0, 0.1]  # block 0: amax 12 (the expert's amax)
    w[0, 0, 16:18] = [3.0, -1.4]  # block 1: amax 3
    q, block, glob = quantize_nvfp4(w)
    assert glob.shape == (1,) and glob[0] == np.float32(12.0 / 2688.0)  # amax / (448 * 6)
    # block scales: 12/6/g = 448 and 3/6/g = 112, both e4m3 exactly
    np.testing.assert_array_equal(block.astype(np.float32), [[[448.0, 112.0]]])
    values = q.astype(np.float32)[0, 0]
    # block 0 step is 448 * g = 2: 12 -> 6, -6 -> -3, 1 -> 0.5, 0.1 -> 0 (0.05 rounds to 0)
    np.testing.assert_array_equal(values[:4], [6.0, -3.0, 0.5, 0.0])
    # block 1 step 112 * g = 0.5: 3 -> 6, -1.4 -> -2.8 -> -3 (nearest e2m1)
    np.testing.assert_array_equal(values[16:18], [6.0, -3.0])
    np.testing.assert_allclose(dequantize_nvfp4(q, block, glob)[0, 0, [0, 1, 16, 17]], [12, -6, 3, -1.5], rtol=1e-6)


def test_fp8_and_nvfp4_errors_stay_within_their_grids():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 24, 64)) * rng.uniform(0.01, 3.0, (4, 24, 1))).astype(np.float32)
    q8, s8 = quantize_fp8(w)
    assert q8.dtype == ml_dtypes.float8_e4m3fn and s8.shape == (4, 24)
    np.testing.assert_allclose(np.abs(q8.astype(np.float32)).max(-1), 448.0)  # each channel uses the full range
    err8 = np.abs(dequantize_fp8(q8, s8) - w)
    # e4m3: 3 mantissa bits, half a step is 2^-4 relative; below 2^-6 the subnormal step is 2^-9 * scale
    assert np.all(err8 <= np.maximum(np.abs(w) * 2.0**-4, s8[..., None] * 2.0**-10) * 1.0001)
    q4, b4, g4 = quantize_nvfp4(w)
    assert q4.dtype == ml_dtypes.float4_e2m1fn and b4.shape == (4, 24, 4) and g4.shape == (4,)
    assert set(np.unique(np.abs(q4.astype(np.float32)))) <= set(E2M1.tolist())
    deq = dequantize_nvfp4(q4, b4, g4)
    block_amax = np.abs(w.reshape(4, 24, 4, 16)).max(-1, keepdims=True)
    # the largest e2m1 step is 2 (4 -> 6) at a block scale of about amax/6, plus e4m3's rounding of that scale
    assert np.all(np.abs(deq - w).reshape(4, 24, 4, 16) <= block_amax / 6 * 1.0 * 1.07 + 1e-7)
    rel = np.abs(deq - w).max() / np.abs(w).max()
    assert 0.01 < rel < 0.2, rel  # coarser than fp8, and not lossless
    np.testing.assert_array_equal(unpack_fp4(pack_fp4(q4)).view(np.uint8), q4.view(np.uint8))
    assert pack_fp4(np.array([0.5, -1.5], ml_dtypes.float4_e2m1fn))[0] == 0xB1  # ONNX order: even element low


def test_zero_weights_quantize_to_zeros_without_nan():
    zeros = np.zeros((2, 3, 32), np.float32)
    for deq in (dequantize_fp8(*quantize_fp8(zeros)), dequantize_nvfp4(*quantize_nvfp4(zeros))):
        assert np.all(deq == 0)


@pytest.fixture(scope="module")
def quantized(tiny_trt):
    return tiny_trt


def _graph(path):
    model = onnx.load(str(path / "step.onnx"))
    return model, {i.name: i for i in model.graph.initializer}, {o: n for n in model.graph.node for o in n.output}


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_the_pass_stores_quantized_experts_in_the_contracts_inputs(quantized, tiny_export, precision):
    model, inits, _ = _graph(quantized[precision])
    source = {i.name: nh.to_array(i) for i in onnx.load(str(tiny_export / "step.onnx")).graph.initializer}
    moe = [n for n in model.graph.node if n.op_type == "DllmMoE"]
    assert len(moe) == 2
    for node in moe:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["weight_format"] == precision.encode() and len(node.input) == len(MOE_INPUTS[precision])
        weights = [nh.to_array(inits[name]) for name in node.input[3:]]
        want = onnx.TensorProto.FLOAT8E4M3FN if precision == "fp8" else onnx.TensorProto.FLOAT4E2M1
        assert inits[node.input[3]].data_type == inits[node.input[4]].data_type == want
        gate_up, down = dequantize_experts(precision, *weights)
        layer = node.input[3].split(".experts.")[0]
        # the export holds [E, H, 2I] / [E, I, H]; the plugin takes [E, 2I, H] / [E, H, I]
        ref_gu = source[f"{layer}.experts.gate_up_proj.T"].transpose(0, 2, 1)
        ref_dn = source[f"{layer}.experts.down_proj.T"].transpose(0, 2, 1)
        bound = 0.07 if precision == "fp8" else 0.2
        for got, ref in ((gate_up, ref_gu), (down, ref_dn)):
            assert got.shape == ref.shape
            rel = np.abs(got - ref).max() / np.abs(ref).max()
            assert 1e-4 < rel < bound, rel  # quantized (not the bf16 weights), and close


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_projections_are_weight_only_fp8_and_the_rest_stays_bf16(quantized, precision):
    model, inits, producers = _graph(quantized[precision])
    _, bf16_inits, _ = _graph(quantized["bf16"])
    quantized_names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        cast = producers.get(node.input[1])
        if cast is None or cast.op_type != "Cast":
            continue
        dq = producers.get(cast.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            assert cast.attribute[0].i == onnx.TensorProto.BFLOAT16
            q, scale = inits[dq.input[0]], inits[dq.input[1]]
            assert q.data_type == onnx.TensorProto.FLOAT8E4M3FN and scale.data_type == onnx.TensorProto.FLOAT
            assert list(scale.dims) == [q.dims[1]] and dq.attribute[0].i == 1  # per output channel
            quantized_names.append(dq.input[0])
    # self-conditioning MLP (3) + layer 0 q/k/v/o + MLP (7) + layer 1 q/k/o + MLP (6, K = V: no v_proj)
    assert len(quantized_names) == 16
    assert not any("router" in n or "embed" in n for n in quantized_names)
    # what stays as the bf16 path keeps it: the embedding (and tied LM head), the router, the norms
    for name, tensor in bf16_inits.items():
        if "embed_tokens" in name or "router.proj" in name or "norm" in name:
            assert name in inits and inits[name].data_type == tensor.data_type, name
    # weights: fp8 about half the bf16 bytes, nvfp4 less again
    size = {
        p: sum(len(t.raw_data) or nh.to_array(t).nbytes for t in _graph(path)[1].values())
        for p, path in quantized.items()
    }
    print(size)
    assert size["nvfp4"] < size["fp8"] < size["bf16"]


def test_quantized_precisions_are_refused_where_they_cannot_apply(tiny_export, tmp_path):
    for target in ("ort-cpu", "ort-cuda"):
        with pytest.raises(DllmError, match="--precision fp8 quantizes the experts of the TensorRT MoE plugin"):
            # the quantized weights are what this test checks
            optimize.run(optimize.OptimizeOptions(tiny_export, tmp_path / target, target, "fp8", parity="none"))
    model = dict(hidden_size=200, text_config=dict(moe_intermediate_size=64))
    with pytest.raises(DllmError, match="hidden_size 200 is not a multiple of 16; use --precision fp8"):
        _check_quantizable("nvfp4", "trt", model)
    _check_quantizable("fp8", "trt", model)  # fp8 has no blocks
