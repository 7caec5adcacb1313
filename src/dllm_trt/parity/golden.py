"""Golden files: proof that travels with an artifact, checked by stock Polygraphy with no dllm-trt code.

`validate --report DIR` writes DIR/golden/ and `build --golden DIR/golden` copies it beside the engine:
the artifact's step-graph inputs for a few real calls and transformers' own outputs for them (never the
artifact's), in Polygraphy's formats, so that `polygraphy run step.onnx --onnxrt ...` on this CPU and
`polygraphy run step.engine --trt ...` on the engine's GPU exit 0 when the artifact computes the model and
1 when it does not. Files (names in contract.py):

  inputs.json   a JSON list of feed dicts (polygraphy.json.save_json; `--load-inputs`), one per call, named
                and typed as the graph declares its inputs: the encoder pass over the prompts (empty
                cache), then two denoise steps reading the reference's cache: a random canvas without
                self-conditioning, then the reference's sampled canvas with the self-conditioning of its
                processed logits (the calls `validate --per-layer` compares). The prompts have equal
                lengths: a padded position's K/V is never attended, so no output contract fixes it, and
                Polygraphy compares every element.
  outputs.json  polygraphy.comparator.RunResults (`--load-outputs`): per call, transformers' outputs under
                the graph's output names: key.i / value.i of an encoder pass; of a denoise step `logits`
                (exported graphs) or `entropy` and `next_self_conditioning` (graphs with the sampling head).
  layers.json   RunResults of the residual stream transformers computes entering each layer and the final
                norm, named as the graph names those tensors (parity.layer_graphs finds them), for
                `--onnx-outputs` / `--trt-outputs`: the first mismatching name is the first layer whose
                output departs (every later one departs too: nothing is teacher-forced here).
  golden.json   what the files hold, every tolerance and what it derives from, the commands; README.md.

Outputs left out: `sampled_ids` and `argmax_ids`. They are deterministic given the inputs (the sampling
noise is an input), but discrete: a legitimate last-bit difference at a near tie flips an id, and
Polygraphy judges ids element by element, with no share of agreement. `entropy` and
`next_self_conditioning` are continuous functions of the same processed logits (the distribution's
entropy, its soft embedding), so a wrong graph moves them. The denoise steps' own K/V are not part of the
contract either (the runtime appends only an encoder pass's). The reference for the sampling head's outputs
is generation.sampler's sampling head and the soft embedding over transformers' modules, on transformers'
logits: what `validate` compares every backend's head against.

Tolerances, per output name, with `--check-error-stat NAME:STAT --atol NAME:A --rtol NAME:0` (a relative
tolerance of 0 passes nothing but equality, so the absolute one decides). fp32 artifacts: the statistic
`max`, A = compare.TOLERANCES["float32"] (1e-4) times the largest |value| of that output over the calls
(validate's max relative error, which divides by the reference's largest value). Reduced precision
(fp16, bf16, fp8, nvfp4): measured on the envelope, transformers itself in the artifact's dtype (its
weights quantized as the artifact stores them) replayed on the same inputs: the statistic `median`, A =
ENVELOPE_MULTIPLE x the envelope's largest per-call median |error|, never below the fp32 bound (typical
errors, as validate judges reduced precision: a router whose top-k margin is within the dtype's rounding
may pick another expert in any implementation, transformers' own included, which moves a few tokens a lot).
bf16 tensors: inputs travel in the graph's dtype as torch bfloat16 tensors (Polygraphy's JSON stores torch
tensors with torch.save and reads them back with torch.load(weights_only=True)); outputs are always the
reference's fp32 values, and Polygraphy compares a bf16 output with them in fp32.
Letters: B batch, T new tokens, C canvas, H hidden, V vocab, L layers.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from dllm_trt.contract import (
    GOLDEN_DIR,
    GOLDEN_FORMAT,
    GOLDEN_INFO,
    GOLDEN_INPUTS,
    GOLDEN_LAYERS,
    GOLDEN_OUTPUTS,
    LOGITS,
    QUANTIZED_PRECISIONS,
    SAMPLING_OUTPUTS,
    STEP_FILE,
    cache_names,
)
from dllm_trt.errors import DllmError
from dllm_trt.manifest import MANIFEST, file_sha256, read_manifest

GOLDEN_CANVAS = 32  # the denoise calls' canvas at most: an exported graph's logits are [B, C, V] fp32 in the files
RUNNER = "transformers"  # the name Polygraphy prints for the golden results
# Graph outputs the files hold: an encoder pass's new K/V, a denoise step's continuous outputs (module doc).
DENOISE_OUTPUTS = (LOGITS, *(name for name in SAMPLING_OUTPUTS if not name.endswith("_ids")))
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool}  # fmt: skip


@dataclass(frozen=True)
class GoldenOptions:
    artifacts: Path  # an export or optimize directory
    reference: Path  # the checkpoint it came from
    prompts: list[list[int]]  # cut to their common length (no padding), at most the sliding window - 1
    seed: int = 0
    canvas: int | None = None  # the denoise calls' canvas; None: the model's, at most GOLDEN_CANVAS


@dataclass
class _Call:
    """One call as transformers is given it, and what it computed."""

    kind: str  # "encode" | "denoise"
    label: str
    feeds: dict[str, torch.Tensor]  # the step graph's inputs (generation.step's feeds), fp32 where float
    ids: torch.Tensor  # [B, T] prompt or canvas
    sc_logits: torch.Tensor | None = None  # denoise: the processed logits its self-conditioning comes from
    temperature: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # by graph output name, fp32
    residuals: list[torch.Tensor] = field(default_factory=list)  # entering each layer, then the final norm
    head: object = None  # denoise: the sampling head's result (generation.sampler.HeadOutput), the next canvas's source


class _Residuals:
    """Hooks recording the residual stream entering every layer of transformers' encoder and decoder, and
    leaving the last one (what the final norm reads)."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.taken: list[torch.Tensor] = []
        self.handles = []
        for text in (model.model.encoder.language_model, model.model.decoder):
            for layer in text.layers:
                self.handles.append(layer.register_forward_pre_hook(self._entering))
            self.handles.append(text.layers[-1].register_forward_hook(self._leaving))

    def _entering(self, layer, args) -> None:  # noqa: ANN001
        self.taken.append(args[0].detach().float().clone())

    def _leaving(self, layer, args, output) -> None:  # noqa: ANN001
        self.taken.append(output.detach().float().clone())

    def take(self) -> list[torch.Tensor]:
        taken, self.taken = self.taken, []
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _cache_of(model, kv: list[torch.Tensor]):  # noqa: ANN001, ANN202
    """A transformers cache holding `kv` (key.0, value.0, ...) in the model's dtype: what a denoise call reads."""
    from dllm_trt.parity.reference import new_cache

    cache = new_cache(model)
    for index in range(len(kv) // 2):
        cache.update(kv[2 * index].to(model.dtype), kv[2 * index + 1].to(model.dtype), index)
    return cache


def _encode(model, call: _Call, residuals: _Residuals) -> list[torch.Tensor]:  # noqa: ANN001
    """The encoder pass: key.i / value.i of its tokens (fp32), and the residuals."""
    from dllm_trt.parity.reference import new_cache, reference_encode

    cache = new_cache(model)
    valid = torch.ones_like(call.ids, dtype=torch.bool)
    reference_encode(model, cache, call.ids, valid, call.feeds["position_ids"][:1])
    tokens = call.ids.shape[1]
    kv = [t[:, :, -tokens:].float() for layer in cache.layers for t in (layer.keys, layer.values)]
    call.outputs = dict(zip(cache_names(_specs(model), ""), kv))
    call.residuals = residuals.take()
    return kv


def _denoise(model, call: _Call, kv: list[torch.Tensor], residuals: _Residuals) -> torch.Tensor:  # noqa: ANN001
    """A denoise step over the cache `kv`: its outputs (fp32) and residuals; returns its processed logits."""
    from dllm_trt.generation.sampler import sampling_head
    from dllm_trt.models.diffusion_gemma import soft_embedding
    from dllm_trt.parity.reference import reference_denoise

    history = torch.ones(call.ids.shape[0], kv[0].shape[2], dtype=torch.bool)
    sc = None if call.sc_logits is None else call.sc_logits.to(model.dtype)
    logits = reference_denoise(model, _cache_of(model, kv), call.ids, sc, history, call.feeds["position_ids"][:1])
    processed = logits.float() / call.temperature  # LinearTemperatureScheduleLogitsProcessor
    head = sampling_head(processed, call.noise)
    next_sc = soft_embedding(model, processed.to(model.dtype))
    call.outputs = dict(zip(DENOISE_OUTPUTS, (logits.float(), head.entropy.float(), next_sc.float())))
    call.residuals = residuals.take()
    call.head = head
    return processed


def _specs(model):  # noqa: ANN001, ANN202
    from dllm_trt.models.diffusion_gemma import layer_specs

    return layer_specs(model)


@torch.no_grad()
def reference_calls(model, prompts: list[list[int]], seed: int, canvas: int) -> list[_Call]:  # noqa: ANN001
    """transformers over the encoder pass and two denoise steps (module doc); each call's feeds and outputs."""
    from dllm_trt.generation.kv_cache import StaticKVCache
    from dllm_trt.generation.loop import GenerationSettings
    from dllm_trt.generation.sampler import accepted_positions, sampling_noise
    from dllm_trt.generation.step import StepInfo, encoder_feeds, sampling_feeds
    from dllm_trt.models.diffusion_gemma import soft_embedding

    text = model.config.get_text_config(decoder=True)
    sampler = GenerationSettings.from_generation_config(model.generation_config.to_dict()).sampler
    length = min(min(len(p) for p in prompts), text.sliding_window - 1)
    ids = torch.tensor([p[len(p) - length :] for p in prompts])  # [B, T], no padding (module doc)
    batch, vocab = ids.shape[0], text.vocab_size
    specs = _specs(model)
    step = SimpleNamespace(past_names=cache_names(specs, "past_"), info=StepInfo.from_model(model))
    empty = StaticKVCache(specs, batch, length + canvas, text.sliding_window, torch.float32)
    positions = torch.arange(length)[None, :].expand(batch, -1).contiguous()
    valid = torch.ones_like(ids, dtype=torch.bool)
    residuals = _Residuals(model)
    try:
        encode = _Call("encode", "encoder pass", encoder_feeds(step, ids, positions, valid, empty.mask(),
                                                                empty.tensors()), ids)  # fmt: skip
        kv = _encode(model, encode, residuals)
        cache = StaticKVCache(specs, batch, length + canvas, text.sliding_window, torch.float32)
        cache.append(kv, valid)
        positions = torch.arange(length, length + canvas)[None, :].expand(batch, -1).contiguous()
        gen = torch.Generator().manual_seed(seed)
        canvas_ids = torch.randint(0, vocab, (batch, canvas), generator=gen)
        temperature = torch.tensor(sampler.t_max)  # a generation's first steps run at the schedule's top
        calls, processed = [encode], None
        for label in ("denoise step 1", "denoise step 2"):
            sc_input = (
                torch.zeros(batch, canvas, text.hidden_size) if processed is None else soft_embedding(model, processed)
            )
            noise = sampling_noise(batch, canvas, vocab, gen)
            feeds = sampling_feeds(step, canvas_ids, sc_input.float(), positions, cache.mask(), cache.tensors(),
                                   temperature, noise)  # fmt: skip
            call = _Call("denoise", label, feeds, canvas_ids, processed, temperature, noise)
            processed = _denoise(model, call, kv, residuals)
            calls.append(call)
            accepted = accepted_positions(call.head.entropy, sampler.entropy_bound)
            redrawn = torch.randint(0, vocab, (batch, canvas), generator=gen)
            canvas_ids = torch.where(accepted, call.head.sampled, redrawn)
    finally:
        residuals.close()
    return calls


@torch.no_grad()
def replay(model, calls: list[_Call]) -> list[_Call]:  # noqa: ANN001
    """The same calls on another model (the envelope): its own encoder pass; its denoise steps read the
    reference's cache and self-conditioning, as the artifact's do."""
    residuals = _Residuals(model)
    out = []
    try:
        reference_kv = [calls[0].outputs[name] for name in cache_names(_specs(model), "")]
        for call in calls:
            mine = _Call(call.kind, call.label, call.feeds, call.ids, call.sc_logits, call.temperature, call.noise)
            if call.kind == "encode":
                _encode(model, mine, residuals)
            else:
                _denoise(model, mine, reference_kv, residuals)
            out.append(mine)
    finally:
        residuals.close()
    return out


@dataclass(frozen=True)
class OutputTolerance:
    atol: float
    rtol: float
    statistic: str  # Polygraphy's --check-error-stat: max | median
    scale: float  # the largest |reference value| over the calls
    envelope: float | None  # the envelope's largest per-call median |error|, where one was measured

    def to_dict(self) -> dict:
        return dict(atol=self.atol, rtol=self.rtol, check_error_stat=self.statistic, scale=self.scale,
                    envelope=self.envelope)  # fmt: skip


def tolerances(
    reference: list[dict[str, torch.Tensor]], envelope: list[dict[str, torch.Tensor]] | None
) -> dict[str, OutputTolerance]:
    """Per output name over the calls (module doc): fp32's bound without an envelope, else from the envelope."""
    from dllm_trt.parity.compare import ENVELOPE_MULTIPLE, TOLERANCES

    strict = TOLERANCES["float32"].max_rel
    out = {}
    for name in dict.fromkeys(name for call in reference for name in call):
        values = [call[name] for call in reference if name in call]
        scale = max(float(v.abs().max()) if v.numel() else 0.0 for v in values)
        floor = strict * scale
        if envelope is None:
            out[name] = OutputTolerance(_round_up(floor), 0.0, "max", scale, None)
            continue
        medians = [
            float((theirs[name].float() - ours[name].float()).abs().median())
            for ours, theirs in zip(reference, envelope)
            if name in ours and ours[name].numel()
        ]
        measured = max(medians, default=0.0)
        out[name] = OutputTolerance(_round_up(max(ENVELOPE_MULTIPLE * measured, floor)), 0.0, "median", scale, measured)
    return out


def _round_up(value: float) -> float:
    """Two significant digits, rounded up: a command line a person reads, never tighter than derived."""
    if value <= 0:
        return 0.0
    digit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / digit * (1 - 1e-12)) * digit:.2g}")


