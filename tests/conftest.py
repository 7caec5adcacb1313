"""Shared fixtures: tiny checkpoints of the real architecture, made once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Modules several test folders share (graphs for TensorRT, perturbed checkpoints, graph comparison).
sys.path.insert(0, str(Path(__file__).parent / "helpers"))

# Triton kernels run on the CPU under the interpreter; this must be set before anything imports
# triton, and tests/engines imports the kernels too, so it is set here rather than in tests/kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from dllm_trt.models.presets import make_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    make_checkpoint(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory) -> Path:
    from dllm_trt import export

    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    # a fixture: the tests that use it measure what they need
    export.run(export.ExportOptions(tiny_ckpt, out, parity=False, quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_trt(tiny_export, tmp_path_factory) -> dict:
    """The tiny export optimized for TensorRT in bf16, fp8 and nvfp4, by precision."""
    from dllm_trt import optimize

    out = {}
    for precision in ("bf16", "fp8", "nvfp4"):
        path = tmp_path_factory.mktemp("tiny-trt") / precision
        # a fixture: the tests that use it measure what they need
        optimize.run(optimize.OptimizeOptions(tiny_export, path, "trt", precision, parity="none", quiet=True))
        out[precision] = path
    return out


@pytest.fixture(scope="session")
def tiny_trt_fp32(tiny_export, tmp_path_factory) -> Path:
    """The tiny export optimized for TensorRT in fp32: every attention is the DllmAttention plugin node (no
    fp32 attention has a fused TensorRT kernel), which onnxruntime runs through its CPU stand-in."""
    from dllm_trt import optimize

    path = tmp_path_factory.mktemp("tiny-trt") / "fp32"
    optimize.run(optimize.OptimizeOptions(tiny_export, path, "trt", "fp32", parity="none", quiet=True))
    return path


@pytest.fixture(scope="session")
def hf_router_and_experts():
    """Builds transformers' DiffusionGemmaTextRouter + DiffusionGemmaTextExperts at the given sizes
    with random weights of useful spread (the MoE tests' reference)."""
    pytest.importorskip("transformers.models.diffusion_gemma", reason="needs transformers >= 5.13")
    import torch
    from transformers.models.diffusion_gemma.configuration_diffusion_gemma import DiffusionGemmaTextConfig
    from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
        DiffusionGemmaTextExperts,
        DiffusionGemmaTextRouter,
    )

    def build(hidden: int, experts: int, top_k: int, width: int, seed: int = 0):  # noqa: ANN202
        config = DiffusionGemmaTextConfig(
            hidden_size=hidden, num_experts=experts, top_k_experts=top_k, moe_intermediate_size=width,
            num_hidden_layers=1, layer_types=["full_attention"], experts_implementation="eager",
        )  # fmt: skip
        torch.manual_seed(seed)
        router, block = DiffusionGemmaTextRouter(config), DiffusionGemmaTextExperts(config)
        with torch.no_grad():
            router.proj.weight.normal_(0.0, 1.0)
            router.scale.uniform_(0.5, 1.5)
            router.per_expert_scale.uniform_(0.5, 1.5)
            block.gate_up_proj.normal_(0.0, hidden**-0.5)
            block.down_proj.normal_(0.0, width**-0.5)
        return router.eval(), block.eval()

    return build


TRAINED = Path(__file__).resolve().parents[1] / "src" / "dllm_trt" / "assets" / "pycode-tiny"


@pytest.fixture(scope="session")
def trained_ort_cpu(tmp_path_factory) -> Path:
    """The embedded trained checkpoint (with its tokenizer) exported and optimized for onnxruntime on CPU: the
    demo's graphs. Made once per session for the tests that serve it."""
    if not (TRAINED / "model.safetensors").is_file():
        pytest.skip(f"no trained checkpoint at {TRAINED} (build it with examples/train_pycode.py)")
    from dllm_trt import export, optimize

    root = tmp_path_factory.mktemp("trained")
    export.run(export.ExportOptions(TRAINED, root / "onnx", parity=False, quiet=True, vision=False))
    optimize.run(optimize.OptimizeOptions(root / "onnx", root / "optimized", "ort-cpu", parity="none", quiet=True))
    return root / "optimized"


# ---- image input: a checkpoint with a vision tower, its export and its fp32 ort-cpu graphs ---------------


@pytest.fixture(scope="session")
def tiny_vision_ckpt(tmp_path_factory) -> Path:
    from dllm_trt.models.presets import make_checkpoint

    path = tmp_path_factory.mktemp("tiny-vision") / "ckpt"
    make_checkpoint(path, "tiny-vision", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_vision_export(tiny_vision_ckpt, tmp_path_factory) -> Path:
    """Exported with its parity measured (the vision graph and a prompt pass with images included)."""
    from dllm_trt import export

    out = tmp_path_factory.mktemp("tiny-vision-export") / "onnx"
    from vision_case import TINY_VISION_SOFT_TOKENS

    options = export.ExportOptions(tiny_vision_ckpt, out, quiet=True, max_soft_tokens=(TINY_VISION_SOFT_TOKENS,))
    assert export.run(options).parity_failed is None
    return out


@pytest.fixture(scope="session")
def tiny_vision_optimized(tiny_vision_export, tmp_path_factory) -> Path:
    from dllm_trt import optimize

    out = tmp_path_factory.mktemp("tiny-vision-ort") / "fp32"
    result = optimize.run(optimize.OptimizeOptions(tiny_vision_export, out, "ort-cpu", "fp32", parity="final",
                                                   quiet=True))  # fmt: skip
    assert not result.failed_passes
    return out
