"""The vision adapter: sizes read from the checkpoint, and the export-friendly tower equal to transformers'."""

import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dllm_trt.generation.image_inputs import image_processor, process_images
from dllm_trt.models.checkpoint import safetensors_files, tensor_index
from dllm_trt.models.presets import make_checkpoint, randomize_
from dllm_trt.models.vision import VisionEncoder, VisionFacts, has_vision_tower, reference_image_features, valid_rows
from dllm_trt.parity.vision_parity import fixed_images

TEXT = dict(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=24, global_head_dim=32, num_global_key_value_heads=1, sliding_window=8,
            num_experts=4, top_k_experts=2, moe_intermediate_size=16,
            layer_types=["sliding_attention", "full_attention"])  # fmt: skip
# widths no preset has: 3 heads of 40 with 1 key/value head (GQA in the tower), standardize on
TOWER = dict(model_type="gemma4_vision", hidden_size=120, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=3, num_key_value_heads=1, head_dim=40, standardize=True,
             position_embedding_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    config = DiffusionGemmaConfig(text_config=dict(TEXT, use_bidirectional_attention="vision"), vision_config=TOWER,
                                  image_token_id=299, boi_token_id=297, eoi_token_id=298, canvas_length=4)  # fmt: skip
    torch.manual_seed(0)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize_(model, seed=1, tower=True)
    return model


def test_facts_are_read_from_the_config_not_assumed(model):
    facts = VisionFacts.from_config(model.config.to_dict())
    assert (facts.hidden_size, facts.num_heads, facts.num_kv_heads, facts.head_dim) == (120, 3, 1, 40)
    assert (facts.num_layers, facts.intermediate_size, facts.text_hidden_size) == (2, 80, 48)
    assert (facts.image_token_id, facts.boi_token_id, facts.eoi_token_id) == (299, 297, 298)
    assert facts.standardize and facts.bidirectional
    assert facts.patch_pixels == 768 and facts.max_patches(70) == 630


def test_encoder_equals_transformers_on_every_valid_soft_token(model, tmp_path):
    facts = VisionFacts.from_config(model.config.to_dict())
    processor = image_processor(tmp_path, facts.patch_size, facts.pooling_kernel_size, 70)
    inputs = process_images(fixed_images(), processor)
    assert len(set(inputs.counts)) == 3  # three aspect ratios, three soft-token counts
    with torch.no_grad():
        ours = VisionEncoder(model)(inputs.pixel_values, inputs.position_ids)  # [I, 70, H]
    expected = reference_image_features(model, inputs.pixel_values, inputs.position_ids)
    assert ours.shape == (3, 70, 48)
    rel = (valid_rows(ours, inputs.counts) - expected).abs().max() / expected.abs().max()
    assert rel < 1e-5, rel
    assert bool(torch.isfinite(ours).all())  # the padding rows past each count too (an empty cell's embedding)


def test_vision_presets_hold_a_tower_and_text_presets_none(tmp_path):
    for preset, tower in (("tiny", False), ("tiny-vision", True)):
        make_checkpoint(tmp_path / preset, preset, seed=0)
        names = tensor_index(safetensors_files(tmp_path / preset))
        assert has_vision_tower(names) == tower, preset
