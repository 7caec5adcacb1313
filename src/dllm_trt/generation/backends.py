"""Open the Step for a backend over an artifacts directory."""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_trt.contract import QUANTIZED_PRECISIONS, STAGE_BUILD
from dllm_trt.errors import DllmError
from dllm_trt.manifest import read_manifest

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def open_step(artifacts: Path, backend: str, device: str = "cpu", checkpoint: Path | None = None, threads: int = 0):  # noqa: ANN201
    """The Step for `backend`; the torch backend loads the checkpoint the artifacts were made from. `threads`:
    onnxruntime's intra-op threads (0: its own choice, one per core)."""
    manifest = read_manifest(artifacts)
    if backend == "onnxruntime":
        from dllm_trt.generation.step import OnnxRuntimeStep

        if manifest.get("stage") == STAGE_BUILD:
            raise DllmError(f"{artifacts} holds TensorRT engines; run them with --backend tensorrt, or run the "
                            "optimized graphs they were built from with onnxruntime")  # fmt: skip
        if manifest.get("target") == "trt" and device != "cpu":
            raise DllmError(
                f"{artifacts} was optimized for TensorRT: onnxruntime on {device} has no kernel for its MoE "
                "plugin; build engines ('dllm-trt build'), or run it on CPU (--device cpu)"
            )
        return OnnxRuntimeStep.from_artifacts(artifacts, device, threads)
    if backend == "torch":
        precision = manifest.get("precision")
        experts = precision if precision in QUANTIZED_PRECISIONS else "float"
        return open_torch_step(checkpoint or Path(manifest["checkpoint"]["path"]), device, experts)
    if backend == "tensorrt":
        from dllm_trt.generation.tensorrt_step import TensorRTStep

        if manifest.get("stage") != STAGE_BUILD:
            raise DllmError(f"{artifacts} holds '{manifest.get('stage')}' output; the tensorrt backend runs the "
                            "engines of 'dllm-trt build'")  # fmt: skip
        return TensorRTStep.from_artifacts(artifacts, device)  # always on CUDA, whatever --device says
    raise DllmError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def open_torch_step(checkpoint: Path, device: str = "cpu", experts: str = "float"):  # noqa: ANN201
    """transformers' modules over the checkpoint. On CPU as they are (TorchStep); on CUDA with the MoE through
    the Triton kernels the engine plugin runs, the experts in `experts` format (the artifact's precision:
    fp8 and nvfp4 as optimize stores them) and the denoise step from a CUDA graph (TritonStep)."""
    from dllm_trt.models.checkpoint import load_model, safetensors_files, tensor_index
    from dllm_trt.models.vision import has_vision_tower

    if device not in ("cpu", "cuda"):
        raise DllmError(f"--device {device}: the torch backend runs on cpu or cuda")
    images = has_vision_tower(tensor_index(safetensors_files(checkpoint)))
    if device == "cpu":
        from dllm_trt.generation.step import TorchStep

        return TorchStep(load_model(checkpoint), images=images)
    if not torch.cuda.is_available():
        raise DllmError("--device cuda: torch sees no CUDA device here (no GPU, or a CPU build of torch); "
                        "pass --device cpu")  # fmt: skip
    from dllm_trt.generation.triton_step import TritonStep

    return TritonStep(load_model(checkpoint).to(device), experts, release_float=True, images=images)
