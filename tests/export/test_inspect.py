"""`dllm-trt inspect`: checksums verified file by file, a graph summary, exit 1 naming a bad file."""

import shutil

import pytest

from dllm_trt.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def artifacts(tiny_export, tmp_path):
    return shutil.copytree(tiny_export, tmp_path / "onnx")


def test_inspect_verifies_and_summarizes(capsys, artifacts):
    code, out, err = run_cli(capsys, "inspect", artifacts)
    assert code == 0, err
    assert "checksums: 3/3 file(s) verified" in out
    assert "checkpoint sha256:" in out
    assert "input_ids" in out and "dynamic 0: batch, 1: new_tokens" in out  # inputs with their dynamic axes
    assert "ops    " in out and "MatMul" in out  # node counts by op type
    assert "external data" in out and "parity not measured" in out


def test_inspect_names_a_corrupted_file(capsys, artifacts):
    data = artifacts / "step.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, out, err = run_cli(capsys, "inspect", artifacts)
    assert code == 1
    assert "checksum mismatch: step.onnx.data" in err
    assert "self_conditioning.onnx" not in err


def test_inspect_names_a_missing_file(capsys, artifacts):
    (artifacts / "step.onnx.data").unlink()
    code, _, err = run_cli(capsys, "inspect", artifacts)
    assert code == 1 and "step.onnx.data: missing" in err


def test_inspect_refuses_a_directory_without_manifest(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 2 and "manifest.json" in err
