"""The artifact contract: the names every stage writes and every later stage reads.

File names, graph input and output names, cache tensor names, the fused ops' names, domains and
attributes, stage names, targets and precisions. A leaf: it imports nothing of dllm_trt, so that
every stage can depend on it and none has to import another stage to learn a name.
"""

from __future__ import annotations

from collections.abc import Iterable
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
MOE_INPUTS = {
    "float": ("hidden", "router_logits", "per_expert_scale", "gate_up_proj", "down_proj"),
}
MOE_INPUTS["fp8"] = MOE_INPUTS["float"] + ("gate_up_scale", "down_scale")
MOE_INPUTS["nvfp4"] = MOE_INPUTS["float"] + (
    "gate_up_block_scale", "down_block_scale", "gate_up_global_scale", "down_global_scale",
)  # fmt: skip
MOE_WEIGHT_FORMATS = tuple(MOE_INPUTS)
ROUTED_MOE = "RoutedMoE"  # the ort-cpu target's model-local function
ORT_MOE_DOMAIN, ORT_MOE_OP = "com.microsoft", "MoE"  # the ort-cuda target's contrib op

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
