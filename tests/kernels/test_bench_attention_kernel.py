"""bench/bench_attention_kernel.py's code paths on the CPU under TRITON_INTERPRET=1 at tiny sizes: both
implementations run on the bench's inputs and match the reference, and the bytes it reports are the
tensors' own. A GPU session has minutes to run the bench: a typo found there costs them. Only the CUDA-event
timer is replaced (timing is the bench's job, not a test's)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_attention_kernel.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_attention_kernel", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_attention_kernel", module)
    spec.loader.exec_module(module)
    for name, value in dict(Q_HEADS=4, KV_HEADS=2, HEAD_DIM=16, CANVAS=8, DEVICE="cpu").items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(module, "time_ms", lambda fn, *a: (fn(), 1.0)[1])
    return module


def test_both_implementations_run_and_match_the_reference(bench):
    gen = torch.Generator().manual_seed(0)
    args = type("Args", (), dict(warmup=0, iters=1))
    rows = bench.bench_context(40, 2, torch.bfloat16, args, gen, bandwidth=1e12, flops=1e14)
    assert [r["impl"] for r in rows] == ["flash_attention", "torch_sdpa"]
    for row in rows:
        assert "error" not in row and row["max_rel_err"] < 2e-2, row
    tensors = bench.inputs(2, 40, gen, torch.bfloat16)
    assert rows[0]["bytes"] == sum(t.numel() * t.element_size() for t in tensors) + tensors[0].numel() * 2
    assert rows[0]["flop"] == 4 * 2 * 4 * 8 * 48 * 16 and rows[0]["splits"] >= 1
    assert bench.peaks("NVIDIA H200")[2] == "H200" and "assumed" in bench.peaks("RTX 6000")[2]
