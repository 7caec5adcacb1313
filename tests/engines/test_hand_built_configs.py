"""Configs a user builds by hand, not the presets: odd head sizes (24, 48), GQA ratios 2 and 6, 2 and
12 experts. Each goes checkpoint -> export -> optimize --target trt -> a TensorRT-for-RTX engine for
DGX Spark with its MoE plugin layers, on this CPU."""

from __future__ import annotations

import json

import pytest
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dllm_trt import export, optimize
from dllm_trt.engines import stage
from dllm_trt.models.presets import TINY_VISION, randomize_, save_checkpoint
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

CONFIGS = {
    "head 24/48, GQA 2, 2 experts top-1": dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, global_head_dim=48, num_global_key_value_heads=1,
        num_experts=2, top_k_experts=1,
    ),
    "head 48/24, GQA 6, 12 experts top-3": dict(
        num_attention_heads=6, num_key_value_heads=1, head_dim=48, global_head_dim=24, num_global_key_value_heads=1,
        num_experts=12, top_k_experts=3,
    ),
}  # fmt: skip


@pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")
@pytest.mark.parametrize("name", CONFIGS)
def test_a_hand_built_config_becomes_an_engine(name, tmp_path):
    text = dict(
        vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"], moe_intermediate_size=12, max_position_embeddings=512,
    ) | CONFIGS[name]  # fmt: skip
    model = DiffusionGemmaForBlockDiffusion(
        DiffusionGemmaConfig(text_config=text, vision_config=TINY_VISION, canvas_length=6)
    ).eval()
    randomize_(model, seed=5)
    save_checkpoint(model, tmp_path / "ck", tower=False)  # text-only: no tower to export
    # the build is what this test judges
    export.run(export.ExportOptions(tmp_path / "ck", tmp_path / "onnx", parity=False, quiet=True))
    # the build is what this test judges
    options = optimize.OptimizeOptions(tmp_path / "onnx", tmp_path / "trt", "trt", "bf16", parity="none", quiet=True)
    optimize.run(options)
    result = stage.run(stage.BuildOptions(tmp_path / "trt", tmp_path / "engines", "dgx-spark", quiet=True))
    engines = result.info["engines"]
    assert engines["step"]["network"]["plugins"] == {"DllmMoE": 2}
    heads = sorted({text["head_dim"], text["global_head_dim"]})
    print(f"{name}: head sizes {heads}, engines " + ", ".join(f"{g} {e['bytes']} B" for g, e in engines.items()))
    assert json.loads((tmp_path / "engines" / "manifest.json").read_text())["stage"] == "build"
