"""`validate --per-layer`: the step graph cut per layer computes what the whole graph computes; every layer is
judged against transformers' same layer; a perturbed layer is named, at layer and block."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from perturb import scaled_copy

from dllm_trt.cli import main
from dllm_trt.contract import STEP_FILE
from dllm_trt.parity.layer_graphs import BLOCKS, PICKS, PROLOGUE, LayerGraphs, split_step_graph

TRAINED = Path(__file__).resolve().parents[2] / "src" / "dllm_trt" / "assets" / "pycode-tiny"


@pytest.fixture(scope="module")
def tiny_bf16(tiny_trt) -> Path:
    return tiny_trt["bf16"]


def _per_layer(artifacts: Path, reference: Path, report: Path | None = None, *extra: str) -> tuple[int, dict]:
    argv = ["validate", str(artifacts), "--reference", str(reference), "--per-layer", *extra]
    if report is not None:
        argv += ["--report", str(report), "--no-golden"]  # golden files: tests/parity/test_golden.py
    code = main(argv)
    return code, json.loads((report / "report.json").read_text()) if report is not None else {}


def test_cut_graph_run_piece_by_piece_equals_the_whole_graph(tiny_export, tmp_path):
    """Chained on their own outputs (no teacher forcing), the pieces give the whole graph's K/V and logits, and
    every layer has every block located (exported form: the norms as Mul chains)."""
    from dllm_trt.generation.ort_session import open_session, run

    layers = 2
    model = onnx.load(str(tiny_export / STEP_FILE), load_external_data=False)
    pieces = split_step_graph(model, layers)
    assert [p.index for p in pieces] == [PROLOGUE, 0, 1, 2]
    # every block located, and the experts this graph picks itself (its TopK)
    assert all(set(p.blocks) == {b for b, _, _ in BLOCKS} | {PICKS} for p in pieces if 0 <= p.index < layers)
    assert [p.kv for p in pieces[1:3]] == [["key.0", "value.0"], ["key.1", "value.1"]]

    session = open_session(tiny_export / STEP_FILE)
    gen = torch.Generator().manual_seed(0)
    feeds = {}
    for info in session.get_inputs():
        shape = [{"batch": 2}.get(d, d) if isinstance(d, int) else 2 for d in info.shape]
        if info.name.startswith("past_"):
            shape[2] = 5
        if info.name == "cache_mask":
            shape = [2, 5]
        if info.name in ("input_ids", "position_ids"):
            feeds[info.name] = torch.randint(0, 50, shape, generator=gen)
        elif info.type == "tensor(bool)":
            feeds[info.name] = torch.ones(shape, dtype=torch.bool)
        else:
            feeds[info.name] = torch.randn(shape, generator=gen)
    feeds["position_ids"] = torch.arange(5, 7)[None].expand(2, -1).contiguous()
    whole = run(session, feeds)
    graphs = LayerGraphs(tiny_export, STEP_FILE, layers, tmp_path)
    values = dict(feeds)
    for index in (PROLOGUE, 0, 1, 2):
        values |= run(graphs.open(index), values)
        graphs.close(index)
    assert not list(tmp_path.iterdir())  # each piece's files go once it has run
    for name, expected in whole.items():
        torch.testing.assert_close(values[name], expected, rtol=0, atol=0, msg=name)


def test_honest_graphs_pass_and_a_perturbed_layer_is_named(capsys, tiny_ckpt, tiny_export, tmp_path):
    code, report = _per_layer(tiny_export, tiny_ckpt, tmp_path / "honest")
    result = report["per_layer"]
    assert code == 0, result["failures"]
    assert result["first_divergent_layer"] is None and result["judged_tokens"] == result["tokens"] > 0
    assert result["calls"] == ["encoder pass", "denoise step 1", "denoise step 2"]
    layer = result["layers"][1]
    assert {b["block"] for b in layer["blocks"]} >= {"attention", "MoE", "expert picks", "key/value", "layer output"}
    assert layer["expert_agreement"] == 1.0 and all(b["value"] < 1e-5 for b in layer["blocks"])
    assert (tmp_path / "honest" / "per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "per_layer.png" in (tmp_path / "honest" / "report.md").read_text()

    broken = scaled_copy(
        tiny_export, tmp_path / "broken", "model.decoder.layers.1.post_attention_layernorm.weight", 1.05
    )
    code, report = _per_layer(broken, tiny_ckpt, tmp_path / "broken-report")
    result = report["per_layer"]
    assert code == 1
    assert (result["first_divergent_layer"], result["first_divergent_block"]) == (1, "attention norm")
    assert result["layers"][0]["passed"]  # layer 0 is untouched, and it is judged so
    assert "layer 1: attention norm" in capsys.readouterr().err


def test_bf16_graph_judged_against_the_envelope(tiny_ckpt, tiny_bf16, tmp_path):
    """An honest bf16 graph (fused, the TensorRT target, run through its CPU stand-ins) passes within 2x of
    transformers in bf16; with one layer's MoE input norm 5% off it fails there."""
    code, report = _per_layer(tiny_bf16, tiny_ckpt, tmp_path / "honest")
    result = report["per_layer"]
    assert code == 0, result["failures"]
    blocks = [b for layer in result["layers"] for b in layer["blocks"]]
    assert all(b["envelope"] is not None for b in blocks) and any(b["block"] == "entropy" for b in blocks)
    assert result["layers"][0]["envelope_expert_agreement"] is not None

    weight = "model.decoder.layers.0.pre_feedforward_layernorm_2.weight"
    broken = scaled_copy(tiny_bf16, tmp_path / "broken", weight, 1.05)
    code, report = _per_layer(broken, tiny_ckpt, tmp_path / "broken-report")
    result = report["per_layer"]
    assert code == 1 and (result["first_divergent_layer"], result["first_divergent_block"]) == (0, "MoE input norm")


