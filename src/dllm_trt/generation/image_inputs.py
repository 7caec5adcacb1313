"""Images into model inputs, as transformers' Gemma 4 processor makes them.

Reading (one line per bad file: unreadable, not an image, a video), the image processor
(transformers' `Gemma4ImageProcessorPil`: aspect-preserving resize to multiples of
pooling_kernel x patch pixels, 16x16 patches, zero padding to `9 * max_soft_tokens` patches), and
the prompt's placeholders: each image becomes `<boi> <image> x n <eoi>`, n its soft-token count, as
`Gemma4Processor.replace_image_token` writes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dllm_trt.errors import DllmError

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# Container signatures of the video formats a user might pass for an image: (offset, bytes).
_VIDEO_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (8, b"AVI "), (0, b"\x00\x00\x01\xba"), (0, b"FLV"))


@dataclass(frozen=True)
class ProcessedImages:
    pixel_values: torch.Tensor  # [I, P, 3*patch^2] float32
    position_ids: torch.Tensor  # [I, P, 2] int64, (-1, -1) on padding
    counts: list[int]  # soft tokens per image


def read_image(path: Path):  # noqa: ANN201 (PIL.Image.Image)
    """The image at `path` in RGB, or one line saying why not."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DllmError(f"--image {path}: no such file")
    try:
        head = path.open("rb").read(16)
    except OSError as exc:
        raise DllmError(f"--image {path}: cannot read it ({exc.strerror or exc})") from None
    if any(head[offset : offset + len(magic)] == magic for offset, magic in _VIDEO_MAGIC):
        raise DllmError(f"--image {path} is a video: DiffusionGemma does not support video inputs; pass a still image")
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise DllmError(
                    f"--image {path} has {image.n_frames} frames (an animation): DiffusionGemma does not support "
                    "video inputs; pass a still image"
                )
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise DllmError(f"--image {path} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except OSError as exc:
        raise DllmError(f"--image {path}: cannot decode it ({exc})") from None


def image_processor(directory: Path, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int):  # noqa: ANN201
    """transformers' Gemma4ImageProcessorPil: the checkpoint's processor settings where it has them, else the
    vision config's patch size and pooling kernel; `max_soft_tokens` always the one asked for."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from dllm_trt.models.vision import SUPPORTED_SOFT_TOKENS

    if max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
        raise DllmError(
            f"--max-soft-tokens {max_soft_tokens}: Gemma 4's image processor takes one of "
            f"{', '.join(map(str, SUPPORTED_SOFT_TOKENS))}"
        )
    settings = dict(patch_size=patch_size, pooling_kernel_size=pooling_kernel_size)
    for name in PROCESSOR_FILES:
        path = directory / name
        if path.is_file():
            saved = json.loads(path.read_text())
            saved = saved.get("image_processor", saved)  # processor_config.json nests it
            settings.update({k: saved[k] for k in ("patch_size", "pooling_kernel_size", "resample") if k in saved})
            break
    return Gemma4ImageProcessorPil(**settings, max_soft_tokens=max_soft_tokens)


def process_images(images: list, processor) -> ProcessedImages:  # noqa: ANN001
    out = processor(images, return_tensors="pt")
    counts = [int(n) for n in out["num_soft_tokens_per_image"]]
    return ProcessedImages(out["pixel_values"].float(), out["image_position_ids"].long(), counts)


def image_tokens(count: int, boi: int, image: int, eoi: int) -> list[int]:
    """`<boi> <image> x count <eoi>`: one image in the prompt (Gemma4Processor.replace_image_token)."""
    return [boi, *[image] * count, eoi]


def expand_prompt_ids(
    prompts: list[list[int]], counts: Iterator[int], boi: int, image: int, eoi: int
) -> list[list[int]]:
    """Each `image` id, written once where an image goes, becomes that image's `<boi> <image> x n <eoi>`."""
    expanded = []
    for prompt in prompts:
        row: list[int] = []
        for token in prompt:
            row += image_tokens(next(counts), boi, image, eoi) if token == image else [token]
        expanded.append(row)
    return expanded


def expand_prompt_text(text: str, counts: Iterator[int], image_token: str, boi_token: str, eoi_token: str) -> str:
    """The text with each `image_token` replaced as Gemma4Processor does, before it tokenizes the whole."""
    pieces = text.split(image_token)
    out = pieces[0]
    for piece in pieces[1:]:
        out += boi_token + image_token * next(counts) + eoi_token + piece
    return out
