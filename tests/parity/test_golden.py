"""Golden files judged by stock Polygraphy, not by dllm-trt: `polygraphy run` (a subprocess) passes the fp32 export
and the ort-cpu graphs, fails copies with one layer's norm weight 5% off and names that layer's output as the first
mismatch; a bf16 graph's files, read back by Polygraphy, judge it as TensorRT's runner would hand its outputs over."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import torch
from perturb import scaled_copy
from polygraphy_cli import polygraphy, polygraphy_env

from dllm_trt.contract import GOLDEN_DIR, GOLDEN_INFO, GOLDEN_INPUTS, GOLDEN_LAYERS, GOLDEN_OUTPUTS, STEP_FILE
from dllm_trt.parity.golden import GoldenOptions, write_golden
from dllm_trt.parity.prompts import default_prompts

PERTURBED = "model.decoder.layers.0.post_attention_layernorm.weight"  # x1.05: layer 0's output departs


def _golden(artifacts: Path, reference: Path, out: Path) -> dict:
    return write_golden(GoldenOptions(artifacts, reference, default_prompts(512, 0), seed=0), out)


def _beside(artifacts: Path, golden: Path, out: Path, perturb: bool) -> Path:
    """A copy of `artifacts` (one norm weight x1.05 when `perturb`) with the golden folder beside its graph."""
    if perturb:
        scaled_copy(artifacts, out, PERTURBED, 1.05)
    else:
        shutil.copytree(artifacts, out)
    shutil.copytree(golden, out / GOLDEN_DIR)
    return out


def _mismatches(output: str) -> list[list[str]]:
    """Per failing call, the outputs Polygraphy lists as mismatched, in its order."""
    return [re.findall(r"'([^']+)'", line) for line in re.findall(r"Mismatched outputs: \[([^\]]*)\]", output)]


@pytest.fixture(scope="module")
def ort_cpu(tiny_export, tmp_path_factory) -> Path:
    from dllm_trt import optimize

    out = tmp_path_factory.mktemp("golden-ort-cpu") / "cpu"
    optimize.run(optimize.OptimizeOptions(tiny_export, out, "ort-cpu", "fp32", parity="none", quiet=True))
    return out


@pytest.fixture(scope="module")
def export_golden(tiny_ckpt, tiny_export, tmp_path_factory) -> tuple[Path, dict]:
    """The fp32 export's golden folder and what golden.json holds."""
    out = tmp_path_factory.mktemp("golden-export") / GOLDEN_DIR
    return out, _golden(tiny_export, tiny_ckpt, out)


def test_stock_polygraphy_passes_the_graphs_and_names_the_first_bad_layer(
    tiny_ckpt, tiny_export, ort_cpu, export_golden, tmp_path
):
    """Each graph exits 0 as it is and 1 with the norm weight 5% off; the README's two commands split between the
    graphs to keep the subprocesses few (CI's .ci/run runs both on both, from a real install)."""
    runs = {("export", "onnx"): tiny_export, ("ort-cpu", "onnx_layers"): ort_cpu}
    goldens = {"export": export_golden[0], "ort-cpu": tmp_path / GOLDEN_DIR}
    infos, where = {"export": export_golden[1], "ort-cpu": _golden(ort_cpu, tiny_ckpt, goldens["ort-cpu"])}, {}
    for (name, command), artifacts in runs.items():
        assert set(infos[name]["commands"]) == {"onnx", "onnx_layers"}  # both run on this CPU as they are
        for perturb in (False, True):
            where[(name, command, perturb)] = _beside(artifacts, goldens[name], tmp_path / f"{name}-{perturb}", perturb)
    env = polygraphy_env(tmp_path / "site")

    def run(key):  # noqa: ANN001, ANN202
        name, command, _ = key
        return polygraphy(infos[name]["commands"][command], env, cwd=where[key])

    with ThreadPoolExecutor(max_workers=2) as pool:  # each run is mostly its interpreter starting
        results = dict(zip(where, pool.map(run, where)))
    for (name, command, perturb), result in results.items():
        assert result.returncode == int(perturb), f"{name} perturbed={perturb} {command}:\n{result.stdout[-3000:]}"
        assert "onnxrt-runner" in result.stdout and "vs. transformers" in result.stdout
        mismatches = _mismatches(result.stdout)
        assert bool(mismatches) == perturb, result.stdout[-2000:]
        if perturb and command == "onnx_layers":
            layer0 = infos[name]["layers"][1]
            assert layer0["holds"] == "layer 0's output"
            assert len(mismatches) == 3 and all(m[0] == layer0["name"] for m in mismatches), mismatches
            print(f"{name}, {PERTURBED} x1.05: {layer0['name']} ({layer0['holds']}) first mismatch in every call")
    print({key: result.returncode for key, result in results.items()})


