"""The artifact contract: the names every stage writes and every later stage reads.

File names, graph input and output names, cache tensor names, the fused ops' names, domains and
attributes, stage names, targets and precisions. A leaf: it imports nothing of dllm_trt, so that
every stage can depend on it and none has to import another stage to learn a name.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from typing import Protocol

# ---- files ---------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dllm-trt/2"  # /2: one step graph for the encoder pass and the denoise step
STEP = "step"
STEP_FILE = "step.onnx"
SELF_CONDITIONING_FILE = "self_conditioning.onnx"  # export only: processed logits -> the next step's input
GRAPH_FILES = {STEP: STEP_FILE}  # the graphs optimize and build act on
# Files a runtime needs beside the graphs: how to generate, and how to tokenize when there is a tokenizer.
CARRIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "processor_config.json",  # the image processor's settings, where the checkpoint has them
    "preprocessor_config.json",
)
FUSION_REPORT = "fusion_report"  # .json and .md, written by optimize
BUILD_INFO = "build_info.json"
BUILD_FORMAT = "dllm-trt-build/1"
ENGINE_FILES = {STEP: "step.engine"}

# ---- stages, targets, precisions -----------------------------------------------------------------

# manifest["stage"] of each stage's output
STAGE_EXPORT, STAGE_OPTIMIZE, STAGE_BUILD = "export", "optimize", "build"
TARGETS = ("trt", "ort-cuda", "ort-cpu")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "nvfp4")
# The dtype of each precision's activations and unquantized weights: fp8 and nvfp4 are bf16 graphs
# whose expert and projection weights are stored quantized (optimize.quantize says which).
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "bfloat16", "nvfp4": "bfloat16"}
QUANTIZED_PRECISIONS = ("fp8", "nvfp4")
QUANTIZED_TARGETS = ("trt",)  # the targets whose graphs take quantized weights

# ---- graph inputs and outputs --------------------------------------------------------------------

# The step graph (models.diffusion_gemma.Step): these, then past_key.i / past_value.i. The rows of
# self_conditioning choose the phase: R = T denoise the T canvas tokens, R = 0 encode T new tokens.
STEP_INPUTS = ("input_ids", "position_ids", "input_mask", "cache_mask", "self_conditioning")
ROWS_AXIS = "rows"  # R, the dynamic axis of self_conditioning, the logits and the sampling head
LOGITS = "logits"  # the exported step's last output [B, R, V] fp32, after key.i / value.i
SOFT_EMBEDDING_INPUT, SOFT_EMBEDDING_OUTPUT = "processed_logits", "self_conditioning"
# The sampling head optimize adds to the step over its R rows: its inputs (fp32 always) and outputs.
SAMPLING_INPUTS = ("temperature", "sampling_noise")
SAMPLING_OUTPUTS = ("sampled_ids", "argmax_ids", "entropy", "next_self_conditioning")


class _HasIndex(Protocol):
    index: int


def cache_names(specs: Iterable[_HasIndex], prefix: str) -> list[str]:
    """`key.0, value.0, key.1, ...` (prefix "" for the encoder's outputs, "past_" for cache inputs)."""
    return [f"{prefix}{kind}.{spec.index}" for spec in specs for kind in ("key", "value")]


# ---- fused ops -----------------------------------------------------------------------------------

# The TensorRT MoE plugin node. The parser finds a plugin by op_type + plugin_namespace +
# plugin_version; every other attribute becomes a plugin field.
MOE_OP = "DllmMoE"
PLUGIN_NAMESPACE = "dllm_trt"  # also the ONNX domain of every dllm_trt node
PLUGIN_VERSION = "1"
MOE_ACTIVATION = "gelu_tanh"
# DllmMoE's `weight_format` attribute (a string; absent means "float") and its inputs per format.
# Letters: N tokens, H hidden, E experts, I expert width; T the activation dtype (fp32/fp16/bf16).
#   float  gate_up_proj [E, 2I, H] T, down_proj [E, H, I] T
#   fp8    gate_up_proj [E, 2I, H] float8e4m3fn, down_proj [E, H, I] float8e4m3fn,
#          gate_up_scale [E, 2I] fp32, down_scale [E, H] fp32: one scale per expert and output channel
#   nvfp4  gate_up_proj [E, 2I, H] float4e2m1, down_proj [E, H, I] float4e2m1 (two values a byte),
#          gate_up_block_scale [E, 2I, H/16] float8e4m3fn, down_block_scale [E, H, I/16] float8e4m3fn
#          (one per 16 values along the input axis), gate_up_global_scale [E] fp32, down_global_scale [E] fp32
# weight = value * scale (fp8) or value * block_scale * global_scale (nvfp4), dequantized to fp32
# before the fp32 math of the float format (kernels.quantization).
MOE_WEIGHT_FORMAT = "weight_format"
# Each format's inputs in order, with their dtypes ("T": the activations' float type, "float32",
# "float8_e4m3fn", "float4_e2m1fn" as onnx names them); the experts' weights must be initializers.
_MOE_ROUTING = (("hidden", "T"), ("router_logits", "float32"), ("per_expert_scale", "float32"))
MOE_INPUT_DTYPES = {
    "float": _MOE_ROUTING + (("gate_up_proj", "T"), ("down_proj", "T")),
    "fp8": _MOE_ROUTING + (
        ("gate_up_proj", "float8_e4m3fn"), ("down_proj", "float8_e4m3fn"),
        ("gate_up_scale", "float32"), ("down_scale", "float32"),
    ),
    "nvfp4": _MOE_ROUTING + (
        ("gate_up_proj", "float4_e2m1fn"), ("down_proj", "float4_e2m1fn"),
        ("gate_up_block_scale", "float8_e4m3fn"), ("down_block_scale", "float8_e4m3fn"),
        ("gate_up_global_scale", "float32"), ("down_global_scale", "float32"),
    ),
}  # fmt: skip
MOE_INPUTS = {fmt: tuple(name for name, _ in inputs) for fmt, inputs in MOE_INPUT_DTYPES.items()}
MOE_EXPERT_INPUTS = {fmt: names[len(_MOE_ROUTING) :] for fmt, names in MOE_INPUTS.items()}  # constants
MOE_OUTPUT = "out"
MOE_WEIGHT_FORMATS = tuple(MOE_INPUTS)
ROUTED_MOE = "RoutedMoE"  # the ort-cpu target's model-local function
ORT_MOE_DOMAIN, ORT_MOE_OP = "com.microsoft", "MoE"  # the ort-cuda target's contrib op


# manifest["model"]["fusible_ops"]: {op: {layer: count}}, layers "0".."L-1" and this key for the rest
OUTSIDE_LAYERS = "outside"

# ---- weight names --------------------------------------------------------------------------------

# An initializer made from a checkpoint tensor keeps the tensor's name and adds one `.<derivation>` per
# rewrite that made it (`model.decoder.layers.3.experts.down_proj.T.bfloat16`): export writes `.T` for a
# pre-transposed weight (`.folded` for one the exporter folded into another shape); optimize the dtype's
# name for a cast (`.float16`, `.bfloat16`), `.scaled` for per_expert_scale folded in, and for stored
# quantized weights the values (`.fp8`, `.nvfp4`) and their scales (`.scale`, `.block_scale`,
# `.global_scale`). Readers (per-layer parity) find a checkpoint tensor's initializers through them.
TRANSPOSED, FOLDED, SCALED = "T", "folded", "scaled"
QUANTIZED_VALUES = {"fp8": "fp8", "nvfp4": "nvfp4"}  # precision -> the values' derivation
FP8_SCALE, NVFP4_BLOCK_SCALE, NVFP4_GLOBAL_SCALE = "scale", "block_scale", "global_scale"
LAYER_PREFIX = "model.decoder.layers."


def derived_name(source: str, derivation: str) -> str:
    """The name of a weight made from `source` by `derivation` (one of the suffixes above, or a dtype name)."""
    return f"{source}.{derivation}"


def derives_from(name: str, source: str) -> bool:
    """Whether initializer `name` is checkpoint tensor `source`, under any number of derivations."""
    return name == source or name.startswith(source + ".")


def layer_weight(layer: int, module: str, parameter: str = "weight") -> str:
    """The checkpoint name of `module`'s `parameter` in decoder layer `layer` (`self_attn.q_norm`, ...)."""
    return f"{LAYER_PREFIX}{layer}.{module}.{parameter}"


def layer_of(name: str) -> int | None:
    """The decoder layer a weight name belongs to, or None for weights outside the layers."""
    if not name.startswith(LAYER_PREFIX):
        return None
    index = name[len(LAYER_PREFIX) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def unique_name(taken: Container[str], name: str) -> str:
    """`name`, or `name.1`, `name.2`, ... : the first not in `taken` (two rewrites deriving the same name)."""
    if name not in taken:
        return name
    index = 1
    while f"{name}.{index}" in taken:
        index += 1
    return f"{name}.{index}"

# ---- golden files for Polygraphy (parity.golden) -------------------------------------------------

# `validate --report DIR` writes DIR/golden/; `build --golden DIR/golden` copies it beside the engine.
GOLDEN_DIR = "golden"
GOLDEN_INPUTS = "inputs.json"  # a JSON list of feed dicts: polygraphy run --load-inputs
GOLDEN_OUTPUTS = "outputs.json"  # RunResults of the graph's outputs: polygraphy run --load-outputs
GOLDEN_LAYERS = "layers.json"  # RunResults of the residual stream at every layer boundary
GOLDEN_INFO = "golden.json"  # what the files hold, the tolerances, the commands
GOLDEN_FORMAT = "dllm-trt-golden/1"

# ---- the long-head attention plugin --------------------------------------------------------------

# The TensorRT plugin node `optimize --target trt` puts where TensorRT has no fused attention kernel
# (trt.support.fuses_attention: the released full layers' head size 512, and every fp32 attention), so
# that no attention score goes through memory (kernels.attention_triton). Found by the parser like DllmMoE
# (op_type, plugin_namespace PLUGIN_NAMESPACE, plugin_version PLUGIN_VERSION); its ONNX domain is
# PLUGIN_NAMESPACE. Letters: B batch, Hq query heads, Hkv key/value heads, T queries, S keys, D head dim.
#   query [B, Hq, T, D] T, key [B, Hkv, S, D] T, value [B, Hkv, S, D] T (the KV concatenation stays outside),
#   bias [B, 1, T, S] T: the graph's additive mask (causal or bidirectional, cache validity, padding)
#   -> output [B, Hq, T, D] T;  T fp32 | fp16 | bf16
# Semantics: opset-23 Attention(query, key, value, bias, scale=ATTENTION_SCALE) with grouped-query heads,
# fp32 softmax; a query with no valid key averages V over every key, as transformers' eager attention does.
ATTENTION_OP = "DllmAttention"
ATTENTION_INPUTS = ("query", "key", "value", "bias")
ATTENTION_SCALE = "scale"  # float attribute: the factor on Q K^T (DiffusionGemma: 1.0)

# ---- image input: the vision tower's graphs and the step's image inputs ---------------------------

# One vision graph per max_soft_tokens (the pooler's cell count is a shape), all over one copy of the
# tower's weights; the default count's graph is `vision`, another's `vision-<count>` (files and engines
# alike: vision.onnx, vision-70.onnx, vision.engine). Present only where the checkpoint holds a tower.
VISION = "vision"
DEFAULT_MAX_SOFT_TOKENS = 280  # Gemma4ImageProcessor's default
VISION_INPUTS = ("pixel_values", "pixel_position_ids")  # [I, P, 3*patch^2] float32, [I, P, 2] int64
VISION_OUTPUT = "soft_tokens"  # [I, S, H] in the model dtype: each image's valid rows first
IMAGES_AXIS = "images"  # I, the vision graph's dynamic axis
# The step graph of a checkpoint with a tower takes these after STEP_INPUTS (before the cache):
# image_embeds [S, H] model dtype, image_rows [S] int64 (flat b * T + t), image_block_ids [S] int64.
# S = 0 on every call but a prompt pass with images.
STEP_IMAGE_INPUTS = ("image_embeds", "image_rows", "image_block_ids")
IMAGE_TOKENS_AXIS = "image_tokens"  # S


def vision_graph(max_soft_tokens: int) -> str:
    """The graph (and file stem) of the vision tower at `max_soft_tokens`: vision, vision-70, ..."""
    return VISION if max_soft_tokens == DEFAULT_MAX_SOFT_TOKENS else f"{VISION}-{max_soft_tokens}"


def is_vision_graph(name: str) -> bool:
    return name == VISION or name.startswith(f"{VISION}-")
