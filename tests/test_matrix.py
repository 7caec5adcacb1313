"""Every verb on every artifact the project writes, in every precision: it runs, or it refuses in one line.

The matrix is verbs x artifacts; a new verb, target or precision joins it by being added to VERBS,
TARGETS or PRECISIONS. A cell is one CLI call on a tiny config. "ran" means exit 0 (validate's
included: an honest artifact must pass); "refused" means exit 2 with one line saying why. An
exception (exit 3) or a failed validation of an honest artifact fails the cell. Engines are built
by TensorRT for RTX for DGX Spark (ahead of time, here) where it is installed; running them needs
that GPU, so on this machine every verb but inspect refuses them.

Quantized precisions (fp8, nvfp4) exist for the trt target only: optimizing for another target is
a refused cell of its own. validate judges them against the reference quantized the same way, so an
honest quantized artifact must pass like any other.
"""

from __future__ import annotations

import pytest

from dllm_trt.cli import main
from dllm_trt.contract import PRECISIONS, QUANTIZED_PRECISIONS, QUANTIZED_TARGETS, TARGETS
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

EXPORTS = ("export-float32", "export-bfloat16")
COMBINATIONS = [(t, p) for t in TARGETS for p in PRECISIONS]
OPTIMIZED = tuple(
    f"optimize-{t}-{p}" for t, p in COMBINATIONS if p not in QUANTIZED_PRECISIONS or t in QUANTIZED_TARGETS
)
NOT_OPTIMIZED = [(t, p) for t, p in COMBINATIONS if f"optimize-{t}-{p}" not in OPTIMIZED]
ENGINES = tuple(f"engines-{p}" for p in PRECISIONS) if installed(TENSORRT_RTX) else ()
ARTIFACTS = EXPORTS + OPTIMIZED + ENGINES
VERBS = ("inspect", "generate", "validate", "lint-trt", "build-dry-run", "build", "triton-repo")
ENGINE_GPU = "dgx-spark"


def expected(verb: str, artifact: str) -> str:
    """What the cell must do: TensorRT verbs take only 'optimize --target trt' output; engines run on their GPU."""
    if verb in ("lint-trt", "build-dry-run", "build"):
        return "ran" if artifact.startswith("optimize-trt-") else "refused"
    if verb == "triton-repo":  # a Triton model takes text: the tiny checkpoint has no tokenizer
        return "refused"
    if artifact.startswith("engines-"):
        return "ran" if verb == "inspect" else "refused"
    return "ran"


@pytest.fixture(scope="module")
def artifacts(tiny_export, tiny_export_bf16, tiny_trt, tiny_trt_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    # the session's artifacts of the tiny checkpoint, made without parity: the validate cells judge them
    made = {"export-float32": tiny_export, "export-bfloat16": tiny_export_bf16, "optimize-trt-fp32": tiny_trt_fp32}
    made |= {f"optimize-trt-{precision}": path for precision, path in tiny_trt.items()}
    # --parity none below: every artifact is judged by the validate cells of the matrix itself
    for name in (n for n in OPTIMIZED if n not in made):
        target, precision = name.removeprefix("optimize-").rsplit("-", 1)
        made[name] = root / name
        argv = ["optimize", str(made["export-float32"]), "--target", target, "--precision", precision]
        assert main([*argv, "-o", str(made[name]), "--parity", "none"]) == 0, name
    for name in ENGINES:  # the build cells of the trt artifacts: one CLI call each, made once here
        made[name] = root / name
        made[f"build {name}"] = main(["build", str(made[f"optimize-trt-{name.split('-')[1]}"]), "--gpu", ENGINE_GPU,
                                      "-o", str(made[name])])  # fmt: skip
    return made


def _argv(verb: str, path, tiny_ckpt, tmp_path) -> list[str]:  # noqa: ANN001
    return {
        "inspect": ["inspect", path],
        "generate": ["generate", path, "--prompt-ids", "5,17,42", "--prompt-ids", "9", "--max-new-tokens", "8"],
        "validate": ["validate", path, "--reference", tiny_ckpt, "--seeds", "0", "--max-new-tokens", "8"],
        "lint-trt": ["lint-trt", path],
        "build-dry-run": ["build", path, "--gpu", "h100", "-o", tmp_path / "engines", "--dry-run"],
        "build": ["build", path, "--gpu", ENGINE_GPU, "-o", tmp_path / "engines"],
        "triton-repo": ["triton-repo", path, "-o", tmp_path / "repo"],
    }[verb]


@pytest.mark.parametrize("artifact", ARTIFACTS)
@pytest.mark.parametrize("verb", VERBS)
def test_every_cell_runs_or_refuses_in_one_line(verb, artifact, artifacts, tiny_ckpt, tmp_path, capsys):
    if verb == "build" and artifact.startswith("optimize-trt-"):
        if not ENGINES:
            pytest.skip("TensorRT for RTX is not installed (the rtx extra): no engine can be built here")
        code = artifacts[f"build engines-{artifact.split('-')[2]}"]  # the fixture's build of this artifact
        assert code == 0 and (artifacts[f"engines-{artifact.split('-')[2]}"] / "build_info.json").is_file()
        return
    code = main([str(a) for a in _argv(verb, artifacts[artifact], tiny_ckpt, tmp_path)])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("dllm-trt:")]
    want = expected(verb, artifact)
    if want == "ran":
        assert code == 0, f"{verb} on {artifact}: exit {code}\n{captured.err[-2000:]}\n{captured.out[-2000:]}"
    else:
        assert code == 2 and len(errors) == 1 and errors[0].startswith("dllm-trt: error: "), captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "engines").exists()  # a dry run or a refusal writes nothing
    assert want == "ran" or not (tmp_path / "repo").exists()
    assert code != 0 or verb != "build"  # builds of trt artifacts are the fixture's


@pytest.mark.parametrize("target, precision", NOT_OPTIMIZED)
def test_quantized_precisions_for_other_targets_are_refused_in_one_line(target, precision, tiny_export, tmp_path,
                                                                          capsys):  # fmt: skip
    argv = ["optimize", str(tiny_export), "--target", target, "--precision", precision, "-o", str(tmp_path / "o")]
    assert main([*argv, "--parity", "none"]) == 2  # refused before any parity could run
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dllm-trt:")]
    assert len(errors) == 1 and f"--precision {precision} quantizes the experts" in errors[0]
    assert not (tmp_path / "o").exists()
