import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from perturb import scaled_copy

from dllm_trt.cli import main
from dllm_trt.generation.loop import GenerationSettings, left_pad
from dllm_trt.models.checkpoint import load_model
from dllm_trt.parity.generation_parity import reference_generate


def test_validate_passes_and_writes_reports(capsys, tiny_ckpt, tiny_export, tmp_path):
    code = main(["validate", str(tiny_export), "--reference", str(tiny_ckpt), "--report", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["passed"] and report["generation"]["calls_replayed"] > 10
    assert all(run["token_agreement"] == 1.0 for run in report["generation"]["end_to_end"])
    assert "| check |" in (tmp_path / "r" / "report.md").read_text()
    golden = json.loads((tmp_path / "r" / "golden" / "golden.json").read_text())  # for stock polygraphy run
    assert set(golden["commands"]) == {"onnx", "onnx_layers"} and golden["artifacts"] == str(tiny_export)
    assert not (tmp_path / "r" / "golden" / "inputs.json").is_symlink() and not list((tmp_path / "r").glob(".golden*"))


def test_validate_fails_on_a_tampered_graph(capsys, tiny_ckpt, tiny_export, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_export, tampered)
    model = onnx.load(str(tampered / "step.onnx"))
    # one expert's down projection in the last layer, 2% larger: a plausible silent corruption
    down = next(init for init in model.graph.initializer if tuple(init.dims) in {(8, 64, 32), (8, 32, 64)})
    array = numpy_helper.to_array(down).copy()
    array[3] *= np.float32(1.02)
    down.CopyFrom(numpy_helper.from_array(array, down.name))
    for path in tampered.glob("step*.onnx*"):
        path.unlink()
    onnx.save(model, str(tampered / "step.onnx"), save_as_external_data=True, location="step.onnx.data")
    code = main(["validate", str(tampered), "--reference", str(tiny_ckpt), "--seeds", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert "validation failed" in err and "denoise first step logits" in err


def test_validate_refuses_another_checkpoint(capsys, tiny_export, tmp_path):
    from dllm_trt.models.presets import make_checkpoint

    make_checkpoint(tmp_path / "other", "tiny", seed=9)
    code = main(["validate", str(tiny_export), "--reference", str(tmp_path / "other")])
    assert code == 2
    assert "validate against the checkpoint it was exported from" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 4])
def test_generate_json_equals_reference(capsys, tiny_ckpt, tiny_export, seed):
    code = main([
        "generate", str(tiny_export), "--prompt-ids", "5,17,42,9", "--prompt-ids", "8,3", "--max-new-tokens", "16",
        "--seed", str(seed), "--json",
    ])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    model = load_model(tiny_ckpt)
    settings = GenerationSettings.from_generation_config(model.generation_config.to_dict(), max_new_tokens=16)
    ids, mask = left_pad([[5, 17, 42, 9], [8, 3]], 0)
    expected, _ = reference_generate(model, ids, mask, settings, seed)
    assert torch.equal(torch.tensor(out["sequences"]), expected.sequences)
    assert out["canvases"] == 2 and out["tokens_per_second"] > 0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt-ids", "5,x"], "comma-separated integers"),
        (["--prompt-ids", "5,99999"], "outside the vocabulary"),
        (["--prompt", "hello"], "no tokenizer.json"),
        ([], "no prompt"),
        (["--prompt-ids", "5", "--backend", "magic"], "unknown backend"),
    ],
)
def test_generate_bad_input(capsys, tiny_export, argv, fragment):
    code = main(["generate", str(tiny_export), *argv])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_router_probe_calls_ties_by_margin_and_ignores_padding(tiny_ckpt):
    from dllm_trt.parity.generation_parity import NEAR_TIE_ULPS, RouterTieProbe

    model = load_model(tiny_ckpt)
    probe = RouterTieProbe(model)
    try:
        top_k = model.config.text_config.top_k_experts
        hook = probe._hook(top_k)
        eps = torch.finfo(torch.float32).eps
        probs = torch.full((3, 8), 0.01)
        probs[:, :top_k] = 0.3  # rows 0-1: the k-th and (k+1)-th far apart
        probs[2, top_k] = 0.3 * (1 - eps)  # row 2: one ulp below the k-th
        hook(None, None, (probs[:2],))
        far = probe.take()
        assert far > 0.5 and not probe.tied(far)
        hook(None, None, (probs,))
        near = probe.take()
        assert 0 < near <= NEAR_TIE_ULPS * eps and probe.tied(near)
        probe.rows = torch.tensor([True, True, False])  # row 2 is padding: its tie does not count
        hook(None, None, (probs,))
        assert probe.take() == far
        assert probe.take() == 1.0  # nothing ran since the last take
    finally:
        probe.close()


def test_reduced_precision_is_judged_against_the_envelope(capsys, tiny_ckpt, tiny_export, tmp_path):
    """An honest bf16 graph passes within the envelope (transformers in bf16 against its fp32 self); the
    same graph with one layer's norm weights 5% off fails, naming the quantities beyond it."""
    from dllm_trt import optimize

    honest = tmp_path / "bf16"
    # validate judges it below
    optimize.run(optimize.OptimizeOptions(tiny_export, honest, "ort-cpu", "bf16", parity="none", quiet=True))
    argv = ["validate", str(honest), "--reference", str(tiny_ckpt), "--report", str(tmp_path / "r"), "--no-golden"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    verdicts = report["generation"]["envelope_verdicts"]
    assert report["generation"]["envelope"] and {v["quantity"] for v in verdicts} >= {
        "encode key/value", "denoise entropy", "denoise next self-conditioning", "denoise argmax",
    }  # fmt: skip
    assert all(v["passed"] and v["entries"] > 0 for v in verdicts)
    assert "bf16 emulated in fp32" in report["execution"]

    weight = "model.decoder.layers.0.post_attention_layernorm.weight"
    broken = scaled_copy(honest, tmp_path / "broken", weight, 1.05)
    code = main(["validate", str(broken), "--reference", str(tiny_ckpt)])
    err = capsys.readouterr().err
    assert code == 1 and "FAIL denoise" in err, err


def test_too_few_judged_calls_fail():
    """Calls with an fp32 router tie are reported, not judged; when fewer than 90% are judged, fail."""
    from dllm_trt.parity.compare import Tolerance, compare
    from dllm_trt.parity.generation_parity import MIN_JUDGED_SHARE, GenerationParity, StepRecord

    ok = compare("logits", torch.ones(2, 3), torch.ones(2, 3), Tolerance(1e-4, 1.0), argmax=True)
    parity = GenerationParity("float32", [0], [3], 8, 1e-7)
    parity.steps = [StepRecord("denoise", 0, i, [ok], router_tie=i < 2) for i in range(10)]
    assert parity.judged == 8 and parity.judged < MIN_JUDGED_SHARE * len(parity.steps)
    assert any("only 8 of 10 replayed calls could be judged" in f for f in parity.failures())
    parity.steps[0].router_tie = False
    assert not any("could be judged" in f for f in parity.failures())
