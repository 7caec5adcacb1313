"""`validate --per-layer`: every layer of an artifact against transformers' same layer, in bounded memory.

Calls: an encoder pass over real prompts, then the first two denoise steps of a real generation
(a random canvas with no self-conditioning; then the reference's sampled canvas with the
self-conditioning of its processed logits), every denoise call reading the reference's cache.
The reference runs first, its layers read on demand (layer_reference). Then the artifact runs one
piece at a time (layer_graphs): its prologue on each call's inputs, then each layer given the
reference's input to that layer (teacher forcing: a layer's error is its own, so the first layer
past its bound is where the artifact departs), then its epilogue on the reference's last hidden
state. Memory holds about one layer of each side.

Judging, per layer and block, over the three calls' tokens pooled. fp32 artifacts: max relative
error <= compare.TOLERANCES (1e-4) and every expert pick equal. Reduced precision, against the
envelope (transformers' same layer in the artifact's dtype on the same inputs, its quantized weights
quantized the same way for fp8/nvfp4): the median and the 90th percentile of the per-token errors
each <= ENVELOPE_MULTIPLE x the envelope's (never below the fp32 bound): the typical token, and a
tail that an error confined to one expert's tokens moves; the share of expert picks that differ <=
ENVELOPE_MULTIPLE x the envelope's plus one token. What a pick feeds is judged on the tokens whose
picks equal the reference's (another pick is judged as a decision). A token whose reference
router has a tie at its top-k boundary in fp32 arithmetic (within NEAR_TIE_ULPS fp32 ulps, where
the pick is decided by rounding) is not judged on what its pick feeds; at least MIN_JUDGED_SHARE
of the tokens must be judged, or the check fails and says so.
Letters: B batch, T tokens, N = B*T, E experts, K picks, H hidden, V vocab.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from dllm_trt.contract import LOGITS, SAMPLING_OUTPUTS, STEP_FILE, STEP_IMAGE_INPUTS, cache_names
from dllm_trt.generation.kv_cache import StaticKVCache
from dllm_trt.generation.sampler import accepted_positions, sampling_head, sampling_noise
from dllm_trt.generation.step import StepInfo, encoder_feeds, sampling_feeds
from dllm_trt.manifest import read_manifest
from dllm_trt.models.checkpoint import safetensors_files, tensor_index
from dllm_trt.models.diffusion_gemma import layer_specs, merge_image_embeds, soft_embedding
from dllm_trt.models.offloaded import offloaded_reference
from dllm_trt.parity.compare import ENVELOPE_MULTIPLE, TOLERANCES
from dllm_trt.parity.generation_parity import MIN_JUDGED_SHARE, NEAR_TIE_ULPS
from dllm_trt.parity.layer_graphs import AFTER_ROUTER, BLOCKS, PICKS, ROUTER, LayerGraphs
from dllm_trt.parity.layer_reference import CallRecord, LayerRecorder, envelope_weights
from dllm_trt.parity.reference import new_cache, reference_denoise, reference_encode
from dllm_trt.parity.step_parity import scenario_images
from dllm_trt.progress import Progress

EXPERT_PICKS = "expert picks"
# Per layer, in the order the layer computes them (layer_graphs.BLOCKS), then what it hands on.
ORDER = ("embedding", *(b for b, _, _ in BLOCKS), EXPERT_PICKS, "key/value", "layer output")
REFERENCE_TENSOR = {block: f"{module}.{side}" for block, module, side in BLOCKS} | {ROUTER: "router.probs"}


@dataclass
class BlockVerdict:
    """One block of one layer on one call."""

    call: str
    block: str
    value: float  # max rel (fp32), median rel (reduced), or share of picks differing
    envelope: float | None
    bound: float
    tokens: int  # judged tokens
    finite: bool = True
    statistic: str = "max"  # of the per-token errors: max (fp32), median or p90 (against the envelope), share

    @property
    def passed(self) -> bool:
        return self.finite and self.value <= self.bound

    def to_dict(self) -> dict:
        return asdict(self) | dict(passed=self.passed)


@dataclass
class LayerVerdict:
    layer: int | str  # an index, or "head" for the epilogue
    blocks: list[BlockVerdict] = field(default_factory=list)
    expert_agreement: float | None = None  # share of the artifact's picks equal to the reference's
    envelope_expert_agreement: float | None = None
    order: tuple[str, ...] = ()  # the blocks in the order the layer computes them; () : the step's (ORDER)

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.blocks)

    def first_failing_block(self) -> str | None:
        failing = {b.block for b in self.blocks if not b.passed}
        return next((block for block in (*(self.order or ORDER), *HEAD_ORDER) if block in failing), None)

    def worst(self, block: str | None = None) -> BlockVerdict | None:
        """The block verdict with the largest share of its bound (of one block, or of any)."""
        members = [b for b in self.blocks if block is None or b.block == block]
        return max(members, key=lambda b: (not b.passed, b.value / b.bound if b.bound else 0.0), default=None)

    def to_dict(self) -> dict:
        return dict(
            layer=self.layer, passed=self.passed, first_failing_block=self.first_failing_block(),
            expert_agreement=self.expert_agreement, envelope_expert_agreement=self.envelope_expert_agreement,
            blocks=[b.to_dict() for b in self.blocks],
        )  # fmt: skip


HEAD_ORDER = ("logits", "logits argmax", "entropy", "argmax", "next self-conditioning")


@dataclass
class PerLayerResult:
    dtype: str
    calls: list[str]
    tokens: int  # judged + not judged, over calls and layers
    judged_tokens: int
    layers: list[LayerVerdict]
    multiple: float = ENVELOPE_MULTIPLE
    precision: str = ""  # the optimize stage's precision ("" for an export)

    @property
    def first_divergent(self) -> LayerVerdict | None:
        return next((layer for layer in self.layers if not layer.passed), None)

    def failures(self) -> list[str]:
        failed = []
        if self.judged_tokens < MIN_JUDGED_SHARE * self.tokens:
            failed.append(
                f"only {self.judged_tokens} of {self.tokens} token-layers could be judged (the rest had an fp32 router "
                f"tie); at least {100 * MIN_JUDGED_SHARE:.0f}% must be: use other prompts or seeds"
            )
        for layer in self.layers:
            if not layer.passed:
                worst = layer.worst(layer.first_failing_block())
                failed.append(
                    f"layer {layer.layer}: {worst.block} ({worst.call}) {worst.value:.3e} > bound {worst.bound:.3e}"
                    + (f" (envelope {worst.envelope:.3e})" if worst.envelope is not None else "")
                )
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict:
        first = self.first_divergent
        return dict(
            dtype=self.dtype, precision=self.precision, calls=self.calls, passed=self.passed, failures=self.failures(),
            first_divergent_layer=None if first is None else first.layer,
            first_divergent_block=None if first is None else first.first_failing_block(),
            judged_tokens=self.judged_tokens, tokens=self.tokens, envelope_multiple=self.multiple,
            near_tie_ulps=NEAR_TIE_ULPS, layers=[layer.to_dict() for layer in self.layers],
        )  # fmt: skip


def token_rows(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """[N, features] view of a per-token tensor ([B, T, ...], [N, ...] or K/V [B, G, T, D])."""
    return tensor.reshape(count, -1)


def _kv_tokens(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 2, 1, 3).reshape(tensor.shape[0] * tensor.shape[2], -1)


def _tie(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N] bool: the reference's top-k boundary is within NEAR_TIE_ULPS fp32 ulps (relative)."""
    top = probs.float().topk(top_k + 1, dim=-1).values
    gap = (top[:, top_k - 1] - top[:, top_k]) / top[:, top_k - 1].clamp_min(torch.finfo(torch.float32).tiny)
    return gap <= NEAR_TIE_ULPS * torch.finfo(torch.float32).eps


