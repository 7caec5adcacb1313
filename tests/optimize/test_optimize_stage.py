"""`dllm-trt optimize` end to end on the tiny export: every layer fused, every pass proven, still token-exact."""

import json

import onnx
import pytest
import torch

from dllm_trt import optimize
from dllm_trt.cli import main
from dllm_trt.generation.loop import GenerationSettings, generate, left_pad
from dllm_trt.generation.step import OnnxRuntimeStep
from dllm_trt.models.checkpoint import load_model
from dllm_trt.parity.generation_parity import reference_generate

FUSED_OPS = {"trt": "dllm_trt.DllmMoE", "ort-cuda": "com.microsoft.MoE", "ort-cpu": "dllm_trt.RoutedMoE"}


@pytest.fixture(scope="module")
def optimized(tiny_export, tmp_path_factory):
    out = {}
    for target in ("trt", "ort-cuda", "ort-cpu"):
        path = tmp_path_factory.mktemp(target) / "opt"
        optimize.run(optimize.OptimizeOptions(tiny_export, path, target, "fp32", parity="each", quiet=True))
        out[target] = path
    return out


@pytest.mark.parametrize("target", ["trt", "ort-cuda", "ort-cpu"])
def test_every_layer_fused_and_every_pass_proven(optimized, target):
    manifest = json.loads((optimized[target] / "manifest.json").read_text())
    report = json.loads((optimized[target] / "fusion_report.json").read_text())
    layers = len(manifest["model"]["layers"])
    matched = {p["name"]: p["matched"] for p in manifest["passes"]}
    assert matched["fuse_attention"] == matched["fuse_moe"] == {"step": layers}
    assert matched["add_sampling_head"] == {"step": 1}
    for entry in report["passes"]:
        assert entry["parity"]["measured"] and entry["parity"]["passed"], (entry["name"], entry["parity"])
    step_ops = report["passes"][-1]["graphs"]["step"]["ops_after"]
    # fp32 attention has no fused TensorRT kernel: the trt target gives every layer's to the DllmAttention plugin
    attention = "dllm_trt.DllmAttention" if target == "trt" else "Attention"
    assert step_ops[attention] == layers and step_ops[FUSED_OPS[target]] == layers
    assert "ReduceMean" not in step_ops  # norms all fused
    # routers all fused: the only TopKs left are the ort-cpu sampling head's two argmaxes
    assert step_ops.get("TopK", 0) == (2 if target == "ort-cpu" else 0)
    assert "logits" not in {o["name"] for o in manifest["graphs"]["step"]["outputs"]}
    assert (optimized[target] / "fusion_report.md").read_text().startswith("# dllm-trt optimize")
    fusions = manifest["fusions"]
    assert set(fusions) == {"rms_norm", "rotary_embedding", "attention", "moe", "sampling_head"}
    assert all(f["expected"] == f["fused"] and not f["misses"] for f in fusions.values()), fusions