def _feed(tensor: torch.Tensor, dtype: str):  # noqa: ANN202
    """A feed in the graph's declared dtype: numpy, or a torch tensor where numpy has none (bfloat16)."""
    cast = tensor.to(_TORCH[dtype])
    return cast.contiguous() if dtype == "bfloat16" else cast.numpy()


def residual_names(artifacts: Path, layers: int) -> tuple[list[str], str | None]:
    """The graph's names of the residual stream entering each layer and the final norm (parity.layer_graphs finds
    them by their checkpoint-named norm weights); ([], why) where the graph cannot be cut so."""
    import onnx

    from dllm_trt.parity.layer_graphs import split_step_graph

    graph = onnx.load(str(artifacts / STEP_FILE), load_external_data=False)
    try:
        segments = {s.index: s for s in split_step_graph(graph, layers)}
    except DllmError as error:
        return [], str(error)
    return [segments[i].hidden_in for i in range(layers + 1)], None


def envelope_model(reference: Path, dtype: str, precision: str, index: dict):  # noqa: ANN201
    """transformers in the artifact's dtype, layers read on demand, its weights quantized as the artifact stores
    them (kernels.quantization.as_stored, from the checkpoint's own values as optimize quantizes them)."""
    from dllm_trt.kernels.quantization import as_stored
    from dllm_trt.models.offloaded import offloaded_reference

    def stored(name: str, tensor: torch.Tensor) -> torch.Tensor:
        values = as_stored(name, tensor.float().numpy(), precision)
        return tensor if values is None else torch.from_numpy(values)

    return offloaded_reference(reference, _TORCH[dtype], index, stored)


