"""DiffusionGemma's compiled step (encoder pass and denoise step in one) as an export-friendly module.

transformers' `DiffusionGemmaForBlockDiffusion` is the source of truth. These modules call its own
submodules (projections, norms, rotary embedding, router, MLPs) and re-state only what does not
export: the `Cache` object (replaced by plain K/V tensors the caller owns), the mask factories
(replaced by masks built from two boolean validity tensors), and the experts' loop over
`nonzero()` (replaced by every expert on every token, weighted by a dense routing matrix, which
is exact because unrouted experts get weight zero). `ImageStep` adds what the first encoder pass of
a prompt with images needs: the image soft tokens scattered in at their rows (the reference's
`masked_scatter`), and each image's block id, which lets an image attend to itself
bidirectionally (the reference's `blockwise_overlay`, under `use_bidirectional_attention == "vision"`).

Letters: B batch, T new tokens, R rows denoised (T or 0), C canvas, P cache length (Pf full
layers, Ps sliding layers), H hidden, Q query heads, G key/value heads, D head dim, N tokens (B*T),
E experts, K active experts, I expert width, V vocab, S image soft tokens in the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    DiffusionGemmaForBlockDiffusion,
    apply_rotary_pos_emb,
    repeat_kv,
)

from dllm_trt.contract import OUTSIDE_LAYERS

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """What the runtime needs to know about one layer's cache."""

    index: int
    sliding: bool
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # full layers have no v_proj: V is the raw k_proj output through v_norm


def specs_of(layers: nn.ModuleList) -> list[LayerSpec]:
    return [
        LayerSpec(
            index=i,
            sliding=layer.self_attn.is_sliding,
            head_dim=layer.self_attn.head_dim,
            num_kv_heads=layer.self_attn.k_proj.out_features // layer.self_attn.head_dim,
            k_eq_v=layer.self_attn.v_proj is None,
        )
        for i, layer in enumerate(layers)
    ]


def layer_specs(model: DiffusionGemmaForBlockDiffusion) -> list[LayerSpec]:
    return specs_of(model.model.decoder.layers)


# Fusible ops per layer, read off the modules the step runs (Step: the decoder's layers, its final norm and
# self-conditioning block). Rotary embedding is a function each attention applies to Q and to K: two per
# attention module. Keys: "0".."L-1", and OUTSIDE_LAYERS for what runs before or after the layers.


def fusible_ops(model: DiffusionGemmaForBlockDiffusion) -> dict[str, dict[str, int]]:
    """{op: {layer: how many}} for rms_norm, rotary_embedding, attention, moe, sampling_head: what optimize
    must fuse."""
    decoder = model.model.decoder
    census: dict[str, dict[str, int]] = {op: {} for op in ("rms_norm", "rotary_embedding", "attention", "moe")}
    census["sampling_head"] = {OUTSIDE_LAYERS: 1}  # over the LM head's logits, whichever the step hands out

    def add(op: str, where: str, count: int = 1) -> None:
        census[op][where] = census[op].get(where, 0) + count

    for index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            kind = type(module).__name__
            if kind.endswith("RMSNorm"):
                add("rms_norm", str(index))
            elif kind.endswith("Attention"):
                add("attention", str(index))
                add("rotary_embedding", str(index), 2)
            elif kind.endswith("Experts"):
                add("moe", str(index))
    for part in (decoder.norm, decoder.self_conditioning):
        for module in part.modules():
            if type(module).__name__.endswith("RMSNorm"):
                add("rms_norm", OUTSIDE_LAYERS)
    return census


