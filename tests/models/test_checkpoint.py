import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm_trt.errors import DllmError
from dllm_trt.models.checkpoint import load_model, read_config, read_rows, safetensors_files, tensor_index


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


def test_tensor_index_and_row_reads_over_shards(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt)
    model.save_pretrained(tmp_path / "ck", max_shard_size="100KB")
    files = safetensors_files(tmp_path / "ck")
    assert len(files) > 1
    index = tensor_index(files)
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    assert index.keys() == tensors.keys()
    for name, tensor in tensors.items():
        entry = index[name]
        assert (entry.dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape))
        assert torch.equal(read_rows(entry), tensor)
        if tensor.dim() and tensor.shape[0] > 2:
            assert torch.equal(read_rows(entry, 1, 3), tensor[1:3])
