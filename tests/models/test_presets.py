import json

import pytest
import torch

from dllm_trt.models.presets import PRESETS, build_config, make_checkpoint


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_keeps_every_architectural_feature(preset):
    text = build_config(preset).text_config
    types = set(text.layer_types)
    assert types == {"sliding_attention", "full_attention"}
    assert text.layer_types[-1] == "full_attention"
    full = next(i for i, t in enumerate(text.layer_types) if t == "full_attention")
    sliding = next(i for i, t in enumerate(text.layer_types) if t == "sliding_attention")
    assert text.per_layer_config[full].head_dim != text.per_layer_config[sliding].head_dim
    assert text.per_layer_config[full].num_key_value_heads < text.num_attention_heads  # GQA, K=V layers
    assert text.per_layer_config[sliding].num_key_value_heads < text.num_attention_heads
    assert text.top_k_experts < text.num_experts
    assert text.final_logit_softcapping == 30.0


def test_small_preset_is_about_25m_parameters():
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion(build_config("small"))
    text_params = sum(p.numel() for n, p in model.named_parameters() if "vision" not in n)
    assert 20e6 < text_params < 30e6, text_params
    assert model.config.canvas_length == 64


def test_make_checkpoint_writes_hf_layout_with_non_trivial_scales(tmp_path):
    model = make_checkpoint(tmp_path / "ck", "tiny", seed=3)
    names = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "diffusion_gemma"
    layer = model.model.decoder.layers[0]
    # Scales the reference multiplies by must not all be one, or parity cannot see them.
    assert not bool((layer.router.per_expert_scale == 1).all())
    assert float(layer.layer_scalar) != 1.0
    assert float(model.model.encoder.language_model.layers[0].layer_scalar) == float(layer.layer_scalar)


def test_full_width_is_bfloat16_and_written_streamed(monkeypatch, tmp_path):
    import dllm_trt.models.presets as presets

    assert PRESETS["full-width"]["dtype"] == "bfloat16"
    calls = []
    monkeypatch.setattr(presets, "write_streamed_checkpoint", lambda *a, **k: calls.append((a, k)))
    presets.make_checkpoint(tmp_path / "ck", "full-width", seed=1, num_layers=3)
    assert calls and calls[0][1]["dtype"] == torch.bfloat16


def test_streamed_checkpoint_is_a_sharded_hf_checkpoint_transformers_loads(tmp_path):
    from dllm_trt.models.checkpoint import load_model
    from dllm_trt.models.presets import write_streamed_checkpoint

    meta = write_streamed_checkpoint(tmp_path / "ck", "tiny", seed=2, dtype=torch.bfloat16, max_shard_bytes=50_000)
    assert len(list((tmp_path / "ck").glob("model-0000*-of-*.safetensors"))) > 3
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    model = load_model(tmp_path / "ck")  # fails on any missing or mis-shaped tensor
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())
    layer = model.model.decoder.layers[1]
    assert not bool((layer.router.per_expert_scale == 1).all())
    assert float(model.model.encoder.language_model.layers[1].layer_scalar) == float(layer.layer_scalar) != 1.0
    assert float(model.model.decoder.embed_tokens.weight[0].detach().abs().sum()) == 0  # the padding row
    assert 0.2 < float(layer.experts.gate_up_proj.detach().float().std() * 32**0.5) < 0.8  # std 0.5/sqrt(fan_in)


def test_a_random_model_built_in_place_is_tied_once_with_transformers_own_derived_buffers():
    """build_random_model (what the GPU bench builds at the released widths): every encoder layer is its
    decoder layer's tensors, the LM head the embedding, RoPE frequencies and the embedding scale as
    transformers computes them, every weight finite and not transformers' init (norms around one)."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from dllm_trt.models.presets import build_config, build_random_model

    model = build_random_model("tiny", 2, seed=3)
    reference = DiffusionGemmaForBlockDiffusion(build_config("tiny", 2))
    theirs = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if "vision" not in name and "layer_scalar" not in name:
            assert torch.equal(buffer, theirs[name]), name
    encoder, decoder = model.model.encoder.language_model.layers, model.model.decoder.layers
    assert all(a is b for e, d in zip(encoder, decoder) for a, b in zip(e.parameters(), d.parameters()))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(decoder[0].input_layernorm.weight, torch.ones_like(decoder[0].input_layernorm.weight))
    assert torch.equal(build_random_model("tiny", 2, seed=3).lm_head.weight, model.lm_head.weight)  # seeded