def test_nvfp4_graph_judged_against_the_reference_quantized_alike(tiny_ckpt, tiny_trt, tmp_path):
    """The envelope of an nvfp4 artifact is transformers with its weights quantized as the artifact stores
    them: the honest graph passes; one expert's global scale doubled in one layer fails, at that layer's MoE."""
    honest = tiny_trt["nvfp4"]
    code, report = _per_layer(honest, tiny_ckpt, tmp_path / "honest")
    result = report["per_layer"]
    assert code == 0, result["failures"]
    assert (
        result["precision"] == "nvfp4"
        and "quantized as the nvfp4 artifact stores them" in (tmp_path / "honest" / "report.md").read_text()
    )
    weight = "model.decoder.layers.1.experts.down_proj.global_scale"
    broken = scaled_copy(honest, tmp_path / "broken", weight, 2.0, index=0)
    code, report = _per_layer(broken, tiny_ckpt, tmp_path / "broken-report")
    result = report["per_layer"]
    assert code == 1 and (result["first_divergent_layer"], result["first_divergent_block"]) == (1, "MoE")
    assert result["layers"][0]["passed"]
    # plain validate runs the per-layer check too for a quantized artifact
    code = main(
        ["validate", str(broken), "--reference", str(tiny_ckpt), "--seeds", "0", "--report", str(tmp_path / "v"),
         "--no-golden"]
    )  # fmt: skip
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert code == 1 and report["per_layer"]["first_divergent_layer"] == 1


@pytest.mark.skipif(not (TRAINED / "model.safetensors").exists(), reason="no trained checkpoint")
def test_trained_checkpoint_bf16_passes_and_a_norm_5_percent_off_fails(trained_export, tmp_path):
    from dllm_trt import optimize

    optimized = tmp_path / "bf16"
    # validate --per-layer judges it below
    optimize.run(optimize.OptimizeOptions(trained_export, optimized, "ort-cpu", "bf16", parity="none", quiet=True))
    code, report = _per_layer(optimized, TRAINED, tmp_path / "honest")
    assert code == 0, report["per_layer"]["failures"]
    layers = len(report["per_layer"]["layers"]) - 1
    weight = f"model.decoder.layers.{layers - 1}.post_feedforward_layernorm.weight"
    broken = scaled_copy(optimized, tmp_path / "broken", weight, 1.05)
    code, report = _per_layer(broken, TRAINED, tmp_path / "broken-report")
    result = report["per_layer"]
    assert code == 1 and result["first_divergent_layer"] == layers - 1, result["failures"]
    assert result["first_divergent_block"] == "feed-forward norm"


def test_too_few_judged_tokens_fail():
    from dllm_trt.parity.per_layer import PerLayerResult

    result = PerLayerResult("float32", ["encoder pass"], tokens=10, judged_tokens=8, layers=[])
    assert any("only 8 of 10 token-layers could be judged" in f for f in result.failures())
    result.judged_tokens = 9
    assert result.passed


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(("--canvas", "0"), "--canvas must be a positive integer"), (("--backend", "torch"), "drop --backend")],
)
def test_per_layer_bad_input(capsys, tiny_ckpt, tiny_export, tmp_path, extra, fragment):
    code = main(["validate", str(tiny_export), "--reference", str(tiny_ckpt), "--per-layer", *extra,
                 "--report", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_export_checks_a_checkpoint_above_the_limit_layer_by_layer(capsys, tiny_ckpt, tmp_path):
    """Export's own parity uses the per-layer check when the checkpoint is too big for one session; inspect says so."""
    from dllm_trt import export

    result = export.run(export.ExportOptions(tiny_ckpt, tmp_path / "onnx", per_layer_parity_above=0, quiet=True))
    parity = result.manifest["parity"]
    assert result.parity_failed is None and parity["mode"] == "per-layer" and parity["passed"]
    assert parity["first_divergent_layer"] is None and len(parity["layers"]) == 3  # 2 layers and the head
    assert main(["inspect", str(tmp_path / "onnx")]) == 0
    assert "parity passed, layer by layer (float32): every layer within its bound" in capsys.readouterr().out
