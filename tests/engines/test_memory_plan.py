"""`dllm-trt plan`: weights counted on transformers' own model, checked against what export writes and what
the runtime's KV cache allocates; fits judged per GPU and precision; bad input refused in one line."""

import pytest
import torch

from dllm_trt.cli import main
from dllm_trt.engines import memory_plan
from dllm_trt.errors import DllmError


@pytest.fixture(scope="module")
def released():
    return memory_plan.run(memory_plan.PlanOptions("released"))


def test_the_released_config_has_the_parameter_count_design_states(released):
    total = sum(released.parameters.values())
    step = total - released.parameters["vision"]  # the vision engine's weights, counted beside the step's
    assert abs(step - 25.25e9) < 0.01e9  # DESIGN.md: 25.25 G parameters, every one read by a step
    assert 0.89 < released.parameters["experts"] / step < 0.91  # "the experts are about 90% of those bytes"
    assert 0.5e9 < released.parameters["vision"] < 0.6e9  # the released tower: ~570M parameters, 27 layers of 1152
    assert released.weights["bf16"] == 2 * total
    print({p: f"{b / 1e9:.1f} GB" for p, b in released.weights.items()})
    assert released.weights["bf16"] > released.weights["fp8"] > released.weights["nvfp4"]


def test_bf16_weights_match_the_initializers_export_writes(tiny_export):
    """The fp32 tiny export's step graph holds twice the plan's bf16 bytes, give or take derived tables."""
    import numpy as np
    import onnx

    plan = memory_plan.run(memory_plan.PlanOptions(str(tiny_export), precisions=("bf16",)))
    graph = onnx.load(str(tiny_export / "step.onnx"), load_external_data=False).graph
    assert {i.data_type for i in graph.initializer if len(i.dims) >= 2} == {onnx.TensorProto.FLOAT}
    written = sum(4 * int(np.prod(i.dims)) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    ratio = written / (2 * plan.weights["bf16"])
    print(f"export {written} B of fp32 initializers, plan {2 * plan.weights['bf16']} B in fp32: {ratio:.4f}")
    assert 1.0 <= ratio < 1.01


def test_kv_cache_matches_what_the_runtime_allocates():
    from dllm_trt.generation.kv_cache import StaticKVCache
    from dllm_trt.models.diffusion_gemma import layer_specs

    _, config = memory_plan.load_config("tiny")
    model = memory_plan.meta_model(config)
    for context in (5, 64):  # below and above the sliding window
        cache = StaticKVCache(layer_specs(model), 3, context, config.text_config.sliding_window, torch.bfloat16)
        allocated = sum(t.numel() * t.element_size() for t in cache.storage)
        assert memory_plan.kv_cache_bytes(model, 3, context, "bf16") == allocated


def test_what_fits_where(released):
    rows = {(r["precision"], r["batch"], r["context"]): r for r in released.rows}
    assert "dgx-spark" in released.fits(rows["bf16", 1, 4096])
    assert "h100" in released.fits(rows["fp8", 1, 4096])
    assert "h100" not in released.fits(rows["bf16", 8, 262144])
    # precisions a GPU cannot run are never listed, however small: Ampere has no fp8, SM86 no nvfp4
    assert not {"a100", "rtx-3090", "rtx-a6000"} & set(released.fits(rows["fp8", 1, 4096]))
    assert "rtx-4090" not in released.fits(rows["nvfp4", 1, 4096])  # SM89: fp8, no fp4
    assert rows["bf16", 1, 262144]["activations"] > rows["bf16", 1, 4096]["activations"]  # masks grow with context


def test_long_contexts_fit_one_h100_with_the_attention_plugin_and_prompt_passes(released):
    """The released model's head-512 layers run in the DllmAttention plugin (no scores in memory), prompts in
    passes of 4096 tokens: bf16 batch 1 at 256K and fp8 batch 8 at 32K each fit one H100."""
    from dllm_trt.kernels.attention_launches import AttentionShape, workspace_bytes

    rows = {(r["precision"], r["batch"], r["context"]): r for r in released.rows}
    assert "h100" in released.fits(rows["bf16", 1, 262144])
    assert "h100" in released.fits(rows["fp8", 8, 32768])
    # decomposed, one 4096-token pass at 256K would write 2 x 4 B x 16 heads x 4096 x 262144 of scores alone
    assert rows["bf16", 1, 262144]["activations"] < 2 * 4 * 16 * 4096 * 262144 / 20
    workspace = workspace_bytes(AttentionShape("bf16", 16, 2, 512))  # what the plugin asks TensorRT for
    assert any(f"its workspace, {workspace / 1e6:.1f} MB" in note for note in released.notes), released.notes
    for key in (("bf16", 1, 262144), ("fp8", 8, 32768)):
        row = rows[key]
        print(f"{key}: {row['total'] / 1e9:.1f} GB ({row['activations'] / 1e9:.1f} GB activations) of 0.9 x 80 GiB")


def test_the_prompt_phase_follows_generates_chunk_rule():
    """Smaller passes, less memory: the plan counts the passes generation.prompt_chunks makes."""
    _, config = memory_plan.load_config("released")
    model = memory_plan.meta_model(config)
    by_chunk = [memory_plan.activation_bytes(model, 1, 262144, chunk, "bf16") for chunk in (256, 4096, 32768)]
    assert by_chunk[0] < by_chunk[1] < by_chunk[2]
    # a context that is not a multiple of the chunk: its last, shorter pass is never the largest
    assert memory_plan.activation_bytes(model, 1, 262144 + 100, 4096, "bf16") >= by_chunk[1]


def test_cli_prints_the_table_and_refuses_bad_input_in_one_line(capsys):
    assert main(["plan", "small", "--gpu", "dgx-spark", "--contexts", "4K", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 | 1 | 4K |" in out and "dgx-spark" in out
    for argv, fragment in (
        (["plan", "nowhere"], "neither a checkpoint"),
        (["plan", "small", "--contexts", "4x"], "--contexts takes"),
        (["plan", "small", "--precisions", "int3"], "--precisions int3"),
        (["plan", "small", "--gpu", "tpu"], "unknown GPU preset 'tpu'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(DllmError, match="positive"):
        memory_plan.run(memory_plan.PlanOptions("small", batches=(0,)))
