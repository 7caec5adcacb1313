"""Generation with images returns exactly what transformers' generate(input_ids, pixel_values,
image_position_ids, mm_token_type_ids) returns, over every backend that runs here."""

import pytest
import torch
from vision_case import TINY_VISION_SOFT_TOKENS

from dllm_trt.generation.image_inputs import expand_prompt_ids, image_processor, process_images
from dllm_trt.generation.images import PromptImages
from dllm_trt.generation.loop import GenerationSettings, generate, left_pad
from dllm_trt.generation.step import OnnxRuntimeStep, TorchStep
from dllm_trt.models.checkpoint import load_model
from dllm_trt.models.vision import VisionFacts
from dllm_trt.parity.generation_parity import reference_generate
from dllm_trt.parity.vision_parity import fixed_images


@pytest.fixture(scope="module")
def model(tiny_vision_ckpt):
    return load_model(tiny_vision_ckpt)


@pytest.fixture(scope="module")
def facts(model):
    return VisionFacts.from_config(model.config.to_dict())


@pytest.fixture(scope="module")
def steps(model, tiny_vision_export, tiny_vision_optimized):
    return {
        "torch": TorchStep(model, images=True),
        "onnxruntime exported": OnnxRuntimeStep.from_artifacts(tiny_vision_export),
        "onnxruntime optimized": OnnxRuntimeStep.from_artifacts(tiny_vision_optimized),
    }


def test_export_measured_the_vision_graph_and_a_prompt_pass_with_images(tiny_vision_export):
    from dllm_trt.manifest import read_manifest

    manifest = read_manifest(tiny_vision_export)
    assert manifest["model"]["vision"]["graphs"] == {str(TINY_VISION_SOFT_TOKENS): "vision-70"}
    names = {c["name"]: c["passed"] for c in manifest["parity"]["comparisons"]}
    assert names["vision 70 soft tokens"] and names["encoder prompt with images key.1"]
    step_inputs = [i["name"] for i in manifest["graphs"]["step"]["inputs"]]
    assert step_inputs[5:8] == ["image_embeds", "image_rows", "image_block_ids"]


def test_optimize_fuses_the_vision_graph_and_measures_it(tiny_vision_optimized, facts):
    from dllm_trt.manifest import read_manifest

    manifest = read_manifest(tiny_vision_optimized)
    matched = {p["name"]: p["matched"] for p in manifest["passes"]}
    # per layer: 4 sandwich norms, q/k/v norms; then the embedder's norm
    assert matched["fuse_rms_norm"]["vision-70"] == 7 * facts.num_layers + 1
    assert "vision-70" not in matched["fuse_moe"]
    assert manifest["passes"][-1]["parity"]["passed"]


# (prompts with the image token once per image, images by index into fixed_images(), seed)
CASES = [
    ("text around two images", [[5, 17, "img", 42, 8, "img", 9]], [0, 1], 0),
    ("batch 2, left-padded, an image in each row", [[6, "img", 7, 8, 9, 10], ["img", 11]], [2, 1], 1),
]


@pytest.mark.parametrize("name, prompts, order, seed", CASES, ids=[c[0] for c in CASES])
def test_token_exact_with_generate(model, facts, steps, tmp_path, name, prompts, order, seed):
    processor = image_processor(tmp_path, facts.patch_size, facts.pooling_kernel_size, TINY_VISION_SOFT_TOKENS)
    pictures = fixed_images()
    inputs = process_images([pictures[i] for i in order], processor)
    prompts = [[facts.image_token_id if t == "img" else t for t in p] for p in prompts]
    ids, mask = left_pad(expand_prompt_ids(prompts, iter(inputs.counts), facts.boi_token_id, facts.image_token_id,
                                           facts.eoi_token_id), 0)  # fmt: skip
    settings = GenerationSettings.from_generation_config(model.generation_config.to_dict(), max_new_tokens=16)
    multimodal = dict(pixel_values=inputs.pixel_values, image_position_ids=inputs.position_ids,
                      mm_token_type_ids=(ids == facts.image_token_id).long())  # fmt: skip
    expected, calls = reference_generate(model, ids, mask, settings, seed, images=multimodal)
    for backend, step in steps.items():
        features = step.image_features(inputs.pixel_values, inputs.position_ids, inputs.counts)
        images = PromptImages.locate(ids, facts.image_token_id, features, facts.bidirectional)
        ours = generate(step, settings, ids, mask, seed=seed, images=images)
        assert torch.equal(ours.sequences, expected.sequences), backend
        assert ours.calls_per_canvas == calls, backend
    if seed == 0:  # the bidirectional image blocks matter: the same images attended causally give other tokens
        causal = PromptImages.locate(ids, facts.image_token_id, features, bidirectional=False)
        sequences = generate(step, settings, ids, mask, seed=seed, images=causal).sequences
        assert not torch.equal(sequences, expected.sequences)
