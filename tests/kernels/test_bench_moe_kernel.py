"""bench/bench_moe_kernel.py's code paths, on the CPU under TRITON_INTERPRET=1 at tiny sizes: every
expert format is made, run through the real kernels and checked against moe_reference, and the bytes
it reports are the stored tensors' own. A GPU session has minutes to run the bench: a typo found there
costs them. Only the CUDA-event timers are replaced (timing is the bench's job, not a test's)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_moe_kernel.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_moe_kernel", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_moe_kernel", module)
    spec.loader.exec_module(module)
    # tiny widths (multiples of 16 for NVFP4 blocks), CPU tensors, a fixed "time" instead of CUDA events
    for name, value in dict(HIDDEN=48, EXPERTS=6, WIDTH=32, TOP_K=2, DEVICE="cpu").items():
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(module, "time_ms", lambda fn, *a: (fn(), 1.0)[1])
    monkeypatch.setattr(module, "time_graph_ms", lambda fn, *a: (fn(), 0.5)[1])
    return module


def test_every_format_runs_and_matches_the_reference(bench):
    gen = torch.Generator().manual_seed(0)
    gate_up, down, scale = bench.make_weights(gen)
    cases = {f: bench.format_case(f, gate_up, down, torch.bfloat16) for f in bench.FORMATS} | dict(scale=scale)
    args = type("Args", (), dict(formats=list(bench.FORMATS), dtype="bf16", warmup=0, iters=1, budget_s=0.0))
    rows = bench.bench_tokens(9, cases, torch.bfloat16, args, gen, peak=1e12)
    by = {(r["experts_format"], r["impl"]): r for r in rows}
    assert set(by) == {("bf16", "fused_moe"), ("bf16", "torch_dense"), ("bf16", "torch_loop"),
                       ("fp8", "fused_moe"), ("nvfp4", "fused_moe")}  # fmt: skip
    for row in rows:
        assert row["max_abs_err"] < 2e-2, row  # bf16 activations against fp32 math over the stored experts
    # bytes per expert: bf16 values; fp8 values + fp32 channel scales; nvfp4 half-byte values + e4m3 block
    # scales + two fp32 global scales
    h, i = bench.HIDDEN, bench.WIDTH
    assert cases["float"]["bytes_per_expert"] == 3 * i * h * 2
    assert cases["fp8"]["bytes_per_expert"] == 3 * i * h + 4 * (2 * i + h)
    assert cases["nvfp4"]["bytes_per_expert"] == 3 * i * h / 2 + 3 * i * h / 16 + 2 * 4
    routed = by[("bf16", "fused_moe")]["experts_routed"]
    for (fmt, _), row in by.items():
        key = "float" if fmt == "bf16" else fmt
        assert row["weight_mb"] == pytest.approx(routed * cases[key]["bytes_per_expert"] / 1e6)
    # every row is timed from the CUDA-graph replay where it can be captured, and set against bf16 fused_moe
    assert by[("nvfp4", "fused_moe")]["speedup_vs_unquantized"] == pytest.approx(1.0)
    assert by[("bf16", "torch_loop")]["graph_ms"] is None and by[("bf16", "torch_loop")]["x_floor"] > 0


def test_the_quantized_preflight_runs(bench):
    errors = bench.preflight_quantized()
    print(errors)
    assert set(errors) == {"fp8", "nvfp4"} and all(e < 1e-4 for e in errors.values()), errors
