"""Every verb on every artifact the project writes, in every precision: it runs, or it refuses in one line.

The matrix is verbs x artifacts; a new verb, target or precision joins it by being added to VERBS,
TARGETS or PRECISIONS. A cell is one CLI call on a tiny config. "ran" means exit 0 (validate's
included: an honest artifact must pass); "refused" means exit 2 with one line saying why. An
exception (exit 3) or a failed validation of an honest artifact fails the cell.
"""

from __future__ import annotations

import pytest

from dllm_trt.cli import main
from dllm_trt.contract import PRECISIONS, TARGETS

EXPORTS = ("export-float32", "export-bfloat16")
ARTIFACTS = EXPORTS + tuple(f"optimize-{t}-{p}" for t in TARGETS for p in PRECISIONS)
VERBS = ("inspect", "generate", "validate", "lint-trt", "build-dry-run")


def expected(verb: str, artifact: str) -> str:
    """What the cell must do: TensorRT verbs take only 'optimize --target trt' output."""
    if verb in ("lint-trt", "build-dry-run") and not artifact.startswith("optimize-trt-"):
        return "refused"
    return "ran"


@pytest.fixture(scope="module")
def artifacts(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    made = {}
    for artifact in EXPORTS:
        made[artifact] = root / artifact
        dtype = artifact.split("-")[1]
        assert main(["export", str(tiny_ckpt), "-o", str(made[artifact]), "--dtype", dtype, "--no-parity"]) == 0
    for target in TARGETS:
        for precision in PRECISIONS:
            name = f"optimize-{target}-{precision}"
            made[name] = root / name
            argv = ["optimize", str(made["export-float32"]), "--target", target, "--precision", precision]
            assert main([*argv, "-o", str(made[name]), "--parity", "none"]) == 0, name
    return made


def _argv(verb: str, path, tiny_ckpt, tmp_path) -> list[str]:  # noqa: ANN001
    return {
        "inspect": ["inspect", path],
        "generate": ["generate", path, "--prompt-ids", "5,17,42", "--prompt-ids", "9", "--max-new-tokens", "8"],
        "validate": ["validate", path, "--reference", tiny_ckpt, "--seeds", "0", "--max-new-tokens", "8"],
        "lint-trt": ["lint-trt", path],
        "build-dry-run": ["build", path, "--gpu", "h100", "-o", tmp_path / "engines", "--dry-run"],
    }[verb]


@pytest.mark.parametrize("artifact", ARTIFACTS)
@pytest.mark.parametrize("verb", VERBS)
def test_every_cell_runs_or_refuses_in_one_line(verb, artifact, artifacts, tiny_ckpt, tmp_path, capsys):
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