def write_golden(options: GoldenOptions, out: Path) -> dict:
    """The golden files of `options.artifacts` into `out` (module doc); returns what golden.json holds."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    from dllm_trt.generation.cpu_variant import execution_on_cpu, needs_cpu_variant
    from dllm_trt.models.checkpoint import safetensors_files, tensor_index
    from dllm_trt.models.offloaded import offloaded_reference
    from dllm_trt.parity.golden_commands import commands, readme

    artifacts = options.artifacts
    if not (artifacts / STEP_FILE).is_file():
        raise DllmError(f"{artifacts} has no {STEP_FILE}: golden files are made for an export or optimize directory")
    manifest = read_manifest(artifacts)
    dtype, precision, layers = (
        manifest["model"]["dtype"],
        manifest.get("precision", ""),
        len(manifest["model"]["layers"]),
    )
    inputs = {i["name"]: i["dtype"] for i in manifest["graphs"]["step"]["inputs"]}
    outputs = {o["name"] for o in manifest["graphs"]["step"]["outputs"]}
    names, no_layers = residual_names(artifacts, layers)
    index = tensor_index(safetensors_files(options.reference))
    model = offloaded_reference(options.reference, torch.float32, index)
    calls = reference_calls(model, options.prompts, options.seed,
                            options.canvas or min(model.config.canvas_length, GOLDEN_CANVAS))  # fmt: skip
    del model
    # reduced precision: the same calls on the envelope, for the tolerances
    envelope = None if dtype == "float32" else replay(envelope_model(options.reference, dtype, precision, index), calls)
    if names and any(len(c.residuals) != len(names) for c in [*calls, *(envelope or [])]):
        raise RuntimeError(f"recorded {[len(c.residuals) for c in calls]} residuals per call for {layers} layers")
    files = {GOLDEN_OUTPUTS: [{n: t for n, t in c.outputs.items() if n in outputs} for c in calls]}
    theirs = {GOLDEN_OUTPUTS: None if envelope is None else [c.outputs for c in envelope]}
    if names:
        files[GOLDEN_LAYERS] = [dict(zip(names, c.residuals)) for c in calls]
        theirs[GOLDEN_LAYERS] = None if envelope is None else [dict(zip(names, c.residuals)) for c in envelope]

    out.mkdir(parents=True, exist_ok=True)
    feeds = [{name: _feed(call.feeds[name], inputs[name]) for name in inputs} for call in calls]
    # Polygraphy logs each save ("[I] Saving ... to <the temporary path>") and, on its first coloured line,
    # a notice about the optional 'colored' module: neither is the user's business in the middle of a
    # progress line; its warnings and errors still show.
    G_LOGGER.colors = False
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        save_json(feeds, str(out / GOLDEN_INPUTS), description="golden inputs")
        for file, per_call in files.items():
            iterations = [IterationResult({n: t.numpy() for n, t in c.items()}, runner_name=RUNNER) for c in per_call]
            RunResults([(RUNNER, iterations)]).save(str(out / file))
    held = ["the embedding (and self-conditioning) entering layer 0"] + [
        f"layer {i}'s output" + (" (the final norm's input)" if i == layers - 1 else "") for i in range(layers)
    ]
    described = None
    if envelope is not None:
        described = f"transformers in {dtype}" + (
            f", its weights quantized as {precision} stores them" if precision in QUANTIZED_PRECISIONS else ""
        )
    info = dict(
        format=GOLDEN_FORMAT,
        artifacts=str(artifacts),
        artifact_manifest_sha256=file_sha256(artifacts / MANIFEST),
        checkpoint_hash=manifest.get("checkpoint", {}).get("hash"),
        stage=manifest.get("stage"),
        target=manifest.get("target"),
        precision=precision,
        dtype=dtype,
        runs_on_cpu=not needs_cpu_variant(artifacts),
        cpu_execution=execution_on_cpu(artifacts),
        calls=[dict(kind=c.kind, label=c.label, inputs={n: list(c.feeds[n].shape) for n in inputs}) for c in calls],
        inputs=inputs,
        outputs={file: {n: t.to_dict() for n, t in tolerances(files[file], theirs[file]).items()} for file in files},
        layers=[dict(name=name, holds=what) for name, what in zip(names, held)],
        envelope=described,
        left_out=dict(
            ids="sampled_ids and argmax_ids: discrete (a last-bit difference at a near tie flips one), and Polygraphy "
            "judges ids element by element",
            denoise_kv="a denoise step's key/value: the runtime appends only an encoder pass's",
        ),
    )
    if no_layers:
        info["left_out"]["layers"] = no_layers
    info["commands"] = commands(info)
    (out / GOLDEN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(readme(info))
    return info


def check_golden(golden: Path, artifacts: Path) -> dict:
    """`build --golden`: the golden.json of `golden`, made for `artifacts` (one line saying what to do otherwise)."""
    info_path = golden / GOLDEN_INFO
    if not info_path.is_file():
        raise DllmError(
            f"--golden {golden} holds no {GOLDEN_INFO}: pass the folder 'dllm-trt validate OPTIMIZED --report DIR' "
            f"wrote (DIR/{GOLDEN_DIR})"
        )
    info = json.loads(info_path.read_text())
    if info.get("artifact_manifest_sha256") != file_sha256(artifacts / MANIFEST):
        raise DllmError(
            f"--golden {golden} was made for {info.get('artifacts')}, not for {artifacts} (another manifest): run "
            f"'dllm-trt validate {artifacts} --reference CKPT --report DIR' and pass DIR/{GOLDEN_DIR}"
        )
    return info


def copy_golden(golden: Path, artifacts: Path, out: Path) -> None:
    """Copy `golden` (checked for `artifacts`) into `out`/golden/, beside the engine built from `artifacts`."""
    check_golden(golden, artifacts)
    shutil.copytree(golden, out / GOLDEN_DIR)
