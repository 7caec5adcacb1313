"""A prompt's images as the loop sees them: where each image's tokens lie, and their soft tokens.

transformers merges image soft tokens into the first encoder pass (`masked_scatter` at the image
tokens) and, under `use_bidirectional_attention == "vision"`, lets each contiguous run of image
tokens attend to itself bidirectionally in that pass (`get_block_sequence_ids_for_mask` over
`mm_token_type_ids`, which the processor sets to 1 exactly on the image tokens). Later passes and
the denoise steps see the images only through the KV cache.

The spans are explicit data so that a loop cutting a prompt into several encoder passes can keep
every image whole in one pass (`PromptImages.for_pass` refuses a cut through an image).
Letters: B batch, L prompt length, T tokens of a pass, S soft tokens, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import get_block_sequence_ids_for_mask

from dllm_trt.errors import DllmError


@dataclass(frozen=True)
class ImageSpan:
    """One run of image tokens: batch row, positions [start, stop) in the prompt, its mask block (-1: causal)."""

    row: int
    start: int
    stop: int
    block: int


@dataclass(frozen=True)
class PassImages:
    """The step's image inputs for one encoder pass (contract.STEP_IMAGE_INPUTS)."""

    embeds: torch.Tensor  # [S, H] model dtype
    rows: torch.Tensor  # [S] int64: flat b * T + t within the pass
    block_ids: torch.Tensor  # [S] int64

    @classmethod
    def empty(cls, hidden: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> PassImages:
        """S = 0: a pass without images (and every denoise step)."""
        no_ids = torch.zeros(0, dtype=torch.long, device=device)
        return cls(torch.zeros(0, hidden, dtype=dtype, device=device), no_ids, no_ids.clone())


@dataclass(frozen=True)
class PromptImages:
    """Every image of a batch of prompts: its token span and its soft tokens, images in prompt order.

    embeds [S, H]: the valid soft tokens of every image, in the order the image tokens appear
    (row 0 first), which is the order transformers' masked_scatter fills them in.
    """

    spans: tuple[ImageSpan, ...]
    embeds: torch.Tensor

    @classmethod
    def locate(
        cls, input_ids: torch.Tensor, image_token_id: int, embeds: torch.Tensor, bidirectional: bool
    ) -> PromptImages:
        """The spans of `image_token_id` in a left-padded prompt batch [B, L], with their soft tokens.

        `bidirectional`: the checkpoint's use_bidirectional_attention is "vision" (each span a block,
        as transformers numbers them per row); otherwise every block is -1 and the pass stays causal.
        """
        is_image = input_ids == image_token_id  # [B, L]: the processor's mm_token_type_ids == 1
        count = int(is_image.sum())
        if count != embeds.shape[0]:
            raise DllmError(
                f"the prompt holds {count} image tokens but its images have {embeds.shape[0]} soft tokens; "
                "pass one --image per image placeholder"
            )
        blocks = get_block_sequence_ids_for_mask(is_image.long(), input_ids.device)  # [B, L]
        spans = []
        for row in range(input_ids.shape[0]):
            positions = torch.nonzero(is_image[row]).flatten().tolist()
            start = None
            for index, position in enumerate(positions):
                if start is None:
                    start = position
                if index + 1 == len(positions) or positions[index + 1] != position + 1:
                    block = int(blocks[row, start]) if bidirectional else -1
                    spans.append(ImageSpan(row, start, position + 1, block))
                    start = None
        return cls(tuple(spans), embeds)

    def for_pass(self, start: int, stop: int, tokens: int | None = None) -> PassImages:
        """The image inputs of a pass over prompt positions [start, stop); `tokens` its length T (stop - start).

        Every image must lie wholly inside or outside the pass: an image split across passes would
        attend to only part of itself, which the reference never does.
        """
        tokens = stop - start if tokens is None else tokens
        rows, blocks, picked = [], [], []
        offset = 0
        for span in self.spans:
            length = span.stop - span.start
            inside = start <= span.start and span.stop <= stop
            if not inside and span.start < stop and start < span.stop:
                raise DllmError(
                    f"an encoder pass over positions {start}..{stop - 1} would cut the image at "
                    f"{span.start}..{span.stop - 1} of row {span.row}; images are encoded whole, in one pass"
                )
            if inside:
                first = span.row * tokens + (span.start - start)
                rows.append(torch.arange(first, first + length))
                blocks.append(torch.full((length,), span.block, dtype=torch.long))
                picked.append(self.embeds[offset : offset + length])
            offset += length
        if not picked:
            return PassImages.empty(self.embeds.shape[1], self.embeds.dtype, self.embeds.device)
        return PassImages(torch.cat(picked), torch.cat(rows), torch.cat(blocks))
