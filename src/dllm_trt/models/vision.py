"""DiffusionGemma's vision tower as an export-friendly module, and what a checkpoint says about it.

transformers' `Gemma4VisionModel` (patch embedder, 2-D RoPE encoder, position pooler) followed by
`DiffusionGemmaMultimodalEmbedder` is the source of truth; `VisionEncoder` calls their own
submodules and re-states only two things:
- the attention, in eager form over an additive key-padding bias (transformers' mask factories do
  not trace; the optimize stage fuses the eager form as it fuses the step's);
- the strip of padded soft tokens: transformers drops them with a boolean index, a data-dependent
  row count; here every image keeps `max_soft_tokens` rows, its valid ones first (the pooler's
  cells are numbered row by row over the image's own grid, so its cells are a prefix), and the
  runtime takes each image's prefix. What follows the strip (standardize, the embedder's norm and
  projection) is row-wise, so the valid rows are the reference's.

Nothing here assumes a width: `VisionFacts` reads every size from the checkpoint's config.
Letters: I images, P patches (max_soft_tokens * k^2), S soft tokens (max_soft_tokens), k pooling
kernel, Hv vision hidden, Ht text hidden, Q heads, G key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.models.gemma4.image_processing_pil_gemma4 import _SUPPORTED_SOFT_TOKENS
from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope, repeat_kv

SUPPORTED_SOFT_TOKENS: tuple[int, ...] = tuple(_SUPPORTED_SOFT_TOKENS)  # what Gemma4ImageProcessor accepts
TOWER_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")  # checkpoint tensor names


@dataclass(frozen=True)
class VisionFacts:
    """The tower's sizes and the image tokens, read from a checkpoint's config.json (no width assumed)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    standardize: bool
    text_hidden_size: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    bidirectional: bool  # text_config.use_bidirectional_attention == "vision": each image attends to itself

    @classmethod
    def from_config(cls, config: dict) -> VisionFacts:
        """From config.json as a dict; transformers fills what the file leaves out with its defaults."""
        from transformers import DiffusionGemmaConfig

        resolved = DiffusionGemmaConfig.from_dict(config)
        vision, text = resolved.vision_config, resolved.text_config
        return cls(
            hidden_size=vision.hidden_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            num_kv_heads=vision.num_key_value_heads,
            head_dim=vision.head_dim,
            intermediate_size=vision.intermediate_size,
            patch_size=vision.patch_size,
            pooling_kernel_size=vision.pooling_kernel_size,
            position_embedding_size=vision.position_embedding_size,
            standardize=bool(vision.standardize),
            text_hidden_size=text.hidden_size,
            image_token_id=resolved.image_token_id,
            boi_token_id=resolved.boi_token_id,
            eoi_token_id=resolved.eoi_token_id,
            bidirectional=getattr(text, "use_bidirectional_attention", None) == "vision",
        )

    @property
    def patch_pixels(self) -> int:
        """Values per patch: 3 channels of patch_size x patch_size."""
        return 3 * self.patch_size**2

    def max_patches(self, max_soft_tokens: int) -> int:
        """The image processor's patch count per image for `max_soft_tokens` (each soft token pools k x k)."""
        return max_soft_tokens * self.pooling_kernel_size**2

    def to_dict(self) -> dict:
        return asdict(self)


def has_vision_tower(names) -> bool:  # noqa: ANN001 (an iterable of checkpoint tensor names)
    """Whether a checkpoint holds the tower's weights (a text-only checkpoint does not)."""
    return any(name.startswith(TOWER_PREFIXES[0]) for name in names)


