"""The torch backend's CUDA step (generation.triton_step): transformers' modules with the MoE through the
Triton kernels the engine plugin launches, token for token against transformers' generate().

On the CPU the kernels run under Triton's interpreter, so these generate one canvas of the tiny preset
with few denoise steps; on a GPU (bench/gpu_session.sh) the same checks run on CUDA with the denoise step
replayed from a CUDA graph, against transformers on the same GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dllm_trt.errors import DllmError
from dllm_trt.generation.loop import GenerationSettings, generate, left_pad
from dllm_trt.models.checkpoint import load_model
from dllm_trt.parity.generation_parity import reference_generate

pytest.importorskip("triton", reason="triton is not installed (pip install 'dllm-trt[triton]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [[5, 17, 42]]


def _settings(model, steps: int, tokens: int = 8) -> GenerationSettings:  # noqa: ANN001
    base = GenerationSettings.from_generation_config(model.generation_config.to_dict(), max_new_tokens=tokens)
    return dataclasses.replace(base, sampler=dataclasses.replace(base.sampler, max_denoising_steps=steps))


def _reference_with_stored_experts(ckpt, step, device: str):  # noqa: ANN001, ANN202
    """transformers with every layer's experts replaced by the values `step` stores (the envelope of a
    quantized artifact is the reference quantized alike)."""
    model = load_model(ckpt).to(device)
    with torch.no_grad():
        for layer, store in zip(model.model.decoder.layers, step.moe.stores):
            gate_up, down = store.dequantized()
            layer.experts.gate_up_proj.copy_(gate_up)
            layer.experts.down_proj.copy_(down)
    return model


def _compare(ckpt, weight_format: str, steps: int, device: str, graphs: bool, prompts=PROMPTS, seed=0, tokens=8):  # noqa: ANN001, ANN202
    from dllm_trt.generation.triton_step import TritonStep

    step = TritonStep(load_model(ckpt).to(device), weight_format, cuda_graphs=graphs)
    reference = _reference_with_stored_experts(ckpt, step, device)
    settings = _settings(reference, steps, tokens)
    ids, mask = left_pad(prompts, 0)
    expected, calls = reference_generate(reference, ids.to(device), mask.to(device), settings, seed)
    ours = generate(step, settings, ids, mask, seed=seed)
    return step, ours, expected, calls


def test_float_experts_generate_what_transformers_generates(tiny_ckpt):
    step, ours, expected, calls = _compare(tiny_ckpt, "float", steps=2, device="cpu", graphs=False)
    assert torch.equal(ours.sequences, expected.sequences) and ours.calls_per_canvas == calls
    assert step.execution == "torch on cpu, MoE through Triton (float experts)"


def test_nvfp4_experts_generate_what_transformers_generates_over_the_same_experts(tiny_ckpt):
    """nvfp4 (fp8 takes the same path, with another kernel constexpr; both run on the GPU test below)."""
    step, ours, expected, _ = _compare(tiny_ckpt, "nvfp4", steps=1, device="cpu", graphs=False)
    assert torch.equal(ours.sequences, expected.sequences)
    float_bytes = sum(g.numel() + d.numel() for g, d in (s.dequantized() for s in step.moe.stores)) * 4  # fp32
    assert step.moe.nbytes < float_bytes / 6  # stored, not dequantized


def test_quantized_experts_drop_every_reference_to_the_float_ones(tiny_ckpt):
    """What lets a GPU hold the released model's quantized experts: the decoder's float experts and the
    encoder's (the same tensors, tied) are dropped as each layer's are stored."""
    from dllm_trt.generation.triton_step import TritonStep

    model = load_model(tiny_ckpt)
    step = TritonStep(model, "fp8", cuda_graphs=False, release_float=True)
    for layers in (model.model.decoder.layers, model.model.encoder.language_model.layers):
        assert all(layer.experts.gate_up_proj is None and layer.experts.down_proj is None for layer in layers)
    assert [s.weight_format for s in step.moe.stores] == ["fp8"] * len(model.model.decoder.layers)


def test_the_cuda_device_is_refused_in_one_line_where_there_is_none(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    from dllm_trt.generation.backends import open_torch_step

    with pytest.raises(DllmError, match="^--device cuda: torch sees no CUDA device here"):
        open_torch_step(tiny_ckpt, device="cuda")
    with pytest.raises(DllmError, match="^--device tpu: the torch backend runs on cpu or cuda"):
        open_torch_step(tiny_ckpt, device="tpu")


# ---- on a GPU --------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("weight_format", ["float", "fp8", "nvfp4"])
def test_on_cuda_graphed_generations_equal_transformers_on_the_same_gpu(tiny_ckpt, weight_format):
    """Two prompts of different lengths, three canvases (past the sliding window), the denoise step from a
    CUDA graph: the ids of transformers' generate() on this GPU, with the same stored experts."""
    prompts = [[5, 17, 42, 8, 9, 10, 11], [7, 8]]
    step, ours, expected, calls = _compare(tiny_ckpt, weight_format, steps=12, device="cuda", graphs=True,
                                           prompts=prompts, seed=2, tokens=24)  # fmt: skip
    assert step.graphs and step.captures == len(ours.calls_per_canvas)  # one per canvas (the cache grew)
    print(f"\n[{weight_format}] sequences equal: {torch.equal(ours.sequences.cpu(), expected.sequences.cpu())}")
    assert torch.equal(ours.sequences.cpu(), expected.sequences.cpu()) and ours.calls_per_canvas == calls


@needs_cuda
def test_on_cuda_the_graph_replays_exactly_what_the_eager_step_computes(tiny_ckpt):
    from dllm_trt.generation.kv_cache import StaticKVCache
    from dllm_trt.generation.triton_step import TritonStep

    model = load_model(tiny_ckpt).to("cuda")
    graphed, eager = TritonStep(model, "float"), TritonStep(model, "float", cuda_graphs=False)
    info = graphed.info
    cache = StaticKVCache(graphed.specs, 2, 32, info.sliding_window, info.dtype, "cuda")
    ids = torch.randint(0, info.vocab_size, (2, 5), device="cuda")
    valid = torch.ones(2, 5, dtype=torch.bool, device="cuda")
    cache.append(eager.encode(ids, torch.arange(5, device="cuda").expand(2, -1), valid, cache.mask(),
                              cache.tensors()), valid)  # fmt: skip
    c = info.canvas_length
    for seed in range(3):  # new inputs each replay
        gen = torch.Generator(device="cuda").manual_seed(seed)
        args = (
            torch.randint(0, info.vocab_size, (2, c), device="cuda", generator=gen),
            torch.randn(2, c, info.hidden_size, device="cuda", generator=gen), torch.arange(5, 5 + c, device="cuda")
            .expand(2, -1), cache.mask(), cache.tensors(), torch.tensor(0.4 + 0.1 * seed),
            torch.empty(2 * c, info.vocab_size, device="cuda").exponential_(generator=gen),
        )  # fmt: skip
        a, b = graphed.denoise_and_sample(*args), eager.denoise_and_sample(*args)
        for name in ("sampled", "argmax", "entropy", "next_self_conditioning"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert graphed.captures == 1


@needs_cuda
def test_generate_runs_the_torch_backend_on_cuda(tiny_export, capsys):
    from dllm_trt.cli import main

    argv = ["generate", str(tiny_export), "--prompt-ids", "5,17,42", "--max-new-tokens", "8", "--backend", "torch"]
    assert main([*argv, "--device", "cuda", "--json"]) == 0
    assert "MoE through Triton" in capsys.readouterr().out
