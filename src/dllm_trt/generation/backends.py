"""Open the Step for a backend over an artifacts directory."""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_trt.contract import STAGE_BUILD
from dllm_trt.errors import DllmError
from dllm_trt.manifest import read_manifest

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def open_step(artifacts: Path, backend: str, device: str = "cpu", checkpoint: Path | None = None):  # noqa: ANN201
    """The Step for `backend`; the torch backend loads the checkpoint the artifacts were made from."""
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
        return OnnxRuntimeStep.from_artifacts(artifacts, device)
    if backend == "torch":
        return open_torch_step(checkpoint or Path(manifest["checkpoint"]["path"]), device)
    if backend == "tensorrt":
        from dllm_trt.generation.tensorrt_step import TensorRTStep

        if manifest.get("stage") != STAGE_BUILD:
            raise DllmError(f"{artifacts} holds '{manifest.get('stage')}' output; the tensorrt backend runs the "
                            "engines of 'dllm-trt build'")  # fmt: skip
        return TensorRTStep.from_artifacts(artifacts, device)  # always on CUDA, whatever --device says
    raise DllmError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def open_torch_step(checkpoint: Path, device: str = "cpu"):  # noqa: ANN201
    from dllm_trt.generation.step import TorchStep
    from dllm_trt.models.checkpoint import load_model, safetensors_files, tensor_index
    from dllm_trt.models.vision import has_vision_tower

    if device == "cuda" and not torch.cuda.is_available():
        raise DllmError("--device cuda: torch sees no CUDA device here; pass --device cpu")
    model = load_model(checkpoint).to(device)
    return TorchStep(model, images=has_vision_tower(tensor_index(safetensors_files(checkpoint))))
