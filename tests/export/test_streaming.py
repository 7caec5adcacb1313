"""The streaming export: a weightless trace, weights streamed from safetensors shards, resumable writes.

The reference is the in-memory path (`export_step` and `export_self_conditioning` on a model loaded by
transformers): the streaming export must produce the same nodes and byte-identical weights.
"""

import json

import pytest
import torch
from graph_compare import graph_differences

from dllm_trt.export import ExportOptions
from dllm_trt.export import run as export_run
from dllm_trt.export import writer as writer_module
from dllm_trt.export.journal import JOURNAL, partial_dir
from dllm_trt.export.onnx_export import export_self_conditioning, export_step
from dllm_trt.export.weights import WeightRecipe, tensor_bytes
from dllm_trt.models.checkpoint import load_model, safetensors_files, tensor_index
from dllm_trt.models.presets import write_streamed_checkpoint
from dllm_trt.models.skeleton import CheckpointSources, build_skeleton

GRAPHS = ("step", "self_conditioning")


@pytest.fixture(scope="module")
def bf16_sharded_ckpt(tmp_path_factory):
    """The tiny architecture in bfloat16, saved in several safetensors shards with an index."""
    path = tmp_path_factory.mktemp("bf16") / "ckpt"
    write_streamed_checkpoint(path, "tiny", seed=3, dtype=torch.bfloat16, max_shard_bytes=60_000)
    assert len(list(path.glob("model-*.safetensors"))) > 3 and (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_skeleton_has_the_loaded_models_structure_dtypes_and_buffers(bf16_sharded_ckpt, dtype):
    loaded = load_model(bf16_sharded_ckpt, dtype=dtype)
    skeleton = build_skeleton(bf16_sharded_ckpt, dtype)
    real, fake = (
        dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
        for m in (loaded, skeleton)
    )
    assert real.keys() == fake.keys()
    for name, tensor in real.items():
        assert (fake[name].shape, fake[name].dtype) == (tensor.shape, tensor.dtype), name
        if "vision" not in name and not name.endswith("layer_scalar") and name not in loaded.state_dict():
            assert torch.equal(fake[name], tensor), name  # derived buffers (RoPE, embedding scale) are real
    # ties: one tensor for lm_head and the embedding, and for each encoder layer and its decoder layer
    assert skeleton.lm_head.weight is skeleton.model.decoder.embed_tokens.weight
    encoder_layer, decoder_layer = skeleton.model.encoder.language_model.layers[1], skeleton.model.decoder.layers[1]
    assert encoder_layer.experts.gate_up_proj is decoder_layer.experts.gate_up_proj


def test_recipes_give_the_bytes_from_pretrained_loads(bf16_sharded_ckpt):
    """bf16 checkpoint exported as float32: every weight cast exactly as from_pretrained casts it, chunked or not."""
    index = tensor_index(safetensors_files(bf16_sharded_ckpt))
    loaded = load_model(bf16_sharded_ckpt, dtype=torch.float32)
    skeleton = build_skeleton(bf16_sharded_ckpt, torch.float32)
    sources = CheckpointSources(skeleton, index)
    real = dict(loaded.named_parameters())
    for name, fake in skeleton.named_parameters():
        if "vision" in name:
            continue
        recipe = WeightRecipe(sources.entry(fake), torch.float32)
        assert torch.equal(recipe.materialize(), real[name]), name
        if fake.dim() >= 2:  # the transposed layouts the graphs hold, cut in small chunks
            perm = (0, 2, 1) if fake.dim() == 3 else (1, 0)
            transposed = recipe.transposed(perm)
            pieces = b"".join(bytes(tensor_bytes(c)) for c in transposed.chunks(max_bytes=1000))
            assert pieces == bytes(tensor_bytes(real[name].permute(perm))), name


def test_interrupted_export_resumes_and_matches_the_in_memory_export(bf16_sharded_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    options = dict(parity=True, quiet=True, max_shard_bytes=40_000, eager_max_elements=0)  # every weight lazy

    # 1. interrupted (as by Ctrl-C) after the second external-data file
    write_shard = writer_module._write_shard
    written = []

    def interrupted(shard, directory, advance):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(shard.file)
        return write_shard(shard, directory, advance)

    monkeypatch.setattr(writer_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(ExportOptions(bf16_sharded_ckpt, out, **options))
    work = partial_dir(out)
    assert not out.exists()
    journal = json.loads((work / JOURNAL).read_text())
    assert sorted(journal["graphs"]["step"]["files"]) == sorted(written)
    finished = {name: (work / name).stat().st_mtime_ns for name in written}

    # 2. the same command again: finished files are kept, the rest is written
    rewritten = []

    def recording(shard, directory, advance):
        rewritten.append(shard.file)
        return write_shard(shard, directory, advance)

    monkeypatch.setattr(writer_module, "_write_shard", recording)
    manifest = export_run(ExportOptions(bf16_sharded_ckpt, out, **options)).manifest
    assert not set(rewritten) & set(finished) and rewritten
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert not work.exists() and not (out / JOURNAL).exists()
    external = [e for g in manifest["graphs"].values() for e in g["external_data"]]
    assert len(external) > len(GRAPHS)  # several files per graph
    assert {e["file"] for e in external} == {p.name for p in out.glob("*.data")}
    # a bf16 export's parity: layer by layer, each layer judged against transformers' own layer in bf16
    assert manifest["model"]["dtype"] == "bfloat16" and manifest["parity"]["mode"] == "per-layer"
    assert manifest["parity"]["passed"] and manifest["parity"]["first_divergent_layer"] is None

    # 3. the in-memory path on the model transformers loads: same graphs, byte-identical weights
    model = load_model(bf16_sharded_ckpt)
    reference = tmp_path / "in-memory"
    reference.mkdir()
    index = tensor_index(safetensors_files(bf16_sharded_ckpt))
    for name, export in zip(GRAPHS, (export_step, export_self_conditioning)):
        torch.manual_seed(0)
        export(model, reference / f"{name}.onnx", index)
        assert graph_differences(out / f"{name}.onnx", reference / f"{name}.onnx") == []
