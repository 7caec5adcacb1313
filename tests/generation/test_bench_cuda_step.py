"""bench/bench_cuda_step.py --preflight: every code path of the GPU bench (transformers' calls, the CUDA
step over float and quantized experts, the per-layer scaling, the byte floor, the JSON), at the tiny
preset on the CPU with the kernels interpreted. A GPU session has minutes: a typo found there costs them."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py; must precede the first triton import
pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_cuda_step.py"


def test_the_preflight_runs_every_path_and_counts_the_bytes_a_step_reads(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_cuda_step", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_cuda_step", bench)
    spec.loader.exec_module(bench)
    out = tmp_path / "step.json"
    assert bench.main(["--preflight", "--batches", "1", "--formats", "float,nvfp4", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {(r["impl"], r.get("experts")): r for r in report["rows"]}
    assert set(rows) == {("transformers", "float"), ("triton_step", "float"), ("triton_step", "nvfp4")}
    assert all("error" not in r and r["denoise_ms"] > 0 and r["encode_ms"] > 0 for r in rows.values())

    from dllm_trt.models.presets import build_random_model

    model = build_random_model("tiny", 2)  # what a denoise step reads: the decoder's weights, the embedding twice
    decoder = sum(p.numel() * p.element_size() for p in model.model.decoder.parameters())
    embedding = model.model.decoder.embed_tokens.weight
    assert rows[("triton_step", "float")]["weight_bytes"] == decoder + embedding.numel() * embedding.element_size()
    experts = sum(
        p.numel() * p.element_size() for layer in model.model.decoder.layers for p in layer.experts.parameters()
    )
    nvfp4 = rows[("triton_step", "nvfp4")]
    assert nvfp4["weight_bytes"] < rows[("triton_step", "float")]["weight_bytes"] - experts * 0.8  # ~1/7 as stored
    assert nvfp4["floor_ms"] == pytest.approx(
        (nvfp4["weight_bytes"] + nvfp4["cache_bytes"]) / report["peak_bytes_per_s"] * 1e3
    )
    for key in ("denoise_ms", "encode_ms"):  # the per-layer split adds back up to the measured step
        assert nvfp4[f"{key}_rest"] + 2 * nvfp4[f"{key}_per_layer"] == pytest.approx(nvfp4[key])
    assert nvfp4["tok_s"] == pytest.approx(1 * 8 / (16 * nvfp4["denoise_ms"] + nvfp4["encode_ms"]) * 1e3)
