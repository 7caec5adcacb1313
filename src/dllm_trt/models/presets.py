"""Small DiffusionGemma configurations of the real architecture, and random checkpoints made from them.

Every preset keeps every architectural feature of the released 26B-A4B model: sliding and full
layers, full layers with their own head dim and key/value heads and K = V (no v_proj), GQA, the
dense GeGLU MLP in parallel with the MoE branch, per-expert scales, the logit softcap and the
self-conditioning block. Only the sizes shrink.

`full-width` keeps the released widths and dtype (bfloat16): a layer is about 1.6 GB. It is
written tensor by tensor into safetensors shards with an index (`write_streamed_checkpoint`),
never holding more than one chunk of one tensor, so any layer count fits in memory.

The `-vision` presets add a Gemma 4 vision tower (`tiny-vision`, `small-vision`; `full-width-vision`
with the released tower's widths: 27 layers, hidden 1152, 16 heads of 72) and the image tokens, with
images attending to themselves bidirectionally in the encoder pass (`use_bidirectional_attention`
"vision"). The text presets are text-only checkpoints: transformers builds a tower for every
DiffusionGemma config (a placeholder one, TEXT_ONLY_VISION, here), but their files hold none of its
weights, which is what tells the export there is no tower to export.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)

from dllm_trt.models.vision import TOWER_PREFIXES

# transformers builds a vision tower for every DiffusionGemma config: the text presets' placeholder, as small
# as transformers allows, never written to their checkpoints (models.vision.has_vision_tower).
TEXT_ONLY_VISION = TINY_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
)

# Released 26B-A4B text widths (see DESIGN.md); the presets below scale them down.
PRESETS: dict[str, dict] = {
    # Unit tests: seconds. Window 8 < canvas + prompt, so one generation already passes the window.
    "tiny": dict(
        text=dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            sliding_window=8,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=32,
            max_position_embeddings=4096,
        ),
        canvas_length=8,
        max_denoising_steps=12,
    ),
    # Benchmarks: about 25M parameters.
    "small": dict(
        text=dict(
            vocab_size=8192,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            global_head_dim=128,
            num_global_key_value_heads=1,
            sliding_window=256,
            num_experts=32,
            top_k_experts=4,
            moe_intermediate_size=128,
            max_position_embeddings=8192,
        ),
        canvas_length=64,
        max_denoising_steps=48,
    ),
    # The released widths with few layers: real tensor sizes, for the bounded-memory export.
    "full-width": dict(
        text=dict(
            vocab_size=262_144,
            hidden_size=2816,
            intermediate_size=2112,
            num_hidden_layers=2,
            layer_types=["sliding_attention", "full_attention"],
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            global_head_dim=512,
            num_global_key_value_heads=2,
            sliding_window=1024,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=704,
            max_position_embeddings=262_144,
        ),
        canvas_length=256,
        max_denoising_steps=48,
        dtype="bfloat16",  # the released checkpoint's dtype; written streamed (see write_streamed_checkpoint)
    ),
}

# The tiny preset with the released full layers' attention shape: head 512, 16 query heads over 2 key/value
# heads (the head size TensorRT fuses no attention for: the DllmAttention plugin's case).
PRESETS["tiny-head512"] = dict(
    PRESETS["tiny"],
    text=dict(PRESETS["tiny"]["text"], num_attention_heads=16, global_head_dim=512, num_global_key_value_heads=2),
)

# Vision towers of the `-vision` presets. Head size 72 in every one (the released tower's): what fuses in
# TensorRT at that size is what the engines of the small presets show. tiny standardizes its soft tokens
# (the optional std_bias/std_scale path); the others keep transformers' default.
VISION_TOWERS: dict[str, dict] = {
    "tiny": dict(hidden_size=144, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=72, standardize=True),
    "small": dict(hidden_size=288, intermediate_size=576, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=72),
    "full-width": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       num_key_value_heads=16, head_dim=72),
}  # fmt: skip
for _text_preset, _tower in VISION_TOWERS.items():
    PRESETS[f"{_text_preset}-vision"] = dict(PRESETS[_text_preset], vision=dict(model_type="gemma4_vision", **_tower))


def has_tower(preset: str) -> bool:
    """Whether the preset's checkpoint holds a vision tower (the text presets' do not)."""
    return "vision" in PRESETS[preset]


def build_config(preset: str, num_layers: int | None = None) -> DiffusionGemmaConfig:
    spec = PRESETS[preset]
    text = dict(spec["text"])
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
        # 5 sliding : 1 full, the last layer always full, as the released model.
        text["layer_types"] = [
            "full_attention" if (i + 1) % 6 == 0 or i == num_layers - 1 else "sliding_attention"
            for i in range(num_layers)
        ]
    if "vision" not in spec:
        canvas = spec["canvas_length"]
        return DiffusionGemmaConfig(text_config=text, vision_config=TEXT_ONLY_VISION, canvas_length=canvas)
    # The image tokens at the end of the vocabulary (the released ids, 255999 and up, are past a small one).
    vocab = text["vocab_size"]
    text["use_bidirectional_attention"] = "vision"
    return DiffusionGemmaConfig(
        text_config=text, vision_config=spec["vision"], canvas_length=spec["canvas_length"],
        boi_token_id=vocab - 3, eoi_token_id=vocab - 2, image_token_id=vocab - 1,
    )  # fmt: skip


def generation_config_for(preset: str) -> DiffusionGemmaGenerationConfig:
    return DiffusionGemmaGenerationConfig(
        max_denoising_steps=PRESETS[preset]["max_denoising_steps"],
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
        t_min=0.4,
        t_max=0.8,
        stability_threshold=1,
        confidence_threshold=0.005,
        eos_token_id=[1],
        pad_token_id=0,
        bos_token_id=2,
    )


@torch.no_grad()
def randomize_(model: DiffusionGemmaForBlockDiffusion, seed: int, tower: bool = False) -> None:
    """Random weights that exercise every parameter the reference multiplies by.

    transformers initialises norms, router scales, per-expert scales and layer scalars to one;
    a parity check against ones cannot tell a missing multiply from a correct one, so those get
    values around one. Linear weights get std 0.5/sqrt(fan_in): logits stay well spread (not every
    prediction a near tie), while the self-conditioning feedback from one denoise step to the next
    stays contracting. At std 1/sqrt(fan_in) that loop amplifies float32 round-off about 3x per
    step, so any two correct implementations part ways after ~12 steps; a trained model, confident
    in its predictions, contracts as well. At the `small` sizes (6 layers, vocab 8192) the loop still
    amplified round-off about 4x per step, so the self-conditioning block's output projection is
    scaled down a further 10x: its signal stays in every step (parity still sees it), the loop
    contracts. `tower`: the vision tower gets the same treatment (its norms, position table and
    standardize buffers included), else it is left as transformers initialises it (never written).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "vision" in name and not tower:
            continue
        if param.ndim == 1:
            param.copy_(1.0 + 0.25 * torch.randn(param.shape, generator=gen))
        else:
            fan_in = param.shape[-1]
            param.copy_(0.5 * torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    model.model.decoder.self_conditioning.down_proj.weight.mul_(0.1)
    text = model.config.text_config
    if text.pad_token_id is not None:
        model.model.decoder.embed_tokens.weight[text.pad_token_id].zero_()
    # Encoder and decoder layers hold separate (untied) layer_scalar buffers; a checkpoint has both.
    scalars = 1.0 + 0.25 * torch.rand(text.num_hidden_layers, generator=gen)
    for layers in (model.model.encoder.language_model.layers, model.model.decoder.layers):
        for layer, value in zip(layers, scalars):
            layer.layer_scalar.fill_(float(value))
    vision = model.model.encoder.vision_tower
    if tower and vision.config.standardize:
        vision.std_bias.copy_(0.25 * torch.randn(vision.std_bias.shape, generator=gen))
        vision.std_scale.copy_(1.0 + 0.25 * torch.randn(vision.std_scale.shape, generator=gen))


@torch.no_grad()
def build_random_model(
    preset: str,
    num_layers: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> DiffusionGemmaForBlockDiffusion:
    """A model of `preset` with random weights made where it will run (a GPU builds the released widths in
    seconds; no checkpoint is written or read). Built on the meta device and tied first, so each tied tensor
    (every encoder layer is its decoder layer) is allocated once; derived buffers (RoPE frequencies, the
    embedding scale) come from transformers' own `_init_weights`; weights get randomize_'s distributions."""
    dtype = dtype or getattr(torch, PRESETS[preset].get("dtype", "float32"))
    config = build_config(preset, num_layers)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DiffusionGemmaForBlockDiffusion(config)
    finally:
        torch.set_default_dtype(default)
    model.tie_weights()
    made: dict[int, torch.Tensor] = {}  # by id of the meta tensor: tied tensors stay one tensor
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for name, tensor in group.items():
                if tensor is not None and tensor.is_meta:
                    if id(tensor) not in made:
                        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                        made[id(tensor)] = torch.nn.Parameter(empty, False) if group is module._parameters else empty
                    group[name] = made[id(tensor)]
    for name, module in model.named_modules():
        if "vision" not in name:
            model._init_weights(module)
        else:  # never run (text only); transformers' init needs what its minimal config lacks
            for buffer in module._buffers.values():
                if buffer is not None:
                    buffer.zero_()
    gen = torch.Generator(device=device).manual_seed(seed)
    for param in model.parameters():
        if param.ndim == 1:
            param.normal_(1.0, 0.25, generator=gen)
        else:
            param.normal_(0.0, 0.5 / math.sqrt(param.shape[-1]), generator=gen)
    model.model.decoder.self_conditioning.down_proj.weight.mul_(0.1)
    text = model.config.text_config
    if text.pad_token_id is not None:
        model.model.decoder.embed_tokens.weight[text.pad_token_id].zero_()
    for layers in (model.model.encoder.language_model.layers, model.model.decoder.layers):
        for layer in layers:
            layer.layer_scalar.uniform_(1.0, 1.25, generator=gen)
    model.generation_config = generation_config_for(preset)
    return model.eval()


def make_checkpoint(
    out: Path, preset: str = "tiny", seed: int = 0, num_layers: int | None = None
) -> DiffusionGemmaForBlockDiffusion:
    """Write a random checkpoint of `preset` in the Hugging Face layout (safetensors).

    Presets with a `dtype` (full-width) are written streamed and return the model on the meta
    device (structure and parameter counts, no weights); the others are built in memory.
    """
    if "dtype" in PRESETS[preset]:
        dtype = getattr(torch, PRESETS[preset]["dtype"])
        return write_streamed_checkpoint(out, preset, seed, num_layers, dtype=dtype)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(build_config(preset, num_layers)).eval()
    tower = has_tower(preset)
    randomize_(model, seed, tower=tower)
    model.generation_config = generation_config_for(preset)
    save_checkpoint(model, out, tower)
    return model


def save_checkpoint(model: DiffusionGemmaForBlockDiffusion, out: Path, tower: bool) -> None:
    """save_pretrained (safetensors); without `tower` a text-only checkpoint: none of the tower's weights."""
    state = None if tower else {k: v for k, v in model.state_dict().items() if not _is_tower(k)}
    model.save_pretrained(out, safe_serialization=True, state_dict=state)


def _is_tower(name: str) -> bool:
    return name.startswith(TOWER_PREFIXES)


# Shards of about this size: a full-width layer (about 1.6 GB in bfloat16) per shard, like released checkpoints.
STREAMED_SHARD_BYTES = 2 << 30
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_CHUNK_ELEMENTS = 1 << 24  # random values are drawn in pieces of this many float32 elements (64 MB)


def _random_tensor_chunks(name: str, shape: tuple[int, ...], seed: int, vocab_pad: int | None):
    """The values `randomize_` gives such a tensor, drawn in row chunks from a generator of its own.

    Same distributions as `randomize_` (vectors about one, matrices std 0.5/sqrt(fan_in), the
    padding row of the embedding zero, layer scalars 1 + 0.25 U[0,1), equal in encoder and
    decoder; the vision tower's alike), but each tensor has its own seed, so a tensor can be drawn
    alone and in pieces.
    """
    if name.endswith("layer_scalar"):
        layer = name.split(".layers.")[1].split(".")[0]  # encoder and decoder layer i share the value
        gen = torch.Generator().manual_seed(_tensor_seed(f"layer_scalar.{layer}", seed))
        yield 1.0 + 0.25 * torch.rand(shape, generator=gen)
        return
    gen = torch.Generator().manual_seed(_tensor_seed(name, seed))
    if len(shape) <= 1:
        center = 0.0 if name.endswith("std_bias") else 1.0  # a standardize bias about zero, every scale about one
        yield 0.25 * torch.randn(shape, generator=gen) + center
        return
    scale = 0.5 / math.sqrt(shape[-1])
    row = math.prod(shape[1:])
    step = max(1, _CHUNK_ELEMENTS // row)
    for first in range(0, shape[0], step):
        chunk = scale * torch.randn((min(step, shape[0] - first), *shape[1:]), generator=gen)
        if vocab_pad is not None and first <= vocab_pad < first + chunk.shape[0]:
            chunk[vocab_pad - first].zero_()
        yield chunk


def _tensor_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def write_streamed_checkpoint(
    out: Path,
    preset: str,
    seed: int = 0,
    num_layers: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = STREAMED_SHARD_BYTES,
) -> DiffusionGemmaForBlockDiffusion:
    """A random checkpoint written tensor by tensor: safetensors shards plus `model.safetensors.index.json`.

    The keys are exactly those `save_pretrained` writes (tied copies left out); returns the model
    on the meta device.
    """
    config = build_config(preset, num_layers)
    config.dtype = dtype  # so that from_pretrained(dtype="auto") loads it in its own dtype
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config).eval()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    tower = has_tower(preset)
    entries = [
        (k, tuple(v.shape)) for k, v in model.state_dict().items() if k not in tied and (tower or not _is_tower(k))
    ]
    itemsize = dtype.itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in entries:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    pad = config.text_config.pad_token_id
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / file, shard, dtype, seed, pad)
        weight_map.update({key: file for key, _ in shard})
    if len(shards) > 1:
        total = sum(math.prod(shape) * itemsize for _, shape in entries)
        index = dict(metadata=dict(total_size=total), weight_map=weight_map)
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out)
    generation_config_for(preset).save_pretrained(out)
    return model


def _write_safetensors(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int, pad: int | None
) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = dict(dtype=_SAFETENSORS_NAMES[dtype], shape=list(shape), data_offsets=[offset, offset + nbytes])
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for key, shape in tensors:
            vocab_pad = pad if key.endswith("embed_tokens.weight") and "vision" not in key else None
            for chunk in _random_tensor_chunks(key, shape, seed, vocab_pad):
                handle.write(memoryview(chunk.to(dtype).reshape(-1).view(torch.uint8).numpy()))
