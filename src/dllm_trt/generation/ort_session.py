"""Open an ONNX graph in onnxruntime with the providers this machine has."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import torch


def providers(device: str = "cpu") -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            from dllm_trt.errors import DllmError

            raise DllmError("onnxruntime has no CUDA provider here; install the 'gpu' extra (onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(
    path: Path,
    device: str = "cpu",
    graph_optimization: bool = True,
    threads: int = 0,
    spin: bool = False,
    low_memory: bool = False,
) -> ort.InferenceSession:
    """`low_memory`: no pre-packed copy of the weights and no activation arena (a graph run a few times
    beside other large work, where a second copy of its weights would count twice)."""
    options = ort.SessionOptions()
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's concern
    options.intra_op_num_threads = threads
    # With `spin`, workers spin between the ops of a run (an optimized small-preset denoise step is
    # ~560 small ops; waking a parked worker for each made it 18.8 instead of 15.4 ms) and stop when
    # the run ends, so an idle session never takes the cores of the running one. Without it they
    # park: where torch works between the runs (the sampling head of exported graphs), its own
    # threads and spinning workers fought over the cores (tiny preset step 1.6 -> 4.6 ms).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if not graph_optimization:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if _uses_standins(path):
        from dllm_trt.generation.cpu_standins import standin_session_options

        standin_session_options(options)
    return ort.InferenceSession(str(path), options, providers=providers(device))


def _uses_standins(path: Path) -> bool:
    """Graphs made runnable on CPU by generation.cpu_variant carry Python stand-in ops."""
    import onnx

    from dllm_trt.generation.cpu_standins import STANDIN_DOMAIN

    model = onnx.load(str(path), load_external_data=False)
    return any(opset.domain == STANDIN_DOMAIN for opset in model.opset_import)


_ORT_TYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
}  # fmt: skip


def run(session: ort.InferenceSession, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run with torch tensors in and out (CPU); only the inputs the graph declares are fed, each in the
    dtype the graph declares (a caller's fp32 reference cache into an fp16 graph, say)."""
    wanted = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}
    arrays = {
        name: tensor.detach().cpu().to(wanted[name] or tensor.dtype).numpy()
        for name, tensor in feeds.items()
        if name in wanted
    }
    names = [o.name for o in session.get_outputs()]
    return {name: torch.from_numpy(value) for name, value in zip(names, session.run(names, arrays))}
