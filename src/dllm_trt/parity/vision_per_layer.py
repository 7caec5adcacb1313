"""`validate --per-layer` for the vision tower: every tower layer of a vision graph against transformers' same layer.

The reference is transformers' own tower (models.offloaded: one layer resident), run by its own
`get_image_features` on the fixed test images (parity.vision_parity.fixed_images) at the graph's
max_soft_tokens; hooks record what enters each layer (the residual stream), its norms' inputs and
outputs and what it hands on, and the patch embedding and the soft tokens it ends with. For a
reduced-precision artifact the envelope is the same layer run again in that dtype on the same inputs.

The artifact's vision graph is cut into its prologue (patch embedding, positions, RoPE tables, the
padding bias), one piece per layer and its epilogue (pooler, standardize, the embedder), as the step
graph is (parity.layer_graphs, VISION_LAYOUT); each piece runs alone in onnxruntime, given the
reference's input to its layer, so a layer's error is its own. Judged as the step's layers are
(parity.per_layer.LayerJudge) on the images' valid patches, and the epilogue on their valid soft tokens.
Letters: I images, P patches, S soft tokens, H hidden.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from dllm_trt.contract import VISION_INPUTS
from dllm_trt.generation.image_inputs import image_processor, process_images
from dllm_trt.models.checkpoint import safetensors_files, tensor_index
from dllm_trt.models.offloaded import offloaded_reference
from dllm_trt.models.vision import reference_image_features
from dllm_trt.parity.layer_graphs import VISION_BLOCKS, VISION_LAYOUT, LayerGraphs
from dllm_trt.parity.layer_reference import LayerRun, as_layer_input, envelope_call, envelope_weights, record_norm
from dllm_trt.parity.per_layer import LayerJudge, LayerVerdict, run_layer_piece, token_rows
from dllm_trt.parity.vision_parity import fixed_images
from dllm_trt.progress import Progress

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
CALL = "fixed images"
ORDER = ("embedding", *(block for block, _, _ in VISION_BLOCKS), "layer output", "soft tokens")


def layer_name(index: int | str) -> str:
    """How a tower layer is named in the per-layer report: 'vision 3', 'vision head'."""
    return f"vision {index}"


class _TowerRecorder:
    """Hooks on the tower's layers and norms; each layer's record goes to `on_layer` as the layer finishes
    (index, its input, its run, its envelope run), so that memory holds one layer's tensors at a time."""

    def __init__(self, tower, envelope_dtype: torch.dtype | None, on_layer) -> None:  # noqa: ANN001
        self.envelope_dtype, self.on_layer = envelope_dtype, on_layer
        self.embedding: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        self._run: LayerRun | None = None
        self._index = 0
        self.handles = [tower.patch_embedder.register_forward_hook(self._embedded)]
        for layer in tower.encoder.layers:
            self.handles.append(layer.register_forward_pre_hook(self._before, with_kwargs=True))
            # prepend: runs before models.offloaded drops the layer's weights
            self.handles.append(layer.register_forward_hook(self._after, with_kwargs=True, prepend=True))
            for name in NORMS:
                self.handles.append(getattr(layer, name).register_forward_hook(record_norm(self, name)))

    def _embedded(self, module, inputs, output) -> None:  # noqa: ANN001
        self.embedding = output.detach().float().clone()

    def _before(self, layer, args, kwargs) -> None:  # noqa: ANN001
        self._run = LayerRun()

    def _after(self, layer, args, kwargs, output) -> None:  # noqa: ANN001
        run, self._run = self._run, None
        run.tensors["output"] = self.last_output = output.detach().float().clone()
        envelope = self._envelope(layer, args, kwargs) if self.envelope_dtype is not None else None
        self.on_layer(self._index, args[0].detach().float(), run, envelope)
        self._index += 1

    def _envelope(self, layer, args, kwargs) -> LayerRun:  # noqa: ANN001
        dtype = self.envelope_dtype
        weights = envelope_weights(layer, dtype, "")
        low = {key: as_layer_input(value, dtype) for key, value in kwargs.items()}
        return envelope_call(self, layer, weights, as_layer_input(args[0], dtype), low)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def tower_per_layer(
    artifacts: Path, reference: Path, manifest: dict, progress: Progress | None = None, images: list | None = None
) -> list[LayerVerdict]:
    """The verdicts of every tower layer of the artifact's first vision graph, then of its epilogue ('vision head').

    The artifact's piece of each layer runs as soon as transformers' layer has run (from its forward hook),
    given that layer's input: memory holds one reference layer and one piece, whatever the tower's depth.
    """
    progress = progress or Progress(total=0, quiet=True)
    vision = manifest["model"]["vision"]
    count, name = min((int(n), g) for n, g in vision["graphs"].items())
    file = manifest["graphs"][name]["file"]
    dtype = manifest["model"]["dtype"]
    io_dtype = getattr(torch, dtype)
    envelope_dtype = None if dtype == "float32" else io_dtype
    layers = vision["num_layers"]
    processor = image_processor(artifacts, vision["patch_size"], vision["pooling_kernel_size"], count)
    inputs = process_images(images or fixed_images(), processor)
    valid = (inputs.position_ids != -1).all(-1).reshape(-1)  # [I*P]: padding patches are never pooled
    patches = valid.numel()
    feeds = dict(zip(VISION_INPUTS, (inputs.pixel_values, inputs.position_ids)))
    judge = LayerJudge(dtype, 1)
    verdicts: list[LayerVerdict] = []
    with tempfile.TemporaryDirectory(prefix="dllm-trt-vision-layers-") as scratch:
        graphs = LayerGraphs(artifacts, file, layers, Path(scratch), VISION_LAYOUT)
        own = run_layer_piece(graphs, -1, [feeds], [{}])[0]  # the prologue: patch embedding, RoPE tables, padding bias

        def on_layer(index: int, hidden_in: torch.Tensor, ref: LayerRun, env: LayerRun | None) -> None:
            segment = graphs.segments[index]
            out = run_layer_piece(graphs, index, [feeds | own], [{segment.hidden_in: hidden_in.to(io_dtype)}])[0]
            where = layer_name(index)
            for block, module, side in VISION_BLOCKS:
                if block in segment.blocks:
                    key = f"{module}.{side}"
                    ours = token_rows(out[segment.blocks[block]].float(), patches)
                    env_tensor = None if env is None else token_rows(env.tensors[key], patches)
                    judge.value(where, CALL, block, ours, token_rows(ref.tensors[key], patches), env_tensor, valid)
            leaving = token_rows(out[graphs.output_of_layer(index)].float(), patches)
            env_out = None if env is None else token_rows(env.tensors["output"], patches)
            judge.value(
                where, CALL, "layer output", leaving, token_rows(ref.tensors["output"], patches), env_out, valid
            )
            verdicts.append(LayerVerdict(where, judge.verdicts(where), order=ORDER))
            progress.note(
                f"{where}: " + ("ok" if verdicts[-1].passed else f"FAIL at {verdicts[-1].first_failing_block()}")
            )

        model = offloaded_reference(
            reference, torch.float32, tensor_index(safetensors_files(reference)), tower_only=True
        )
        tower = model.model.encoder.vision_tower
        recorder = _TowerRecorder(tower, envelope_dtype, on_layer)
        with progress.stage(
            f"the tower layer by layer: transformers' and the artifact's, {len(inputs.counts)} image(s)"
        ) as notes:
            try:
                features = reference_image_features(model, inputs.pixel_values, inputs.position_ids)
            finally:
                recorder.close()
            notes.append(f"{layers} layers, {name} ({count} soft tokens an image)")
        envelope_features = envelope_embedding = None
        if envelope_dtype is not None:
            envelope_features = _envelope_head(model, recorder.last_output, inputs, io_dtype)
            padding = (inputs.position_ids == -1).all(dim=-1)
            weights = envelope_weights(tower.patch_embedder, io_dtype, "")
            envelope_embedding = torch.func.functional_call(tower.patch_embedder, weights, (
                inputs.pixel_values, inputs.position_ids, padding)).float()  # fmt: skip
        del model, tower
        gc.collect()
        embedded = token_rows(own[graphs.segments[0].hidden_in].float(), patches)
        env_embedded = None if envelope_embedding is None else token_rows(envelope_embedding, patches)
        judge.value(layer_name(0), CALL, "embedding", embedded, token_rows(recorder.embedding, patches), env_embedded,
                    valid)  # fmt: skip
        verdicts[0] = LayerVerdict(layer_name(0), judge.verdicts(layer_name(0)), order=ORDER)  # with the embedding
        last = graphs.segments[layers]
        teacher = {last.hidden_in: recorder.last_output.to(io_dtype)}
        soft = run_layer_piece(graphs, layers, [feeds | own], [teacher])[0][graphs.model.graph.output[0].name]
        ours = torch.cat([soft[i, :n].float() for i, n in enumerate(inputs.counts)])  # each image's valid prefix
        rows = torch.ones(ours.shape[0], dtype=torch.bool)
        judge.value(layer_name("head"), CALL, "soft tokens", ours, features.float(), envelope_features, rows)
        verdicts.append(LayerVerdict(layer_name("head"), judge.verdicts(layer_name("head")), order=ORDER))
    return verdicts


def _envelope_head(model, hidden: torch.Tensor, inputs, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """The pooler, standardize and embedder in `dtype` on the reference's last layer output, valid rows only."""
    tower, embedder = model.model.encoder.vision_tower, model.model.encoder.embed_vision
    padding = (inputs.position_ids == -1).all(dim=-1)
    soft = inputs.pixel_values.shape[-2] // tower.config.pooling_kernel_size**2
    pooled, mask = tower.pooler(hidden.to(dtype), inputs.position_ids, padding, soft)
    pooled = pooled[mask]
    if tower.config.standardize:
        pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
    weights = envelope_weights(embedder, dtype, "")
    return torch.func.functional_call(embedder, weights, (pooled.to(dtype),)).float()
