import json

import onnx
import pytest
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dllm_trt.errors import DllmError
from dllm_trt.export import ExportOptions
from dllm_trt.export import run as export_run
from dllm_trt.generation.step import OnnxRuntimeStep
from dllm_trt.models.checkpoint import load_model
from dllm_trt.models.diffusion_gemma import layer_specs
from dllm_trt.models.presets import TINY_VISION, randomize_, save_checkpoint
from dllm_trt.parity.step_parity import step_parity


def test_manifest_describes_every_graph_input_and_output(tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["opset"] == 23
    assert manifest["checkpoint"]["hash"].startswith("sha256:")
    step = manifest["graphs"]["step"]
    inputs = {i["name"]: i for i in step["inputs"]}
    assert inputs["input_ids"]["dynamic_axes"] == {"0": "batch", "1": "new_tokens"}
    assert inputs["past_key.0"]["dynamic_axes"] == {"0": "batch", "2": "cache_sliding"}
    assert inputs["past_key.1"]["dynamic_axes"] == {"0": "batch", "2": "cache_full"}
    assert inputs["input_mask"]["dtype"] == "bool"
    assert inputs["self_conditioning"]["shape"] == ["batch", "rows", 64]  # the rows choose the phase
    logits = step["outputs"][-1]
    assert logits["name"] == "logits" and logits["dtype"] == "float32"
    assert logits["shape"] == ["batch", "rows", 512]  # vocab static
    assert [o["name"] for o in step["outputs"][:2]] == ["key.0", "value.0"]
    for graph in (step,):
        assert graph["external_data"], "weights must be external data"
        for entry in graph["external_data"]:
            assert (tiny_export / entry["file"]).stat().st_size == entry["bytes"]


def test_graphs_hold_every_expert(tiny_export):
    model = onnx.load(str(tiny_export / "step.onnx"), load_external_data=False)
    shapes = [tuple(init.dims) for init in model.graph.initializer]
    experts = [s for s in shapes if len(s) == 3 and s[0] == 8]
    assert len(experts) == 2 * 2  # gate_up and down, two MoE layers


def test_parity_tiny_export_fp32(tiny_ckpt, tiny_export):
    model = load_model(tiny_ckpt)
    result = step_parity(model, OnnxRuntimeStep.from_artifacts(tiny_export), seed=11)
    for comparison in result.comparisons:
        print(comparison.line())
    assert result.exceeds_window
    assert result.passed
    logits = [c for c in result.comparisons if "logits" in c.name]
    assert len(logits) == 2 and all(c.argmax_agreement == 1.0 and c.max_rel <= 1e-4 for c in logits)


def test_parity_fails_when_a_weight_is_perturbed(tiny_ckpt, tiny_export):
    model = load_model(tiny_ckpt)
    with torch.no_grad():
        model.model.decoder.layers[1].experts.down_proj[3] *= 1.01
    result = step_parity(model, OnnxRuntimeStep.from_artifacts(tiny_export), seed=11)
    assert not result.passed
    assert not [c for c in result.comparisons if "logits" in c.name][0].passed


def test_dynamic_batch_and_cache(tiny_ckpt, tiny_export):
    model = load_model(tiny_ckpt)
    step = OnnxRuntimeStep.from_artifacts(tiny_export)
    from dllm_trt.generation.step import TorchStep

    reference = TorchStep(model)
    batch, tokens, full, sliding = 3, 4, 6, 6
    specs = layer_specs(model)
    past = [
        torch.randn(batch, s.num_kv_heads, sliding if s.sliding else full, s.head_dim) for s in specs for _ in (0, 1)
    ]
    args = (
        torch.randint(0, 512, (batch, tokens)),
        torch.arange(full, full + tokens).expand(batch, -1).contiguous(),
        torch.ones(batch, tokens, dtype=torch.bool),
        torch.ones(batch, full, dtype=torch.bool),
        past,
    )
    for ours, ref in zip(step.encode(*args), reference.encode(*args)):
        assert ours.shape == ref.shape == (batch, ours.shape[1], tokens, ours.shape[3])
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_export_of_a_hand_built_config(tmp_path):
    text = dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=8,
        global_head_dim=24,
        num_global_key_value_heads=2,
        sliding_window=5,
        num_experts=5,
        top_k_experts=3,
        moe_intermediate_size=12,
        max_position_embeddings=512,
    )
    config = DiffusionGemmaConfig(text_config=text, vision_config=TINY_VISION, canvas_length=6)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    randomize_(model, seed=5)
    save_checkpoint(model, tmp_path / "ck", tower=False)  # text-only: no tower to export
    manifest = export_run(ExportOptions(tmp_path / "ck", tmp_path / "onnx", seed=2, quiet=True)).manifest
    assert manifest["parity"]["passed"], manifest["parity"]
    assert manifest["parity"]["exceeds_window"]


def test_existing_output_with_content_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DllmError, match="not empty"):
        export_run(ExportOptions(tiny_ckpt, out, parity=False, quiet=True))  # what is written is what this test checks
    assert (out / "keep.txt").read_text() == "user data"


def test_every_weight_carries_its_checkpoint_name_and_holds_that_tensor(tiny_ckpt, tiny_export):
    """Named `X` the graph holds checkpoint tensor X; `X.T` holds it with its last two axes swapped."""
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    checkpoint = {}
    for path in tiny_ckpt.glob("*.safetensors"):
        checkpoint |= load_file(path)
    model = onnx.load(str(tiny_export / "step.onnx"))  # with its external data
    weights = [init for init in model.graph.initializer if len(init.dims) >= 2]
    assert weights and len({init.name for init in weights}) == len(weights)
    for init in weights:
        name = init.name.removesuffix(".T")
        assert name in checkpoint, f"{init.name} is not named after a checkpoint tensor"
        expected = checkpoint[name].swapaxes(-1, -2) if init.name.endswith(".T") else checkpoint[name]
        assert (numpy_helper.to_array(init) == expected).all(), init.name
    # the tied embedding is one tensor: the Gather and the LM head read the same initializer
    assert sum(init.name.startswith("model.decoder.embed_tokens.weight") for init in weights) == 1
