"""torch -> ONNX for the step (the encoder pass and the denoise step in one graph; torch.onnx, dynamo),
weights as external data, and the small self-conditioning graph for backends that sample in torch.

Batch, new tokens, rows (T to denoise, 0 to encode) and both cache lengths are dynamic; the model's
widths are static, as every engine built later wants them. `export_step` and `export_self_conditioning`
are the in-memory path (a loaded model in, a saved graph out); the streaming path (`stage.py`)
traces the same `TraceSpec`s over a model without weights.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from dllm_trt.contract import (
    IMAGE_TOKENS_AXIS,
    IMAGES_AXIS,
    LOGITS,
    ROWS_AXIS,
    SOFT_EMBEDDING_INPUT,
    SOFT_EMBEDDING_OUTPUT,
    STEP_IMAGE_INPUTS,
    STEP_INPUTS,
    VISION_INPUTS,
    VISION_OUTPUT,
    cache_names,
)
from dllm_trt.errors import DllmError
from dllm_trt.models.diffusion_gemma import ImageStep, LayerSpec, SoftEmbedding, Step, layer_specs
from dllm_trt.models.vision import VisionEncoder

OPSET = 23

# Example sizes for tracing: distinct values so that no two dynamic axes get unified by accident
# (rows < new_tokens: the trace must not learn rows == new_tokens, which only the canvas has).
_EXAMPLE = dict(batch=2, new_tokens=5, rows=3, cache_full=11, cache_sliding=7, image_tokens=4, images=2)


@dataclass(frozen=True)
class GraphIO:
    """Names of one graph's inputs and outputs, in order."""

    inputs: list[str]
    outputs: list[str]


def step_io(specs: list[LayerSpec], images: bool = False) -> GraphIO:
    image_inputs = list(STEP_IMAGE_INPUTS) if images else []
    return GraphIO(
        inputs=[*STEP_INPUTS, *image_inputs, *cache_names(specs, "past_")], outputs=[*cache_names(specs, ""), LOGITS]
    )