def attention_bias(
    key_valid: torch.Tensor,
    num_queries: int,
    causal: bool,
    window: int | None,
    dtype: torch.dtype,
    overlay: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive mask [B, 1, T, L] for T queries that are the last T of L keys.

    Uses the dtype's most negative finite value, as transformers' eager path does, so that a row
    with no valid key (a left-padding query) stays finite instead of turning into NaN. `overlay`
    [B, 1, T, L] bool also allows what it marks, whatever the causal and window rules say, as
    transformers' or_masks does before it applies the padding.
    """
    length = key_valid.shape[1]
    key_pos = torch.arange(length, device=key_valid.device)  # [L]
    query_pos = torch.arange(num_queries, device=key_valid.device) + (length - num_queries)  # [T]
    allowed = key_valid[:, None, None, :]  # [B, 1, 1, L]
    if causal:
        allowed = allowed & (key_pos[None, :] <= query_pos[:, None])
    if window is not None:
        # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window
        allowed = allowed & (key_pos[None, :] > query_pos[:, None] - window)
    if overlay is not None:
        allowed = allowed | (key_valid[:, None, None, :] & overlay)
    zero = torch.zeros((), dtype=dtype, device=key_valid.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=key_valid.device)
    return torch.where(allowed, zero, neg)


def image_block_ids(image_rows: torch.Tensor, block_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: each new token's image block (transformers' block_sequence_ids), -1 on text.

    image_rows [S] are flat indices b * T + t of the image tokens, block_ids [S] their blocks.
    """
    flat = torch.full_like(input_ids.reshape(-1), -1).index_put((image_rows,), block_ids)  # [B*T]
    return flat.view(input_ids.shape)


def same_image(token_blocks: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, P + T] bool: query and key in the same image (transformers' blockwise_overlay).

    token_blocks [B, T] of the new tokens; `cached` [B, P] any tensor shaped like the keys in the
    cache (no cached key is in an image of this pass: images are never split across passes).
    """
    keys = torch.cat([torch.full_like(cached, -1, dtype=token_blocks.dtype), token_blocks], dim=1)  # [B, P + T]
    query = token_blocks[:, :, None]  # [B, T, 1]
    return ((query == keys[:, None, :]) & (query >= 0))[:, None]


def merge_image_embeds(embeds: torch.Tensor, image_embeds: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
    """[B, T, H] with row image_rows[s] (flat b * T + t) replaced by image_embeds[s]: the reference's masked_scatter."""
    flat = embeds.reshape(-1, embeds.shape[-1])  # [B*T, H]
    return flat.index_put((image_rows,), image_embeds.to(flat.dtype)).view(embeds.shape)


def attend(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference attention (eager form) over cache + new tokens; returns output and new K/V."""
    batch, tokens, _ = hidden.shape
    head_dim = attn.head_dim
    query = attn.q_proj(hidden).view(batch, tokens, -1, head_dim)  # [B, T, Q, D]
    query = apply_rotary_pos_emb(attn.q_norm(query), cos, sin, unsqueeze_dim=2).transpose(1, 2)  # [B, Q, T, D]
    key_raw = attn.k_proj(hidden).view(batch, tokens, -1, head_dim)  # [B, T, G, D]
    value_raw = attn.v_proj(hidden).view(batch, tokens, -1, head_dim) if attn.v_proj is not None else key_raw
    key = apply_rotary_pos_emb(attn.k_norm(key_raw), cos, sin, unsqueeze_dim=2).transpose(1, 2)  # [B, G, T, D]
    value = attn.v_norm(value_raw).transpose(1, 2)  # [B, G, T, D]

    keys = repeat_kv(torch.cat([past_key, key], dim=2), attn.num_key_value_groups)  # [B, Q, P+T, D]
    values = repeat_kv(torch.cat([past_value, value], dim=2), attn.num_key_value_groups)
    scores = torch.matmul(query, keys.transpose(2, 3))  # [B, Q, T, P+T]
    if attn.scaling != 1.0:
        scores = scores * attn.scaling
    probs = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(batch, tokens, -1)  # [B, T, Q*D]
    return attn.o_proj(out), key, value


def moe_all_experts(
    experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token, weighted by the routing matrix: no data-dependent shapes.

    hidden [N, H], top_k_index/top_k_weights [N, K] -> [N, H]. Exact: an expert a token was not
    routed to gets weight 0. Costs E/K times the routed FLOPs; the optimize stage replaces it.
    """
    num_experts = experts.gate_up_proj.shape[0]
    dense = torch.zeros(hidden.shape[0], num_experts, dtype=top_k_weights.dtype, device=hidden.device).scatter(
        1, top_k_index, top_k_weights
    )  # [N, E]
    gate_up = torch.matmul(hidden.unsqueeze(0), experts.gate_up_proj.transpose(1, 2))  # [E, N, 2I]
    gate, up = gate_up.chunk(2, dim=-1)  # [E, N, I] each
    act = experts.act_fn(gate) * up
    out = torch.matmul(act, experts.down_proj.transpose(1, 2))  # [E, N, H]
    out = out * dense.transpose(0, 1).unsqueeze(-1).to(out.dtype)
    return out.sum(dim=0)


def layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    bias: torch.Tensor,
    dense_moe: bool = True,
    moe: RoutedExperts | None = None,
    index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder/encoder layer (layer `index` of its model) in the reference's order.

    `dense_moe` picks the exportable every-expert form; False calls transformers' own experts
    (faster in eager torch, but data-dependent, so not exportable). `moe` replaces the router and
    experts both (generation.triton_step: the fused kernels route as well).
    """
    residual = hidden
    attn_out, key, value = attend(layer.self_attn, layer.input_layernorm(hidden), cos, sin, past_key, past_value, bias)
    hidden = residual + layer.post_attention_layernorm(attn_out)

    residual = hidden
    dense_out = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    flat = residual.reshape(-1, residual.shape[-1])  # [N, H]
    if moe is not None:
        moe_out = moe(index, layer, flat, layer.pre_feedforward_layernorm_2(flat))
    else:
        _, top_k_weights, top_k_index = layer.router(flat)
        experts = moe_all_experts if dense_moe else lambda mod, *args: mod(*args)
        moe_out = experts(layer.experts, layer.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
    moe_out = layer.post_feedforward_layernorm_2(moe_out.reshape(residual.shape))
    hidden = residual + layer.post_feedforward_layernorm(dense_out + moe_out)
    return hidden * layer.layer_scalar, key, value


class RoutedExperts(Protocol):
    """A layer's router and experts in one: (layer index, layer, residual [N, H], its MoE-input norm [N, H]) ->
    the experts' weighted sum [N, H], before post_feedforward_layernorm_2."""

    def __call__(self, index: int, layer: nn.Module, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor: ...


class _StepBase(nn.Module):
    def __init__(
        self, text_model: nn.Module, window: int, dense_moe: bool, moe: RoutedExperts | None = None,
        layers: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dense_moe = dense_moe
        self.moe = moe
        self.embed_tokens = text_model.embed_tokens
        # the first `layers` only where asked (a bench separates the layers' cost from the rest's)
        self.layers = text_model.layers if layers is None else nn.ModuleList(list(text_model.layers)[:layers])
        self.rotary_emb = text_model.rotary_emb
        self.window = window
        self.specs = specs_of(self.layers)

    def _rope(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[bool, tuple]:
        types = {spec.sliding for spec in self.specs}
        return {s: self.rotary_emb(hidden, position_ids, SLIDING if s else FULL) for s in types}

    def _cache_valid(self, cache_mask: torch.Tensor, past: tuple[torch.Tensor, ...]) -> dict[bool, torch.Tensor]:
        """Per layer type, the validity of the cached keys that layer holds (sliding: the last Ps)."""
        valid = {}
        for spec in self.specs:
            if spec.sliding not in valid:
                cached = past[2 * spec.index].shape[2]
                valid[spec.sliding] = cache_mask[:, cache_mask.shape[1] - cached :]  # [B, P_layer]
        return valid


class Step(_StepBase):
    """The encoder step and the denoise step as one module over one copy of the weights.

    The rows of `self_conditioning` say which: R = T rows denoise the T canvas tokens
    (bidirectional over cache and canvas, the self-conditioning block on every row, logits for every
    row), R = 0 encodes T new tokens (causal, a sliding window on sliding layers, no
    self-conditioning, no logits: the LM head runs over no row). Both return the K/V of the T new
    tokens; the runtime appends them to its cache after an encoder pass and ignores them after a
    denoise step. The phase comes from a shape, not a flag, so one graph (one engine, one profile
    per phase) serves both, and nothing can disagree with it.

    Inputs: input_ids [B, T] int64, position_ids [B, T] int64, input_mask [B, T] bool (False at
    padding; all True for a canvas), cache_mask [B, Pf] bool (validity of the full layers' cache;
    sliding layers hold its last Ps positions), self_conditioning [B, R, H] (the soft embedding of
    the previous step's processed logits, zeros on a canvas's first step, as the reference does; R
    is T or 0), then past_key.i / past_value.i [B, G, P, D] for every layer i.
    Outputs: key.i / value.i [B, G, T, D] for every layer i, then logits [B, R, V] float32.
    """

    def __init__(
        self, model: DiffusionGemmaForBlockDiffusion, dense_moe: bool = True, moe: RoutedExperts | None = None,
        layers: int | None = None,
    ) -> None:  # fmt: skip
        decoder = model.model.decoder  # its layers and embedding are the encoder's (tied in the checkpoint)
        super().__init__(decoder, model.config.text_config.sliding_window, dense_moe, moe, layers)
        self.self_conditioning = decoder.self_conditioning
        self.norm = decoder.norm
        self.lm_head = model.lm_head
        self.softcap = model.final_logit_softcapping

    def forward(self, input_ids, position_ids, input_mask, cache_mask, self_conditioning, *past):  # noqa: ANN001, ANN201
        return self.run(input_ids, position_ids, input_mask, cache_mask, self_conditioning, past)

    def run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        input_mask: torch.Tensor,
        cache_mask: torch.Tensor,
        self_conditioning: torch.Tensor,
        past: tuple[torch.Tensor, ...] | list[torch.Tensor],
        images: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The step; `images` (image_embeds [S, H], image_rows [S], image_block_ids [S]) for ImageStep."""
        tokens, rows = input_ids.shape[1], self_conditioning.shape[1]  # T, R
        torch._check(rows <= tokens)
        embeds = self.embed_tokens(input_ids)  # [B, T, H]
        token_blocks = None
        if images is not None:
            image_embeds, image_rows, block_ids = images
            embeds = merge_image_embeds(embeds, image_embeds, image_rows)
            token_blocks = image_block_ids(image_rows, block_ids, input_ids)  # [B, T]
        conditioned = self.self_conditioning(embeds[:, :rows], self_conditioning)  # [B, R, H]
        hidden = torch.cat([conditioned, embeds[:, rows:]], dim=1)  # [B, T, H]
        # The phase as a tensor computed from the row count (a Python bool would be traced as a guard).
        denoise = torch.ones_like(self_conditioning[:, :, 0]).sum(dim=1) > 0  # [B]
        rope = self._rope(hidden, position_ids)
        biases = {}
        for sliding, valid in self._cache_valid(cache_mask, past).items():
            keys = torch.cat([valid, input_mask], dim=1)  # [B, P + T]
            overlay = None
            if token_blocks is not None:
                # sized by this layer type's cached keys themselves, so the graph knows the overlay, the bias
                # and the scores share the key axis (from the mask slice it would be a size of its own)
                first = next(spec.index for spec in self.specs if spec.sliding == sliding)
                overlay = same_image(token_blocks, past[2 * first][:, 0, :, 0])  # [B, 1, T, P + T]
            causal = attention_bias(keys, tokens, True, self.window if sliding else None, hidden.dtype, overlay)
            # The canvas attends bidirectionally to every valid cached key and to itself, sliding or not:
            # sliding layers see only what their cache holds (the last Ps positions).
            bidirectional = attention_bias(keys, tokens, False, None, hidden.dtype)
            biases[sliding] = torch.where(denoise[:, None, None, None], bidirectional, causal)  # [B, 1, T, P + T]
        outputs = []
        for spec, layer in zip(self.specs, self.layers):
            cos, sin = rope[spec.sliding]
            hidden, key, value = layer_forward(
                layer, hidden, cos, sin, past[2 * spec.index], past[2 * spec.index + 1], biases[spec.sliding],
                dense_moe=self.dense_moe, moe=self.moe, index=spec.index,
            )  # fmt: skip
            outputs += [key, value]
        logits = self.lm_head(self.norm(hidden[:, :rows])).to(torch.float32)  # [B, R, V]
        return (*outputs, torch.tanh(logits / self.softcap) * self.softcap)


class ImageStep(Step):
    """The step of a checkpoint with a vision tower: three more inputs, used by a prompt's first encoder pass.

    image_embeds [S, H] (the vision graph's soft tokens of the pass's images, valid rows only, in the
    model dtype), image_rows [S] int64 (where each goes: flat index b * T + t of its image token) and
    image_block_ids [S] int64 (its image's block: tokens of one image attend to each other
    bidirectionally in this pass; -1 keeps the pass causal, as transformers does without
    `use_bidirectional_attention == "vision"`). Every other call passes S = 0: a text-only pass
    and the denoise step compute what Step computes.
    """

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        input_mask: torch.Tensor,
        cache_mask: torch.Tensor,
        self_conditioning: torch.Tensor,
        image_embeds: torch.Tensor,
        image_rows: torch.Tensor,
        image_block_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        images = (image_embeds, image_rows, image_block_ids)
        return self.run(input_ids, position_ids, input_mask, cache_mask, self_conditioning, past, images)


class SoftEmbedding(nn.Module):
    """The self-conditioning input for the next step: softmax(processed logits) @ E * sqrt(H).

    processed_logits [B, C, V] in the model dtype (the reference casts them to the embedding
    dtype before handing them on) -> [B, C, H], exactly as the reference decoder computes it.
    """

    def __init__(self, model: DiffusionGemmaForBlockDiffusion) -> None:
        super().__init__()
        self.embed_tokens = model.model.decoder.embed_tokens

    def forward(self, processed_logits: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight
        probs = processed_logits.softmax(dim=-1, dtype=torch.float32).to(weight.dtype)
        return torch.matmul(probs, weight) * self.embed_tokens.embed_scale.to(weight.dtype)


def soft_embedding(model: DiffusionGemmaForBlockDiffusion, processed_logits: torch.Tensor) -> torch.Tensor:
    return SoftEmbedding(model)(processed_logits)