@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_quantized_optimize_passes_as_the_readme_writes_it(tiny_export, tmp_path, capsys, precision):
    """Every pass judged, the quantized ones against transformers with the weights the graph stores."""
    out = tmp_path / precision
    code = main(["optimize", str(tiny_export), "--target", "trt", "--precision", precision, "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    passes = {p["name"]: p["parity"] for p in json.loads((out / "manifest.json").read_text())["passes"]}
    quantized = passes["quantize_weights"]
    print(precision, {name: (p["judged"], p["worst_max_rel"]) for name, p in passes.items()})
    assert quantized["judged"] and quantized["passed"] and quantized["worst_max_rel"] < 1e-4
    assert passes["convert_precision"]["measured"] and not passes["convert_precision"]["judged"]


@pytest.mark.parametrize("seed", [0, 3])
def test_optimized_ort_cpu_graphs_stay_token_exact(optimized, tiny_ckpt, seed):
    model = load_model(tiny_ckpt)
    settings = GenerationSettings.from_generation_config(model.generation_config.to_dict(), max_new_tokens=24)
    ids, mask = left_pad([[5, 17, 42, 8, 9, 10, 11], [7, 8]], 0)
    expected, _ = reference_generate(model, ids, mask, settings, seed)
    ours = generate(OnnxRuntimeStep.from_artifacts(optimized["ort-cpu"]), settings, ids, mask, seed=seed)
    assert torch.equal(ours.sequences, expected.sequences)


def test_lint_trt_passes_on_the_optimized_trt_graphs(capsys, optimized):
    assert main(["lint-trt", str(optimized["trt"])]) == 0, capsys.readouterr().out


def test_reduced_precision_is_measured_and_reported(tiny_export, tmp_path):
    options = optimize.OptimizeOptions(tiny_export, tmp_path / "fp16", "ort-cpu", "fp16", parity="final", quiet=True)
    manifest = optimize.run(options).manifest
    last = manifest["passes"][-1]
    assert last["name"] == "convert_precision" and last["parity"]["measured"] and not last["parity"]["judged"]
    assert manifest["model"]["dtype"] == "float16"
    inputs = {i["name"]: i["dtype"] for i in manifest["graphs"]["step"]["inputs"]}
    assert inputs["self_conditioning"] == "float16" and inputs["sampling_noise"] == "float32"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--target", "tpu"], "unknown target"),
        (["--target", "trt", "--precision", "int3"], "unknown precision"),
    ],
)
def test_bad_options(capsys, tiny_export, tmp_path, argv, fragment):
    code = main(["optimize", str(tiny_export), "-o", str(tmp_path / "o"), *argv])
    assert code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_not_an_export_directory(capsys, tmp_path):
    (tmp_path / "x").mkdir()
    code = main(["optimize", str(tmp_path / "x"), "-o", str(tmp_path / "o"), "--target", "trt"])
    assert code == 2 and "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["trt", "ort-cuda", "ort-cpu"])
def test_every_weight_keeps_its_checkpoint_name(optimized, tiny_ckpt, target):
    """Through every pass: a weight's name is its checkpoint tensor's, with a suffix where the layout or the
    dtype changed (`.T`, `.bfloat16`, a layout a fused op wants)."""
    import re

    from safetensors import safe_open

    names = set()
    for path in tiny_ckpt.glob("*.safetensors"):
        with safe_open(path, "np") as f:
            names |= set(f.keys())
    model = onnx.load(str(optimized[target] / "step.onnx"), load_external_data=False)
    weights = [init.name for init in model.graph.initializer if len(init.dims) >= 2]
    unnamed = [w for w in weights if not any(re.fullmatch(re.escape(n) + r"(\.[A-Za-z0-9_]+)*", w) for n in names)]
    assert weights and not unnamed, unnamed


def test_a_step_left_in_logits_form_keeps_a_self_conditioning_graph_of_its_own(tiny_export, tiny_ckpt, tmp_path):
    """Without the sampling head the runtime needs the export's self-conditioning graph; the export's reads the
    embedding from the step's data file, which the optimized step replaces, so it gets its own, and stays exact."""
    from dllm_trt.optimize.pipeline import PIPELINE

    passes = tuple(p for p in PIPELINE if p.name != "add_sampling_head")
    out = tmp_path / "logits-form"
    optimize.run(
        # generation below judges it
        optimize.OptimizeOptions(tiny_export, out, "ort-cpu", "fp32", parity="none", quiet=True, passes=passes)
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["file"] for e in manifest["graphs"]["self_conditioning"]["external_data"]] == [
        "self_conditioning.onnx.data"
    ]
    model = load_model(tiny_ckpt)
    settings = GenerationSettings.from_generation_config(model.generation_config.to_dict(), max_new_tokens=16)
    ids, mask = left_pad([[5, 17, 42, 8, 9], [7, 8]], 0)
    expected, _ = reference_generate(model, ids, mask, settings, 1)
    ours = generate(OnnxRuntimeStep.from_artifacts(out), settings, ids, mask, seed=1)
    assert torch.equal(ours.sequences, expected.sequences)
