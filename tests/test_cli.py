"""The command line as a user meets it: one-line errors, exit codes, nothing half-written."""

import shutil

import pytest

from dllm_trt.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err, fragment):
    lines = [line for line in err.splitlines() if line.startswith("dllm-trt")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_make_tiny_and_export(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "make-tiny", tmp_path / "ck", "--seed", "4")
    assert code == 0 and "tiny checkpoint" in out
    code, out, err = run_cli(capsys, "export", tmp_path / "ck", "-o", tmp_path / "onnx")
    assert code == 0, err
    assert "[6/6]" in err and "within tolerance" in err  # progress and parity are shown
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == [
        "self_conditioning.onnx",
        "step.onnx",
    ]


@pytest.mark.parametrize(
    "breakage, fragment",
    [
        ("missing", "does not exist"),
        ("config", "not DiffusionGemma"),
        ("truncated", "truncated"),
    ],
)
def test_bad_checkpoint_gives_one_line_and_no_output(capsys, tmp_path, tiny_ckpt, breakage, fragment):
    ck = tmp_path / "ck"
    if breakage != "missing":
        shutil.copytree(tiny_ckpt, ck)
    if breakage == "config":
        (ck / "config.json").write_text('{"model_type": "bert"}')
    if breakage == "truncated":
        data = (ck / "model.safetensors").read_bytes()
        (ck / "model.safetensors").write_bytes(data[:-100])
    code, _, err = run_cli(capsys, "export", ck, "-o", tmp_path / "onnx")
    assert code == 2
    assert_one_line_error(err, fragment)
    assert not (tmp_path / "onnx").exists()
    assert not list(tmp_path.glob(".onnx.tmp-*"))


def test_unknown_preset(capsys, tmp_path):
    code, _, err = run_cli(capsys, "make-tiny", tmp_path / "ck", "--preset", "huge")
    assert code == 2
    assert_one_line_error(err, "unknown preset")
    assert not (tmp_path / "ck").exists()
