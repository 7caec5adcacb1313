"""Fixtures of the pass tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def assert_step_parity(tiny_ckpt):
    """Checks rewritten graphs in `artifacts` against transformers on fresh random inputs (fp32:
    every output within tolerance, logits max rel <= 1e-4 with 100% argmax); returns the result."""
    from dllm_trt.generation.step import OnnxRuntimeStep
    from dllm_trt.models.checkpoint import load_model
    from dllm_trt.parity.step_parity import step_parity

    def check(artifacts: Path):  # noqa: ANN202
        result = step_parity(load_model(tiny_ckpt), OnnxRuntimeStep.from_artifacts(artifacts), seed=11)
        for comparison in result.comparisons:
            print(comparison.line())
        assert result.passed
        logits = [c for c in result.comparisons if "logits" in c.name]
        assert logits and all(c.argmax_agreement == 1.0 and c.max_rel <= 1e-4 for c in logits)
        return result

    return check
