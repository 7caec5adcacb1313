"""The loop over each backend returns exactly the ids transformers' generate() returns."""

import dataclasses

import pytest
import torch

from dllm_trt.generation.loop import GenerationSettings, generate, left_pad
from dllm_trt.generation.step import OnnxRuntimeStep, TorchStep
from dllm_trt.models.checkpoint import load_model
from dllm_trt.parity.generation_parity import reference_generate


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def steps(model, tiny_export):
    return {"torch": TorchStep(model), "onnxruntime": OnnxRuntimeStep.from_artifacts(tiny_export)}


def settings_for(model, **overrides):
    base = GenerationSettings.from_generation_config(model.generation_config.to_dict(), max_new_tokens=24)
    sampler = dataclasses.replace(base.sampler, **{k: v for k, v in overrides.items() if k != "eos_token_ids"})
    return dataclasses.replace(base, sampler=sampler, eos_token_ids=overrides.get("eos_token_ids", base.eos_token_ids))


CASES = [
    ("one prompt", [[5, 17, 42]], 0),
    ("one long prompt", [list(range(3, 14))], 1),
    ("batch 2, different lengths", [[5, 17, 42, 8, 9, 10, 11], [7, 8]], 2),
    ("batch 2, other seed", [[9, 9, 9], [4, 5, 6, 7, 8, 9]], 5),
]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name, prompts, seed", CASES, ids=[c[0] for c in CASES])
def test_token_exact_with_generate(model, steps, backend, name, prompts, seed):
    settings = settings_for(model)
    ids, mask = left_pad(prompts, 0)
    expected, calls = reference_generate(model, ids, mask, settings, seed)
    ours = generate(steps[backend], settings, ids, mask, seed=seed)
    # 24 new tokens = 3 canvases of 8: the context passes the sliding window (8)
    assert ours.sequences.shape == expected.sequences.shape
    assert torch.equal(ours.sequences, expected.sequences)
    assert ours.calls_per_canvas == calls
    assert ours.tokens_per_forward == pytest.approx(expected.tokens_per_forward.tolist())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_adaptive_stopping_and_eos_paths(model, steps, backend):
    # A random model is never confident: a loose threshold makes rows stop at different steps, and
    # many EOS ids make rows finish at different canvases, exercising every where() of the loop.
    settings = settings_for(model, stability_threshold=0, confidence_threshold=5.95, eos_token_ids=tuple(range(1, 60)))
    ids, mask = left_pad([[5, 17, 42, 8], [7, 8]], 0)
    expected, calls = reference_generate(model, ids, mask, settings, 3)
    ours = generate(steps[backend], settings, ids, mask, seed=3)
    assert torch.equal(ours.sequences, expected.sequences)
    assert ours.calls_per_canvas == calls
    assert min(calls) < settings.sampler.max_denoising_steps, "stopping never triggered: the test lost its point"
    assert (ours.sequences[:, 4:] == 0).any(), "no EOS padding happened: the test lost its point"


# A prompt of 4 sliding windows (8) plus 3 tokens, and a shorter left-padded row, encoded in passes of
# these sizes: smaller than the window, the sliding cache's capacity (window - 1), the window, and one
# whose boundaries fall at odd places of the windows. Every pass is over the cache of the earlier ones.
PROMPT_CHUNKS = (3, 7, 8, 13)


@pytest.fixture(scope="module")
def long_prompt(model):
    rows = torch.Generator().manual_seed(26)
    prompts = [torch.randint(3, 512, (length,), generator=rows).tolist() for length in (35, 20)]
    ids, mask = left_pad(prompts, 0)
    settings = settings_for(model, max_denoising_steps=4)
    settings = dataclasses.replace(settings, max_new_tokens=16)  # two canvases: a commit over the chunked cache
    expected, calls = reference_generate(model, ids, mask, settings, 7)  # the whole prompt in one pass
    return ids, mask, settings, expected, calls


@pytest.fixture(scope="module")
def plugin_step(tiny_trt_fp32):
    """The fp32 graphs optimized for TensorRT: every attention the DllmAttention plugin, run by its stand-in."""
    step = OnnxRuntimeStep.from_artifacts(tiny_trt_fp32)
    assert "long-head attention through its CPU stand-in" in step.execution
    return step


@pytest.mark.parametrize(
    "backend, chunk",
    [(backend, chunk) for backend in ("torch", "onnxruntime") for chunk in PROMPT_CHUNKS] + [("attention plugin", 3)],
)  # fmt: skip
def test_chunked_prompt_passes_are_token_exact(model, steps, long_prompt, backend, chunk, request):
    ids, mask, settings, expected, calls = long_prompt
    encoded = []
    step = request.getfixturevalue("plugin_step") if backend == "attention plugin" else steps[backend]
    original = step.encode

    def counting(input_ids, *args):
        encoded.append(input_ids.shape[1])
        return original(input_ids, *args)

    step.encode = counting
    try:
        ours = generate(step, settings, ids, mask, seed=7, prompt_chunk=chunk)
    finally:
        del step.encode
    assert torch.equal(ours.sequences, expected.sequences)
    assert ours.calls_per_canvas == calls
    prompt_passes = -(-35 // chunk)
    assert encoded[:prompt_passes] == [chunk] * (prompt_passes - 1) + [35 - chunk * (prompt_passes - 1)]
    assert max(encoded) <= chunk
