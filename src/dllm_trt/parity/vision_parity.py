"""The vision graphs against transformers' own tower, on fixed images made in code.

Images of different aspect ratios (wide, tall, square, each with its own pattern, so that the 2-D
positions, the pooler's cells and the padding all differ between them) go through transformers'
image processor at each exported max_soft_tokens; the step's `image_features` (a vision graph, or
the torch backend) is compared with `get_image_features` on every valid soft token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dllm_trt.generation.image_inputs import image_processor, process_images
from dllm_trt.models.vision import VisionFacts, reference_image_features
from dllm_trt.parity.compare import Comparison, compare, tolerance_for

# (height, width) of the fixed test images: wide, tall and square, none a multiple of the 48-pixel grid.
IMAGE_SIZES = ((120, 310), (330, 100), (200, 200))


def fixed_images(count: int = len(IMAGE_SIZES), seed: int = 0) -> list:  # noqa: ANN201 (PIL images)
    """Deterministic RGB images: a colour gradient, a disc and stripes over seeded noise, per size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
        disc = ((x - 0.3 - 0.1 * index) ** 2 + (y - 0.6) ** 2 < 0.05).astype(float)
        stripes = (np.sin((x + y) * (6 + 3 * index) * np.pi) > 0).astype(float)
        rgb = np.stack([x, y * (1 - disc), 0.5 * stripes + 0.5 * disc], axis=-1)
        rgb = np.clip(rgb + 0.1 * rng.standard_normal(rgb.shape), 0, 1)
        images.append(Image.fromarray((255 * rgb).astype(np.uint8)))
    return images


@torch.no_grad()
def vision_parity(
    model,  # noqa: ANN001 (transformers' model)
    step,  # noqa: ANN001 (a generation.step Step)
    directory: Path,
    facts: VisionFacts,
    max_soft_tokens: list[int],
    dtype: str | None = None,
    images: list | None = None,
) -> list[Comparison]:
    """`step.image_features` against transformers' tower and embedder, per max_soft_tokens, all images at once.

    `directory`: where the image processor's settings are read from (a checkpoint or artifact directory).
    """
    images = fixed_images() if images is None else images
    tolerance = tolerance_for(dtype or str(model.dtype).removeprefix("torch."))
    out = []
    for count in max_soft_tokens:
        processor = image_processor(directory, facts.patch_size, facts.pooling_kernel_size, count)
        inputs = process_images(images, processor)
        expected = reference_image_features(model, inputs.pixel_values, inputs.position_ids)
        actual = step.image_features(inputs.pixel_values, inputs.position_ids, inputs.counts)
        out.append(compare(f"vision {count} soft tokens", actual.float(), expected.float(), tolerance))
    return out


def artifact_vision_parity(model, step, directory: Path, dtype: str | None = None) -> list[Comparison]:  # noqa: ANN001
    """The vision graphs an artifact's step carries (step.vision), each against transformers; none: []."""
    if not getattr(step, "vision", None):
        return []
    facts = VisionFacts.from_config(model.config.to_dict())
    return vision_parity(model, step, directory, facts, sorted(step.vision), dtype)
