import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from dllm_trt.errors import DllmError
from dllm_trt.models.checkpoint import load_model, read_config, safetensors_files


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(DllmError, match="does not exist"):
        read_config(tmp_path / "nope")


def test_not_diffusion_gemma(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    config["model_type"] = "llama"
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmError, match="not DiffusionGemma"):
        read_config(ck)


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DllmError, match="truncated"):
        safetensors_files(ck)


def test_corrupt_header(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(DllmError, match="not a valid safetensors"):
        safetensors_files(ck)


def test_pickle_checkpoint_is_refused(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    (ck / "model.safetensors").rename(ck / "pytorch_model.bin")
    with pytest.raises(DllmError, match="pickle files are not loaded"):
        safetensors_files(ck)


def test_missing_tensor(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    tensors = load_file(ck / "model.safetensors")
    victim = next(k for k in tensors if "layers.1.router.proj" in k)
    del tensors[victim]
    save_file(tensors, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DllmError, match=r"lacks \d+ tensor.*layers\.1\.router\.proj\.weight"):
        load_model(ck)
