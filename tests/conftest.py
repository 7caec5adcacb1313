"""Shared fixtures: tiny checkpoints of the real architecture, made once per test session."""

from __future__ import annotations

from pathlib import Path

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
