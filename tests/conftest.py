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
# pytest-xdist runs one worker per core: one OpenMP thread each, or the workers' torch pools oversubscribe
# the cores (two heavy test files: 3 min 30 s with the default threads, 3 min 0 s with one). Set before
# torch is imported, and inherited by the CLI processes the tests start.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import fcntl
import shutil
from collections.abc import Callable

import pytest
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """`make(path)` run once per test run, whichever pytest-xdist worker asks first: session fixtures are
    per worker, and the artifacts below took each worker tens of seconds to make again. Without xdist, a
    folder of this session's."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        path = tmp_path_factory.mktemp(name) / name
        make(path)
        return path
    root = tmp_path_factory.getbasetemp().parent / f"made-once-{run}"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here until the first one has made it
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # a worker that died while making it
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from dllm_trt.models.presets import make_checkpoint

    return made_once(tmp_path_factory, "tiny-ckpt", lambda path: make_checkpoint(path, "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory) -> Path:
    from dllm_trt import export

    # a fixture: the tests that use it measure what they need
    return made_once(
        tmp_path_factory,
        "tiny-export",
        lambda out: export.run(export.ExportOptions(tiny_ckpt, out, parity=False, quiet=True)),
    )


@pytest.fixture(scope="session")
def tiny_export_bf16(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint exported in bf16 (as a bf16 checkpoint, the released one, exports)."""
    from dllm_trt import export

    options = dict(dtype="bfloat16", parity=False, quiet=True)  # the tests that use it measure what they need
    return made_once(
        tmp_path_factory, "tiny-export-bf16", lambda out: export.run(export.ExportOptions(tiny_ckpt, out, **options))
    )


@pytest.fixture(scope="session")
def tiny_trt(tiny_export, tmp_path_factory) -> dict:
    """The tiny export optimized for TensorRT in bf16, fp8 and nvfp4, by precision."""
    from dllm_trt import optimize

    def make(precision: str) -> Callable[[Path], None]:
        # a fixture: the tests that use it measure what they need
        return lambda out: optimize.run(optimize.OptimizeOptions(tiny_export, out, "trt", precision, parity="none",
                                                                 quiet=True))  # fmt: skip

    return {p: made_once(tmp_path_factory, f"tiny-trt-{p}", make(p)) for p in ("bf16", "fp8", "nvfp4")}


@pytest.fixture(scope="session")
def tiny_trt_fp32(tiny_export, tmp_path_factory) -> Path:
    """The tiny export optimized for TensorRT in fp32: every attention is the DllmAttention plugin node (no
    fp32 attention has a fused TensorRT kernel), which onnxruntime runs through its CPU stand-in."""
    from dllm_trt import optimize

    options = dict(target="trt", precision="fp32", parity="none", quiet=True)  # the tests measure what they need
    return made_once(
        tmp_path_factory,
        "tiny-trt-fp32",
        lambda out: optimize.run(optimize.OptimizeOptions(tiny_export, out, **options)),
    )


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
def trained_export(tmp_path_factory) -> Path:
    """The embedded trained checkpoint (with its tokenizer) exported in fp32, text only (as the demo does)."""
    if not (TRAINED / "model.safetensors").is_file():
        pytest.skip(f"no trained checkpoint at {TRAINED} (build it with examples/train_pycode.py)")
    from dllm_trt import export

    options = dict(parity=False, quiet=True, vision=False)  # the tests that use it measure what they need
    return made_once(
        tmp_path_factory, "trained-export", lambda out: export.run(export.ExportOptions(TRAINED, out, **options))
    )


@pytest.fixture(scope="session")
def trained_ort_cpu(trained_export, tmp_path_factory) -> Path:
    """The trained export optimized for onnxruntime on CPU: the demo's graphs, for the tests that serve them."""
    from dllm_trt import optimize

    options = dict(target="ort-cpu", parity="none", quiet=True)  # the tests that use it measure what they need
    return made_once(
        tmp_path_factory,
        "trained-ort-cpu",
        lambda out: optimize.run(optimize.OptimizeOptions(trained_export, out, **options)),
    )


# ---- image input: a checkpoint with a vision tower, its export and its fp32 ort-cpu graphs ---------------


@pytest.fixture(scope="session")
def tiny_vision_ckpt(tmp_path_factory) -> Path:
    from dllm_trt.models.presets import make_checkpoint

    return made_once(tmp_path_factory, "tiny-vision-ckpt", lambda path: make_checkpoint(path, "tiny-vision", seed=0))


@pytest.fixture(scope="session")
def tiny_vision_export(tiny_vision_ckpt, tmp_path_factory) -> Path:
    """Exported with its parity measured (the vision graph and a prompt pass with images included)."""
    from vision_case import TINY_VISION_SOFT_TOKENS

    from dllm_trt import export

    def make(out: Path) -> None:
        options = export.ExportOptions(tiny_vision_ckpt, out, quiet=True, max_soft_tokens=(TINY_VISION_SOFT_TOKENS,))
        assert export.run(options).parity_failed is None

    return made_once(tmp_path_factory, "tiny-vision-export", make)


@pytest.fixture(scope="session")
def tiny_vision_optimized(tiny_vision_export, tmp_path_factory) -> Path:
    from dllm_trt import optimize

    def make(out: Path) -> None:
        options = optimize.OptimizeOptions(tiny_vision_export, out, "ort-cpu", "fp32", parity="final", quiet=True)
        assert not optimize.run(options).failed_passes

    return made_once(tmp_path_factory, "tiny-vision-ort-cpu", make)