def _token_errors(ours: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Per valid token [n]: max|ours - reference| over its features / max|reference| over the call (compare's
    relative error, token by token); and whether `ours` is finite there."""
    ours, reference = ours.double()[valid], reference.double()[valid]
    if not ours.numel():
        return torch.zeros(0, dtype=torch.float64), True
    scale = float(reference.abs().max()) or 1.0
    return (ours - reference).abs().amax(-1) / scale, bool(torch.isfinite(ours).all())


@dataclass
class _Samples:
    """One block of one layer, over the calls: the per-token errors of ours and of the envelope."""

    ours: list[torch.Tensor] = field(default_factory=list)
    envelope: list[torch.Tensor] = field(default_factory=list)
    calls: list[tuple[str, float]] = field(default_factory=list)  # (call, its typical or largest error)
    finite: bool = True
    decision: bool = False


class LayerJudge:
    """Pools each layer's blocks over the calls, then judges them (see the module doc): a handful of prompt
    tokens makes a noisy median on its own, the calls together do not."""

    def __init__(self, dtype: str, top_k: int) -> None:
        self.envelope, self.top_k = dtype != "float32", top_k
        self.strict = TOLERANCES["float32"].max_rel
        self.samples: dict[tuple[int | str, str], _Samples] = {}

    def value(self, layer, call: str, block: str, ours, reference, envelope, valid, envelope_valid=None) -> None:  # noqa: ANN001
        """`valid` [n] says which tokens are judged (`envelope_valid` for the envelope's, when they differ)."""
        sample = self.samples.setdefault((layer, block), _Samples())
        errors, finite = _token_errors(ours, reference, valid)
        sample.ours.append(errors)
        sample.finite = sample.finite and finite
        if envelope is not None:
            sample.envelope.append(
                _token_errors(envelope, reference, valid if envelope_valid is None else envelope_valid)[0]
            )
        if errors.numel():
            sample.calls.append((call, float(errors.median() if self.envelope else errors.max())))
        else:
            sample.calls.append((call, 0.0))

    def decisions(self, layer, call: str, block: str, ours, envelope) -> None:  # noqa: ANN001
        """Shares of decisions differing: `ours`/`envelope` [n] bool per decision (True: differs)."""
        sample = self.samples.setdefault((layer, block), _Samples(decision=True))
        sample.ours.append(ours.double())
        if envelope is not None:
            sample.envelope.append(envelope.double())
        sample.calls.append((call, float(ours.double().mean()) if ours.numel() else 0.0))

    def verdicts(self, layer) -> list[BlockVerdict]:  # noqa: ANN001
        out = []
        for (where, block), sample in self.samples.items():
            if where != layer:
                continue
            ours = torch.cat(sample.ours)
            tokens = ours.numel()
            worst = max(sample.calls, key=lambda c: c[1])[0]
            if sample.decision:
                value = float(ours.mean()) if tokens else 0.0
                envelope = float(torch.cat(sample.envelope).mean()) if sample.envelope else None
                slack = 1.0 / max(tokens, 1) if block != EXPERT_PICKS else 1.0 / max(tokens // self.top_k, 1)
                bound = 0.0 if envelope is None else ENVELOPE_MULTIPLE * envelope + slack
                statistic = "share"
            elif sample.envelope:
                pooled = torch.cat(sample.envelope)
                # the typical token, and the tail (an error confined to one expert's tokens moves only that)
                candidates = []
                for statistic, q in (("median", 0.5), ("p90", 0.9)):
                    mine = float(ours.quantile(q)) if tokens else 0.0
                    theirs = float(pooled.quantile(q)) if pooled.numel() else 0.0
                    limit = max(ENVELOPE_MULTIPLE * theirs, self.strict)
                    candidates.append((mine / limit, statistic, mine, theirs, limit))
                _, statistic, value, envelope, bound = max(candidates)
            else:
                value, envelope, bound = (float(ours.max()) if tokens else 0.0), None, self.strict
                statistic = "max"
            out.append(BlockVerdict(worst, block, value, envelope, bound, tokens, sample.finite, statistic))
        return out


@dataclass(frozen=True)
class PerLayerOptions:
    artifacts: Path
    reference: Path
    prompts: list[list[int]]
    seed: int = 0
    canvas: int | None = None  # tokens of the denoise calls' canvas; None: the model's canvas
    scratch: Path | None = None  # where pieces are written; None: a temporary directory


def _calls(model, recorder: LayerRecorder, options: PerLayerOptions, io_dtype: torch.dtype, images: bool = False):  # noqa: ANN001, ANN202
    """Run the reference over the three calls; the artifact's feeds for each, beside its record. `images` (a
    step with image inputs): the encoder pass's prompts hold image spans with soft tokens merged in, so that
    the embedding block judges the merge (scatter at the image rows) and layer 0 on sees the image blocks."""
    from dllm_trt.generation.loop import GenerationSettings, left_pad

    text = model.config.get_text_config(decoder=True)
    window, vocab = text.sliding_window, text.vocab_size
    sampler = GenerationSettings.from_generation_config(model.generation_config.to_dict()).sampler
    prompts = [p[-(window - 1) :] for p in options.prompts]  # new K/V of a prompt are read from the cache
    ids, valid = left_pad(prompts, text.pad_token_id or 0)
    batch, length = ids.shape
    canvas = options.canvas or model.config.canvas_length
    gen = torch.Generator().manual_seed(options.seed)
    specs = layer_specs(model)
    info = StepInfo.from_model(model)
    step = SimpleNamespace(past_names=cache_names(specs, "past_"), info=replace(info, dtype=io_dtype), images=images)
    empty = StaticKVCache(specs, batch, length + canvas, window, io_dtype)
    positions = torch.arange(length)[None, :].expand(batch, -1).contiguous()
    cache = new_cache(model)
    pictures = scenario_images(model, ids, valid, gen) if images else None
    recorder.start("encode", "encoder pass" + (" with images" if images else ""))
    reference_encode(model, cache, ids, valid, positions[:1], None if pictures is None else pictures.embeds)
    merged = None if pictures is None else pictures.for_pass(0, length)
    feeds = [encoder_feeds(step, ids, positions, valid, empty.mask(), empty.tensors(), merged)]
    ours = StaticKVCache(specs, batch, length + canvas, window, io_dtype)
    new = [layer.reference.tensors[kind] for layer in recorder.calls[0].layers for kind in ("key", "value")]
    ours.append(new, valid)
    positions = torch.arange(length, length + canvas)[None, :].expand(batch, -1).contiguous()
    canvas_ids = torch.randint(0, vocab, (batch, canvas), generator=gen)
    sc_logits = None
    temperature = torch.tensor(sampler.t_max)  # a generation's first steps run at the schedule's top
    heads = []
    for label in ("denoise step 1", "denoise step 2"):
        record = recorder.start("denoise", label)
        record.logits = reference_denoise(model, cache, canvas_ids, sc_logits, valid, positions[:1])
        zeros = torch.zeros(batch, canvas, text.hidden_size)
        sc_input = (zeros if sc_logits is None else soft_embedding(model, sc_logits)).to(io_dtype)
        noise = sampling_noise(batch, canvas, vocab, gen)
        feeds.append(sampling_feeds(step, canvas_ids, sc_input, positions, ours.mask(), ours.tensors(), temperature,
                                    noise))  # fmt: skip
        processed = record.logits / temperature
        head = sampling_head(processed, noise)
        heads.append((temperature, noise, head))
        accepted = accepted_positions(head.entropy, sampler.entropy_bound)
        canvas_ids = torch.where(accepted, head.sampled, torch.randint(0, vocab, (batch, canvas), generator=gen))
        sc_logits = processed.to(model.dtype)
    every = torch.ones(batch * canvas, dtype=torch.bool)
    return feeds, [valid.reshape(-1), every, every], heads


def per_layer_parity(options: PerLayerOptions, progress: Progress | None = None) -> PerLayerResult:
    """Every layer of `options.artifacts` against the same layer of transformers (see the module doc)."""
    progress = progress or Progress(total=0, quiet=True)
    manifest = read_manifest(options.artifacts)
    dtype = manifest["model"]["dtype"]
    io_dtype = getattr(torch, dtype)
    envelope_dtype = None if dtype == "float32" else io_dtype
    files = safetensors_files(options.reference)
    model = offloaded_reference(options.reference, torch.float32, tensor_index(files))
    precision = manifest.get("precision", "")
    recorder = LayerRecorder(model, envelope_dtype, precision)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    top_k = model.config.get_text_config(decoder=True).top_k_experts
    with progress.stage(f"reference: transformers layer by layer, {len(options.prompts)} prompt(s), 3 calls") as notes:
        try:
            with torch.no_grad():
                feeds, masks, heads = _calls(model, recorder, options, io_dtype, bool(manifest["model"].get("vision")))
        finally:
            recorder.close()
        notes.append(f"{layers} layers" + (f", envelope: the same layers in {dtype}" if envelope_dtype else ""))
    calls = recorder.calls
    denoise = [i for i, call in enumerate(calls) if call.kind == "denoise"]
    env_embeddings, env_logits = [None] * len(calls), {}
    if envelope_dtype is not None:  # the envelope's prologue and head, while the reference's embedding is here
        with torch.no_grad():
            env_embeddings = [_envelope_embedding(model, feed, envelope_dtype, precision) for feed in feeds]
            for i in denoise:
                env_logits[i] = _envelope_logits(model, calls[i].layers[-1].reference.tensors["output"], envelope_dtype)
    del model, recorder.model  # its embedding (fp32) must not sit beside the artifact's pieces
    gc.collect()
    judge = LayerJudge(dtype, top_k)
    verdicts = []
    total = judged = 0
    with tempfile.TemporaryDirectory(prefix="dllm-trt-layers-", dir=options.scratch) as scratch:
        graphs = LayerGraphs(options.artifacts, STEP_FILE, layers, Path(scratch))
        own = run_layer_piece(graphs, -1, feeds, [{} for _ in calls])
        for call, env, out, mask in zip(calls, env_embeddings, own, masks):
            ours, ref, n = out[graphs.segments[0].hidden_in], call.layers[0].hidden_in, mask.numel()
            judge.value(0, call.label, "embedding", token_rows(ours, n), token_rows(ref, n), _optional(env, n), mask)
        for index in range(layers):
            with progress.stage(f"layer {index}: the artifact's piece on {len(calls)} calls") as notes:
                segment = graphs.segments[index]
                teacher = [{segment.hidden_in: call.layers[index].hidden_in.to(io_dtype)} for call in calls]
                outs = run_layer_piece(graphs, index, [f | o for f, o in zip(feeds, own)], teacher)
                for call, out, mask in zip(calls, outs, masks):
                    counted, ok = _judge_layer(judge, graphs, index, call, out, mask)
                    total, judged = total + counted, judged + ok
                verdicts.append(_layer_verdict(judge, index))
                notes.append("ok" if verdicts[-1].passed else f"FAIL at {verdicts[-1].first_failing_block()}")
        _judge_head(judge, graphs, calls, feeds, own, heads, env_logits, layers)
        verdicts.append(LayerVerdict("head", judge.verdicts("head")))
    return PerLayerResult(dtype, [c.label for c in calls], total, judged, verdicts, precision=precision)


def _optional(tensor: torch.Tensor | None, count: int) -> torch.Tensor | None:
    return None if tensor is None else token_rows(tensor, count)


def _layer_verdict(judge: LayerJudge, index: int) -> LayerVerdict:
    verdict = LayerVerdict(index, judge.verdicts(index))
    picks = next((b for b in verdict.blocks if b.block == EXPERT_PICKS), None)
    if picks is not None:
        verdict.expert_agreement = 1.0 - picks.value
        verdict.envelope_expert_agreement = None if picks.envelope is None else 1.0 - picks.envelope
    return verdict


def run_layer_piece(graphs: LayerGraphs, index: int, feeds: list[dict], teacher: list[dict]) -> list[dict]:
    from dllm_trt.generation.ort_session import run

    session = graphs.open(index)
    try:
        return [{name: value.clone() for name, value in run(session, f | t).items()} for f, t in zip(feeds, teacher)]
    finally:
        del session
        gc.collect()  # an InferenceSession is freed by the collector, not on its last reference: its weights with it
        graphs.close(index)


def _judge_layer(judge: LayerJudge, graphs: LayerGraphs, index: int, call: CallRecord, out: dict, mask: torch.Tensor):
    """Hand one call's tensors of layer `index` to the judge; (tokens, tokens judged on what the router feeds)."""
    record, segment = call.layers[index], graphs.segments[index]
    ref, env = record.reference.tensors, record.envelope.tensors if record.envelope else None
    count = mask.numel()
    after_router = mask & ~_tie(ref["router.probs"], judge.top_k)
    agree, env_agree = after_router, after_router if env else None  # until the router says otherwise
    for block, _, _ in BLOCKS:
        if block not in segment.blocks:
            continue
        ours = out[segment.blocks[block]].float()
        key = REFERENCE_TENSOR[block]
        if block == ROUTER:
            ours = ours.reshape(count, -1).softmax(-1)
            # the graph's own TopK where it has one, else the fused op's specified pick from the logits
            own = segment.blocks.get(PICKS)
            picks = out[own].reshape(count, -1) if own else ours.topk(judge.top_k, dim=-1).indices
            differ = _picks_differing(picks, ref["router.picks"])
            env_differ = _picks_differing(env["router.picks"], ref["router.picks"]) if env else None
            judged = after_router.repeat_interleave(judge.top_k)
            env_judged = None if env_differ is None else env_differ[judged]
            judge.decisions(index, call.label, EXPERT_PICKS, differ[judged], env_judged)
            # What a pick feeds is judged where that side picked the reference's experts: another pick is a
            # decision, judged above, and its consequence is not an arithmetic error.
            agree = after_router & ~differ.view(count, -1).any(-1)
            env_agree = after_router & ~env_differ.view(count, -1).any(-1) if env else None
        later = block in AFTER_ROUTER
        valid, env_valid = (agree, env_agree) if later else (mask, None)
        env_tensor = _optional(env[key], count) if env else None
        judge.value(index, call.label, block, token_rows(ours, count), token_rows(ref[key], count), env_tensor, valid,
                    env_valid)  # fmt: skip
    leaving = token_rows(out[graphs.output_of_layer(index)].float(), count)
    env_out = _optional(env["output"], count) if env else None
    judge.value(index, call.label, "layer output", leaving, token_rows(ref["output"], count), env_out, agree, env_agree)
    if call.kind == "encode":
        for kind in ("key", "value"):
            name = next(n for n in segment.kv if n.startswith(kind + "."))
            env_kv = _kv_tokens(env[kind]) if env else None
            judge.value(index, call.label, "key/value", _kv_tokens(out[name].float()), _kv_tokens(ref[kind]), env_kv,
                        mask)  # fmt: skip
    return int(mask.sum()), int(after_router.sum())


def _picks_differing(picks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[n, K] picks -> [n*K] bool: the pick is not among the reference's K for that token."""
    return ~(picks.unsqueeze(-1) == reference.unsqueeze(-2)).any(-1).reshape(-1)


def _judge_head(judge: LayerJudge, graphs: LayerGraphs, calls, feeds, own, heads, env_logits: dict, layers: int):  # noqa: ANN001
    """The epilogue (final norm, LM head, softcap, a fused sampling head) on the reference's last hidden state."""
    denoise = [i for i, call in enumerate(calls) if call.kind == "denoise"]
    segment = graphs.segments[layers]
    teacher = []
    for i in denoise:
        last = calls[i].layers[-1].reference.tensors["output"]
        teacher.append({segment.hidden_in: last.to(feeds[i]["self_conditioning"].dtype)})
    outs = run_layer_piece(graphs, layers, [feeds[i] | own[i] for i in denoise], teacher)
    for i, out, (temperature, noise, head) in zip(denoise, outs, heads):
        call = calls[i]
        count = call.logits.shape[0] * call.logits.shape[1]
        valid = torch.ones(count, dtype=torch.bool)
        logits = env_logits.get(i)
        if LOGITS in out:
            env = None if logits is None else token_rows(logits, count)
            ours, ref = token_rows(out[LOGITS], count), token_rows(call.logits, count)
            judge.value("head", call.label, "logits", ours, ref, env, valid)
            continue
        if SAMPLING_OUTPUTS[0] not in out:
            continue
        env_head = None if logits is None else sampling_head(logits / temperature, noise)
        ours, ref = out["entropy"].reshape(count, 1), head.entropy.reshape(count, 1)
        env = None if env_head is None else env_head.entropy.reshape(count, 1)
        judge.value("head", call.label, "entropy", ours, ref, env, valid)
        ids = head.argmax.reshape(-1)
        env_differ = None if env_head is None else env_head.argmax.reshape(-1) != ids
        judge.decisions("head", call.label, "argmax", out["argmax_ids"].reshape(-1) != ids, env_differ)


def _envelope_embedding(model, feeds: dict, dtype: torch.dtype, precision: str) -> torch.Tensor:  # noqa: ANN001
    """The hidden state entering layer 0 in `dtype`: the embedding, and on a denoise call the self-conditioning
    block over it (DiffusionGemmaDecoderModel.forward's opening), from the artifact's own inputs."""
    decoder = model.model.decoder
    embeds = torch.func.functional_call(decoder.embed_tokens, envelope_weights(decoder.embed_tokens, dtype, ""),
                                        (feeds["input_ids"],))  # fmt: skip
    rows = feeds.get(STEP_IMAGE_INPUTS[1])
    if rows is not None and rows.numel():  # the encoder's masked_scatter of the image soft tokens
        embeds = merge_image_embeds(embeds, feeds[STEP_IMAGE_INPUTS[0]].to(dtype), rows)
    signal = feeds["self_conditioning"]
    if not signal.shape[1]:
        return embeds
    weights = envelope_weights(decoder.self_conditioning, dtype, precision, "self_conditioning.")
    rows = signal.shape[1]
    conditioned = torch.func.functional_call(decoder.self_conditioning, weights, (embeds[:, :rows], signal.to(dtype)))
    return torch.cat([conditioned, embeds[:, rows:]], dim=1)


def _envelope_logits(model, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
    """The reference's final norm, LM head and softcap in `dtype` (DiffusionGemmaForBlockDiffusion.forward's tail)."""
    norm, head = model.model.decoder.norm, model.lm_head
    normed = torch.func.functional_call(norm, envelope_weights(norm, dtype, ""), (hidden.to(dtype),))
    logits = torch.func.functional_call(head, envelope_weights(head, dtype, ""), (normed,))
    cap = model.final_logit_softcapping
    return torch.tanh(logits.float() / cap) * cap
