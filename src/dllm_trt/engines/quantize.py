"""`--precision fp8 | nvfp4`: explicit Q/DQ through nvidia-modelopt's ONNX quantizer, where it can run.

What modelopt's ONNX path (``modelopt.onnx.quantization.quantize``, 0.47) does and does not do here:

* fp8: inserts FP8 Q/DQ on MatMul/Gemm inputs after calibrating activation ranges by running the
  graph in onnxruntime. It runs on the CPU when onnxruntime can run every node of the graph, i.e.
  for an fp32 graph without custom ops (onnxruntime has no CPU bf16 MatMul), and then casts the
  result to bf16 itself (high_precision_dtype), keeping the ops listed in KEEP_FP32 in fp32.
* The `optimize --target trt` graphs contain DllmMoE, a TensorRT plugin onnxruntime cannot run,
  so modelopt cannot calibrate them on the CPU (it would need TensorRT's execution provider). And
  the expert weights (about 90% of the parameters) are inputs of that plugin, which modelopt does
  not quantize and whose Triton kernels take no fp8: an fp8 DiffusionGemma needs an fp8 variant of
  the MoE kernels first. Such graphs are refused here with that reason.
* nvfp4: modelopt's ONNX quantizer has no nvfp4 mode (int8, fp8, int4 only); NVFP4 comes from its
  PyTorch quantization at export time, which dllm-trt does not wire. Refused with that reason.

Calibration feeds are synthetic (random tokens, valid masks, small random caches) sized from the
manifest: enough to set scales for a smoke build, not a calibrated fp8 model. `fp8_parity`
measures a quantized graph against its source on onnxruntime CPU (a weak judge of reduced
precision: it emulates fp8 Q/DQ in fp32).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from dllm_trt.errors import DllmError

KEEP_FP32 = ["RMSNormalization", "Softmax", "LogSoftmax", "ReduceSum", "ReduceMax", "ReduceMean", "TopK",
             "ArgMax", "Tanh", "Exp", "Log"]  # fmt: skip
_NP = {"float32": np.float32, "int64": np.int64, "bool": np.bool_, "int32": np.int32, "float16": np.float16}


def unsupported_reason(model: onnx.ModelProto, precision: str) -> str | None:
    """Why modelopt cannot quantize `model` to `precision` on this machine, or None when it can."""
    if precision == "nvfp4":
        return ("modelopt's ONNX quantizer has no nvfp4 mode (int8, fp8, int4 only); NVFP4 comes from its PyTorch "
                "quantization at export time, which dllm-trt does not wire yet")  # fmt: skip
    if precision != "fp8":
        return f"precision {precision} is not a quantized precision"
    custom = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        return (f"the graph has custom ops onnxruntime cannot run ({', '.join(custom)}), so modelopt cannot "
                "calibrate it on the CPU; and the MoE expert weights (about 90% of the parameters) feed the "
                "dllm_trt MoE plugins, whose kernels take no fp8: fp8 needs fp8 MoE kernels first")  # fmt: skip
    bf16 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16]
    if bf16:
        return (
            "the graph's weights are bf16 and onnxruntime has no CPU bf16 MatMul to calibrate with; "
            "quantize an 'optimize --precision fp32' output (modelopt casts it to bf16 itself)"
        )
    return None


def modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def synthetic_feeds(graph_io: dict, sizes: dict[str, int], vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One calibration batch shaped from the manifest description (named axes sized by `sizes`)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_io["inputs"]:
        shape = [d if isinstance(d, int) else sizes[d] for d in value["shape"]]
        dtype = _NP.get(value["dtype"], np.float32)
        name = value["name"]
        if dtype == np.bool_:
            feeds[name] = np.ones(shape, dtype=bool)
        elif name.endswith("ids"):
            feeds[name] = rng.integers(0, vocab if "position" not in name else 4096, shape).astype(dtype)
        elif name == "temperature":
            feeds[name] = np.asarray(0.6, dtype=dtype).reshape(shape)
        elif name == "sampling_noise":
            feeds[name] = rng.exponential(size=shape).astype(dtype)
        else:
            feeds[name] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return feeds


def quantize_fp8(src: Path, dst: Path, feeds: dict[str, np.ndarray], high_precision: str = "bf16") -> None:
    """FP8 Q/DQ on the GEMMs of `src` (fp32, no custom ops) -> `dst`, `high_precision` elsewhere but KEEP_FP32.

    onnxruntime's CPU provider runs the result only with high_precision="fp32" (no CPU bf16 MatMul):
    that variant, same scales, is what `fp8_parity` can measure.
    """
    model = onnx.load(str(src), load_external_data=False)
    reason = unsupported_reason(model, "fp8")
    if reason:
        raise DllmError(f"--precision fp8: {src.name}: {reason}")
    if not modelopt_available():
        raise DllmError("--precision fp8 needs nvidia-modelopt with its ONNX extras (pip install nvidia-modelopt "
                        "onnx_graphsurgeon lief) ")  # fmt: skip
    from modelopt.onnx.quantization import quantize

    # modelopt writes intermediate models beside its input: give it a private copy of the graph whose
    # external weight files are symlinks, so the optimized directory is never written to.
    work = dst.parent / f".{dst.stem}.modelopt"
    work.mkdir(parents=True, exist_ok=True)
    for location in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        link = work / location
        if not link.exists():
            link.symlink_to((src.parent / location).resolve())
    onnx.save(model, str(work / src.name))
    shapes = ",".join(f"{k}:{'x'.join(str(d) for d in v.shape) or '1'}" for k, v in feeds.items() if v.ndim)
    quantize(
        str(work / src.name),
        quantize_mode="fp8",
        calibration_data=feeds,
        calibration_method="max",
        calibration_eps=["cpu"],
        calibration_shapes=shapes,
        high_precision_dtype=high_precision,
        op_types_to_exclude_fp16=KEEP_FP32,
        output_path=str(dst),
        use_external_data_format=True,
        log_level="WARNING",
    )
    shutil.rmtree(work, ignore_errors=True)


def fp8_parity(src: Path, dst: Path, feeds: dict[str, np.ndarray]) -> dict[str, dict]:
    """Max abs / relative error of every output of the quantized graph against its source, on ORT CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = {}
    ref_sess = ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    q_sess = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feeds)))
    got = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feeds)))
    for name, expected in ref.items():
        actual = got[name].astype(np.float64)
        diff = float(np.abs(actual - expected.astype(np.float64)).max())
        scale = float(np.abs(expected).max()) or 1.0
        results[name] = dict(max_abs=diff, max_rel=diff / scale)
    return results