def key_padding_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias [I, 1, 1, P]: 0 on valid patches, the dtype's most negative value on padding.

    transformers' bidirectional mask for eager attention: every query sees every valid key.
    """
    zero = torch.zeros((), dtype=dtype, device=valid.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=valid.device)
    return torch.where(valid[:, None, None, :], zero, neg)


def vision_attend(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Gemma4VisionAttention.forward in eager form (scaling 1.0, QK-norm, v-norm, 2-D RoPE)."""
    images, patches, _ = hidden.shape
    config, head_dim = attn.config, attn.head_dim
    query = attn.q_proj(hidden).view(images, patches, config.num_attention_heads, head_dim)  # [I, P, Q, D]
    query = apply_multidimensional_rope(attn.q_norm(query), cos, sin, positions).transpose(1, 2)  # [I, Q, P, D]
    key = attn.k_proj(hidden).view(images, patches, config.num_key_value_heads, head_dim)  # [I, P, G, D]
    key = apply_multidimensional_rope(attn.k_norm(key), cos, sin, positions).transpose(1, 2)  # [I, G, P, D]
    value = attn.v_proj(hidden).view(images, patches, config.num_key_value_heads, head_dim)
    value = attn.v_norm(value).transpose(1, 2)  # [I, G, P, D]
    keys = repeat_kv(key, attn.num_key_value_groups)  # [I, Q, P, D]
    values = repeat_kv(value, attn.num_key_value_groups)
    scores = torch.matmul(query, keys.transpose(2, 3))  # [I, Q, P, P]
    if attn.scaling != 1.0:
        scores = scores * attn.scaling
    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(images, patches, -1)  # [I, P, Q*D]
    return attn.o_proj(out)


def vision_layer_forward(
    layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Gemma4VisionEncoderLayer.forward: sandwich norms around the attention and the gated MLP."""
    residual = hidden
    attn_out = vision_attend(layer.self_attn, layer.input_layernorm(hidden), cos, sin, positions, bias)
    hidden = residual + layer.post_attention_layernorm(attn_out)
    residual = hidden
    return residual + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))


class VisionEncoder(nn.Module):
    """Pixels and patch positions -> soft tokens in the text model's space, padded per image.

    Inputs: pixel_values [I, P, 3*patch^2] float32 in [0, 1] (the image processor's output, zero on
    padding patches), pixel_position_ids [I, P, 2] int64 ((x, y) per patch, (-1, -1) on padding).
    Output: [I, S, Ht] in the model's dtype, S = P / k^2; image i's valid soft tokens are rows
    0..n_i-1 (n_i: the processor's num_soft_tokens_per_image), the rest are padding (what an empty
    cell becomes: finite, never read).
    P is fixed per graph: the pooler's cell count is P / k^2, a shape, so one graph serves one
    max_soft_tokens.
    """

    def __init__(self, model) -> None:  # noqa: ANN001 (DiffusionGemmaForBlockDiffusion)
        super().__init__()
        encoder = model.model.encoder
        self.tower = encoder.vision_tower
        self.embed_vision = encoder.embed_vision

    def forward(self, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        kernel = tower.config.pooling_kernel_size
        soft_tokens = pixel_values.shape[-2] // (kernel * kernel)  # S
        padding = (pixel_position_ids == -1).all(dim=-1)  # [I, P]
        hidden = tower.patch_embedder(pixel_values, pixel_position_ids, padding)  # [I, P, Hv]
        cos, sin = tower.encoder.rotary_emb(hidden, pixel_position_ids)  # [I, P, D] each
        bias = key_padding_bias(~padding, hidden.dtype)  # [I, 1, 1, P]
        for layer in tower.encoder.layers:
            hidden = vision_layer_forward(layer, hidden, cos, sin, pixel_position_ids, bias)
        pooled, _ = tower.pooler(hidden, pixel_position_ids, padding, soft_tokens)  # [I, S, Hv] float32
        if tower.config.standardize:
            pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
        return self.embed_vision(pooled.to(hidden.dtype))  # [I, S, Ht]


def reference_image_features(model, pixel_values: torch.Tensor, pixel_position_ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """transformers' own image features, as its encoder merges them: [sum n_i, Ht], images in order."""
    with torch.no_grad():
        return model.model.encoder.get_image_features(pixel_values, pixel_position_ids).pooler_output


def valid_rows(soft_tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[I, S, Ht] padded per image -> [sum n_i, Ht]: each image's first n_i rows, images in order."""
    return torch.cat([soft_tokens[i, :n] for i, n in enumerate(counts)], dim=0)