def example_cache(
    specs: list[LayerSpec], batch: int, cache_full: int, cache_sliding: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    tensors = []
    for spec in specs:
        length = cache_sliding if spec.sliding else cache_full
        for _ in ("key", "value"):
            tensors.append(torch.randn(batch, spec.num_kv_heads, length, spec.head_dim).to(dtype))
    return tensors


def _cache_dims(specs: list[LayerSpec], batch: Dim, full: Dim, sliding: Dim) -> tuple[dict, ...]:
    return tuple({0: batch, 2: sliding if spec.sliding else full} for spec in specs for _ in ("key", "value"))


@dataclass
class TraceSpec:
    """What torch.onnx.export needs for one graph: the module, example inputs, dynamic axes, names."""

    module: torch.nn.Module
    args: tuple
    dynamic_shapes: tuple
    io_names: GraphIO


def trace(spec: TraceSpec, optimize: bool):  # noqa: ANN201 (torch.onnx.ONNXProgram)
    """torch.onnx.export (dynamo); `optimize=False` leaves the optimizer for the caller to run."""
    # torch.onnx narrates every stage on stdout and warns about internals; the CLI prints its own progress.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        # the translation of full_like over a dynamic 1-D size (ImageStep's block ids) passes an empty attribute
        # list, which onnx_ir warns about before defaulting it as the op wants; the saved graph holds none
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        with torch.no_grad():
            return torch.onnx.export(
                spec.module,
                spec.args,
                dynamic_shapes=spec.dynamic_shapes,
                input_names=spec.io_names.inputs,
                output_names=spec.io_names.outputs,
                opset_version=OPSET,
                dynamo=True,
                external_data=True,
                verbose=False,
                optimize=optimize,
            )


def step_spec(model, images: bool = False) -> TraceSpec:  # noqa: ANN001
    """The step; `images` (a checkpoint with a vision tower): ImageStep, with the image inputs."""
    specs = layer_specs(model)
    dtype = model.dtype
    b, t, r, c = _EXAMPLE["batch"], _EXAMPLE["new_tokens"], _EXAMPLE["rows"], _EXAMPLE["cache_full"]
    text = model.config.text_config
    args = (
        torch.randint(0, text.vocab_size, (b, t)),
        torch.arange(c, c + t).expand(b, t).contiguous(),
        torch.ones(b, t, dtype=torch.bool),
        torch.ones(b, c, dtype=torch.bool),
        torch.randn(b, r, text.hidden_size).to(dtype),
        *example_cache(specs, b, c, _EXAMPLE["cache_sliding"], dtype),
    )
    batch, tokens, rows = Dim("batch"), Dim("new_tokens"), Dim(ROWS_AXIS)
    full, sliding = Dim("cache_full"), Dim("cache_sliding")
    per_token = {0: batch, 1: tokens}
    head = (per_token, per_token, per_token, {0: batch, 1: full}, {0: batch, 1: rows})
    cache_dims = _cache_dims(specs, batch, full, sliding)
    if not images:
        return TraceSpec(Step(model), args, (*head, cache_dims), step_io(specs))
    count = _EXAMPLE["image_tokens"]
    image_args = (
        torch.randn(count, text.hidden_size).to(dtype),
        torch.tensor([1, 2, t + 1, t + 2]),  # two images of two tokens, one in each row
        torch.tensor([0, 0, 1, 1]),
    )
    soft = Dim(IMAGE_TOKENS_AXIS)
    shapes = (*head, {0: soft}, {0: soft}, {0: soft}, cache_dims)
    return TraceSpec(ImageStep(model), (*args[:5], *image_args, *args[5:]), shapes, step_io(specs, images=True))


def vision_spec(model, max_soft_tokens: int) -> TraceSpec:  # noqa: ANN001
    """The vision tower at `max_soft_tokens` (its patch count fixed: the pooler's cells are a shape)."""
    vision = model.config.vision_config
    kernel, patch = vision.pooling_kernel_size, vision.patch_size
    patches = max_soft_tokens * kernel**2
    images = _EXAMPLE["images"]
    # Example positions as the processor lays them out: a grid of k x k cells, then (-1, -1) padding.
    width = kernel * max(1, int((max_soft_tokens // 2) ** 0.5))
    count = (patches // 2) // width * width
    grid = torch.stack([torch.arange(count) % width, torch.arange(count) // width], dim=-1)
    positions = torch.full((images, patches, 2), -1, dtype=torch.long)
    positions[:, :count] = grid
    pixels = torch.rand(images, patches, 3 * patch**2) * (positions[..., :1] >= 0)
    per_image = {0: Dim(IMAGES_AXIS)}
    io_names = GraphIO(inputs=list(VISION_INPUTS), outputs=[VISION_OUTPUT])
    return TraceSpec(VisionEncoder(model), (pixels, positions), (per_image, per_image), io_names)


def self_conditioning_spec(model) -> TraceSpec:  # noqa: ANN001
    """processed logits -> the next step's self-conditioning input, for backends that hand out logits."""
    text = model.config.text_config
    args = (torch.randn(_EXAMPLE["batch"], model.config.canvas_length, text.vocab_size).to(model.dtype),)
    io_names = GraphIO(inputs=[SOFT_EMBEDDING_INPUT], outputs=[SOFT_EMBEDDING_OUTPUT])
    return TraceSpec(SoftEmbedding(model), args, ({0: Dim("batch")},), io_names)


def _export_spec(spec: TraceSpec, path: Path, model, index: dict | None) -> GraphIO:  # noqa: ANN001
    """The in-memory path: trace the loaded model, let torch.onnx optimize and save it with its weights
    (named after the checkpoint's tensors when its `index` is given, as the streaming path names them)."""
    from dllm_trt.export.softmax_precision import softmax_in_requested_dtype
    from dllm_trt.export.weights import name_after_checkpoint

    program = trace(spec, optimize=True)
    softmax_in_requested_dtype(program.model.graph)
    if index is not None:
        name_after_checkpoint(program.model.graph, spec.module, model, index)
    program.save(str(path), external_data=True)
    return spec.io_names


def export_step(model, path: Path, index: dict | None = None) -> GraphIO:  # noqa: ANN001
    return _export_spec(step_spec(model), path, model, index)


def export_self_conditioning(model, path: Path, index: dict | None = None) -> GraphIO:  # noqa: ANN001
    return _export_spec(self_conditioning_spec(model), path, model, index)


def check_experts(path: Path, num_experts: int, gate_up_shape: tuple, down_shape: tuple, layers: int) -> None:
    """Every MoE layer must hold all `num_experts` experts, whatever the tracing input routed to.

    The exporter may transpose the expert weights, so both orientations of the last two axes count.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = Counter(tuple(init.dims) for init in graph.initializer)

    def count(shape: tuple) -> int:
        return shapes[shape] + (shapes[(shape[0], shape[2], shape[1])] if shape[1] != shape[2] else 0)

    found_gate_up, found_down = count(gate_up_shape), count(down_shape)
    if found_gate_up != layers or found_down != layers:
        raise DllmError(
            f"{path.name} holds {found_gate_up} gate_up and {found_down} down expert tensors of shape "
            f"{gate_up_shape}/{down_shape}, expected {layers} each (all {num_experts} experts per MoE layer); "
            "the export dropped experts, please report this"
        )
