"""Shared fixtures: tiny checkpoints of the real architecture, made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on the CPU under the interpreter; this must be set before anything imports
# triton, and tests/build imports the kernels too, so it is set here rather than in tests/kernels.
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
    from dllm_trt.export import export_checkpoint

    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    export_checkpoint(tiny_ckpt, out, parity=False, quiet=True)
    return out
