import json

import pytest

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