def test_golden_files_hold_transformers_outputs_under_the_graphs_names(tiny_export, export_golden):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    golden, info = export_golden
    graph = onnx.load(str(tiny_export / STEP_FILE), load_external_data=False).graph
    feeds = load_json(str(golden / GOLDEN_INPUTS))
    assert [c["kind"] for c in info["calls"]] == ["encode", "denoise", "denoise"] and len(feeds) == 3
    assert all(set(feed) == {i.name for i in graph.input} for feed in feeds)
    assert feeds[0]["self_conditioning"].shape[1] == 0 and feeds[1]["self_conditioning"].shape[1] > 0  # the phases
    results = RunResults.load(str(golden / GOLDEN_OUTPUTS))
    [(runner, iterations)] = list(results)
    assert runner == "transformers" and len(iterations) == 3
    assert set(iterations[0]) == {f"{kind}.{i}" for i in range(2) for kind in ("key", "value")}
    assert set(iterations[1]) == set(iterations[2]) == {"logits"}
    layers = RunResults.load(str(golden / GOLDEN_LAYERS))
    names = [layer["name"] for layer in info["layers"]]
    assert all(list(it) == names for _, its in layers for it in its) and len(names) == 3  # entering 0, 1, the norm
    tolerance = info["outputs"][GOLDEN_OUTPUTS]["logits"]
    assert tolerance["check_error_stat"] == "max" and tolerance["rtol"] == 0
    assert 1e-4 * tolerance["scale"] <= tolerance["atol"] <= 1.1e-4 * tolerance["scale"]
    assert json.loads((golden / GOLDEN_INFO).read_text())["commands"] == info["commands"]
    assert "polygraphy run step.onnx --onnxrt" in (golden / "README.md").read_text()


def test_bf16_golden_files_judge_the_graph_as_tensorrts_runner_hands_its_outputs(tiny_ckpt, tiny_trt, tmp_path):
    """What `polygraphy run step.engine --trt` compares, short of the engine: the bf16 graph emulated on this CPU
    (bf16 storage rounding, the MoE plugin's stand-in), its outputs as the bf16 torch tensors TensorRT's runner
    returns, judged by Polygraphy's own comparator with the files' tolerances (from the envelope)."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import load_json

    from dllm_trt.generation.cpu_variant import write_cpu_variant
    from dllm_trt.generation.ort_session import open_session, run

    artifacts = tiny_trt["bf16"]
    info = _golden(artifacts, tiny_ckpt, tmp_path / GOLDEN_DIR)
    assert set(info["commands"]) == {"engine", "gpu_layers"} and info["envelope"] == "transformers in bfloat16"
    feeds = load_json(str(tmp_path / GOLDEN_DIR / GOLDEN_INPUTS))  # as Polygraphy reads them back
    assert feeds[1]["past_key.0"].dtype == torch.bfloat16 and feeds[1]["sampling_noise"].dtype.name == "float32"
    names = [layer["name"] for layer in info["layers"]]
    verdicts = {}
    for perturb in (False, True):
        source = scaled_copy(artifacts, tmp_path / "bad", PERTURBED, 1.05) if perturb else artifacts
        with tempfile.TemporaryDirectory() as variant:
            write_cpu_variant(source, Path(variant))
            model = onnx.load(str(Path(variant) / STEP_FILE))
            model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
            onnx.save(model, str(Path(variant) / "marked.onnx"), save_as_external_data=True, location="marked.data")
            session = open_session(Path(variant) / "marked.onnx")
            ours = []
            for feed in feeds:
                out = run(session, {k: torch.as_tensor(v).float() if v.dtype != torch.bool else v for k, v in
                                    ((k, torch.as_tensor(v)) for k, v in feed.items())})  # fmt: skip
                ours.append({k: v.to(torch.bfloat16) if v.is_floating_point() and k != "entropy" else v
                             for k, v in out.items()})  # fmt: skip
            del session
        for file in (GOLDEN_OUTPUTS, GOLDEN_LAYERS):
            results = RunResults([("emulated", [IterationResult(o, runner_name="emulated") for o in ours])])
            results.extend(RunResults.load(str(tmp_path / GOLDEN_DIR / file)))
            tolerance = info["outputs"][file]
            compare = SimpleCompareFunc(
                atol={n: t["atol"] for n, t in tolerance.items()}, rtol={n: t["rtol"] for n, t in tolerance.items()},
                check_error_stat={n: t["check_error_stat"] for n, t in tolerance.items()},
            )  # fmt: skip
            accuracy = Comparator.compare_accuracy(results, compare_func=compare)
            verdicts[(perturb, file)] = bool(accuracy)
            if perturb and file == GOLDEN_LAYERS:
                failing = [[name for name in names if name in it and not it[name]] for it in _iterations(accuracy)]
                assert all(f and f[0] == names[1] for f in failing[1:]), failing  # layer 0's output, first
    assert verdicts == {(False, GOLDEN_OUTPUTS): True, (False, GOLDEN_LAYERS): True,
                        (True, GOLDEN_OUTPUTS): False, (True, GOLDEN_LAYERS): False}  # fmt: skip


def _iterations(accuracy) -> list[dict]:  # noqa: ANN001 (polygraphy AccuracyResults)
    """Per call, output name -> matched, from Polygraphy's accuracy result of one comparison."""
    [result] = list(accuracy)
    [(_, iterations)] = list(result.items())
    return [dict(iteration) for iteration in iterations]


def test_tolerances_fp32_bound_or_twice_the_envelopes_median_error():
    from dllm_trt.parity.golden import tolerances

    reference = [{"x": torch.tensor([1.0, -4.0, 2.0])}, {"x": torch.tensor([3.0])}]
    strict = tolerances(reference, None)["x"]
    assert (strict.statistic, strict.rtol, strict.atol, strict.scale) == ("max", 0.0, 0.0004, 4.0)  # 1e-4 of |4|
    envelope = [{"x": torch.tensor([1.01, -4.005, 2.02])}, {"x": torch.tensor([3.003])}]
    measured = tolerances(reference, envelope)["x"]
    assert measured.statistic == "median" and measured.envelope == pytest.approx(0.01, rel=1e-3)  # call 1's median
    assert measured.atol == 0.02  # 2x the larger of the calls' medians, rounded up to two digits
    tiny = tolerances(reference, reference)["x"]
    assert tiny.atol == 0.0004 and tiny.envelope == 0.0  # never tighter than fp32's bound
