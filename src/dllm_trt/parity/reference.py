"""transformers' own forward passes, called exactly as its `generate()` calls them.

The parity checks compare every backend against these, never against dllm-trt's own modules.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from dllm_trt.kernels.quantization import as_stored


def new_cache(model) -> DynamicCache:  # noqa: ANN001
    return DynamicCache(config=model.config.get_text_config(decoder=True))


@torch.no_grad()
def reference_encode(
    model,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    history_mask: torch.Tensor,
    position_ids: torch.Tensor,  # noqa: ANN001
    image_features: torch.Tensor | None = None,
) -> None:
    """Encoder step over `input_ids` [B, T]; `history_mask` [B, cached + T] covers the whole history.

    `image_features` [image tokens, H]: soft tokens merged at the image tokens (`mm_encoder_outputs`, as
    the encoder merges its tower's), with `mm_token_type_ids` 1 on them, as the processor marks them.
    """
    dummy = torch.empty((input_ids.shape[0], input_ids.shape[1], 0), dtype=model.dtype)
    extra, mm_token_type_ids = {}, None
    if image_features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        mm_token_type_ids = (input_ids == model.config.image_token_id).long()
        extra["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_features)}
    masks = model.model.encoder.create_masks_for_generate(
        config=model.config, inputs_embeds=dummy, attention_mask=history_mask, cache=cache, position_ids=position_ids,
        mm_token_type_ids=mm_token_type_ids,
    )  # fmt: skip
    model.model.encoder(input_ids=input_ids, attention_mask=masks, cache=cache, position_ids=position_ids, **extra)


@torch.no_grad()
def reference_denoise(
    model,  # noqa: ANN001
    cache: DynamicCache,
    canvas_ids: torch.Tensor,
    self_conditioning_logits: torch.Tensor | None,
    history_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Decoder step: softcapped fp32 logits [B, C, V]; `history_mask` [B, cached] (canvas appended here)."""
    decoder_mask = torch.nn.functional.pad(history_mask, (0, canvas_ids.shape[1]), value=True)
    masks = model.model.decoder.create_diffusion_decoder_attention_mask(
        config=model.config, inputs_embeds=canvas_ids.unsqueeze(-1), cache=cache, decoder_attention_mask=decoder_mask
    )
    out = model(
        decoder_input_ids=canvas_ids,
        cache=cache,
        self_conditioning_logits=self_conditioning_logits,
        decoder_attention_mask=masks,
        decoder_position_ids=position_ids,
    )
    return out.logits


def reference_cache_tensors(cache: DynamicCache) -> list[torch.Tensor]:
    """key.0, value.0, key.1, ... as the reference cache holds them now."""
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


@torch.no_grad()
def quantize_as_stored(model, precision: str) -> None:  # noqa: ANN001
    """In place: every weight an artifact of `precision` stores quantized, replaced by the values it holds
    (kernels.quantization.as_stored): the envelope of a quantized artifact is the reference quantized alike."""
    for name, weight in model.named_parameters():
        stored = as_stored(name, weight.float().numpy(), precision)
        if stored is not None:
            weight.copy_(torch.from_numpy(stored))
