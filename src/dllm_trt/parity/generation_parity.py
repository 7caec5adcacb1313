"""Parity over real generations: every step replayed on two backends, and tokens end to end.

Step level: the loop runs on the reference backend; every encoder and denoise call is replayed
on the candidate backend with the very same inputs (cache, canvas, self-conditioning, noise), so
that a difference shows where it starts instead of compounding. Compared per call: K/V, logits
(when the backend hands them out), argmax, token entropy, the accepted set and the sampled token.
End to end: transformers' own `generate()` after `torch.manual_seed(seed)` against the loop on the
candidate backend with the same seed: token agreement and denoise calls per canvas.

Reduced precision is judged against an envelope: every call is also replayed on transformers itself
in the artifact's dtype, and each quantity is judged over all judged calls against how far that run
is from the fp32 reference (compare.judge_by_envelope). At least MIN_JUDGED_SHARE of the calls must
be judged.
Letters: B batch, C canvas, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from dllm_trt.generation.loop import GenerationSettings, generate
from dllm_trt.generation.sampler import accepted_positions
from dllm_trt.parity.compare import Comparison, EnvelopeVerdict, Tolerance, agreement, compare, judge_by_envelope


@dataclass(frozen=True)
class GenerationTolerance:
    step: Tolerance  # K/V and logits
    entropy_abs: float
    decision_agreement: float  # argmax, accepted set and sampled token, fraction of positions
    token_agreement: float  # end to end


GENERATION_TOLERANCES = {
    "float32": GenerationTolerance(Tolerance(1e-4, 1.0), entropy_abs=1e-4, decision_agreement=1.0, token_agreement=1.0),
    "float16": GenerationTolerance(
        Tolerance(2e-2, 0.99), entropy_abs=2e-2, decision_agreement=0.98, token_agreement=0.0
    ),
    "bfloat16": GenerationTolerance(
        Tolerance(5e-2, 0.98), entropy_abs=5e-2, decision_agreement=0.95, token_agreement=0.0
    ),
}
NEAR_TIE_ULPS = 4  # see RouterTieProbe
MIN_JUDGED_SHARE = 0.9  # of the replayed calls: fewer judged and validate fails, saying why


@dataclass
class StepRecord:
    kind: str  # "encode" | "denoise"
    canvas: int
    step: int
    comparisons: list[Comparison]
    router_tie: bool = False  # the reference's top-k boundary was (near) tied, see RouterTieProbe
    router_margin: float = 1.0  # smallest relative gap at that boundary over the call's routers
    envelope: list[Comparison] = field(default_factory=list)  # transformers in the artifact's dtype, same order


class RouterTieProbe:
    """Watches the reference's routers for (near) ties at the top-k boundary.

    On equal probabilities torch.topk's order is unspecified (it varies with the position of the
    tied values), while ONNX TopK takes the lower index: both are right, and the expert picked,
    hence the logits, may differ. The same holds when the k-th and (k+1)-th probabilities are a few
    ulps apart: the candidate's router input differs from the reference's by rounding, and so may
    its pick. Measured on the random `small` preset in fp32 (147 replayed calls): every call whose
    logits failed had a margin of 0 or 1.15e-7 (one ulp); margins from 2.3e-7 up never flipped.
    A call whose smallest relative margin is within `NEAR_TIE_ULPS` fp32 ulps is reported, not
    judged: the router computes in fp32 whatever the model's dtype, so only an fp32 tie is a tie (a
    reduced-precision artifact's legitimate flips at wider margins are judged by the envelope).
    """

    def __init__(self, model) -> None:  # noqa: ANN001
        self.margin = 1.0
        self.rows: torch.Tensor | None = None  # the router rows that matter (padding's never does)
        self.threshold = NEAR_TIE_ULPS * torch.finfo(torch.float32).eps
        top_k = model.config.text_config.top_k_experts
        self.handles = []
        for layer in [*model.model.encoder.language_model.layers, *model.model.decoder.layers]:
            self.handles.append(layer.router.register_forward_hook(self._hook(top_k)))

    def _hook(self, top_k: int):  # noqa: ANN202
        def hook(module, inputs, outputs) -> None:  # noqa: ANN001
            probs = outputs[0]
            if self.rows is not None and probs.shape[0] == self.rows.numel():
                probs = probs[self.rows]
            if top_k < probs.shape[-1] and probs.shape[0]:
                top = probs.float().topk(top_k + 1, dim=-1).values
                gap = (top[:, top_k - 1] - top[:, top_k]) / top[:, top_k - 1].clamp_min(torch.finfo(torch.float32).tiny)
                self.margin = min(self.margin, float(gap.min()))

        return hook

    def take(self) -> float:
        """The smallest relative margin since the last take (1.0 when no router ran)."""
        margin, self.margin = self.margin, 1.0
        return margin

    def tied(self, margin: float) -> bool:
        return margin <= self.threshold

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class Agreement:
    """A decision's agreement on its worst judged call (the smallest margin over what it required)."""

    name: str
    value: float
    required: float
    calls: int  # judged calls it covers; none judged is a failure, not 100%

    @property
    def passed(self) -> bool:
        return self.calls > 0 and self.value >= self.required - 1e-12

    def to_dict(self) -> dict:
        return dict(name=self.name, value=self.value, required=self.required, calls=self.calls, passed=self.passed)


class TeeStep:
    """Runs the reference step, replays each call on the candidate (and on the envelope, when there is
    one), records the differences. The loop sees only the reference's outputs, so the trajectory is
    the reference's own.
    """

    def __init__(
        self,
        reference,  # noqa: ANN001
        candidate,  # noqa: ANN001
        tolerance: GenerationTolerance,
        entropy_bound: float,
        probe: RouterTieProbe,
        envelope=None,  # noqa: ANN001
    ) -> None:
        self.reference, self.candidate, self.envelope = reference, candidate, envelope
        self.probe = probe
        self.specs, self.info = reference.specs, reference.info
        self.tolerance = tolerance
        self.entropy_bound = entropy_bound
        self.records: list[StepRecord] = []
        # per decision, (share agreeing, share required) of every judged call
        self.decisions: dict[str, list[tuple[float, float]]] = {"argmax": [], "accepted set": [], "sampled token": []}
        self.canvas = -1
        self.step = 0

    def _both(self, name: str, actual, expected, envelope, valid=None, argmax: bool = False):  # noqa: ANN001, ANN202
        """The candidate's comparison of one quantity, and with an envelope the envelope's (else None)."""
        ours = compare(name, actual, expected, self.tolerance.step, valid, argmax)
        if envelope is None:
            return ours, None
        return ours, compare(name, envelope, expected, GENERATION_TOLERANCES["float32"].step, valid, argmax)

    def encode(self, input_ids, position_ids, input_mask, cache_mask, past, images=None):  # noqa: ANN001, ANN201
        self.canvas += 1
        self.step = 0
        self.probe.take()
        self.probe.rows = input_mask.reshape(-1)
        extra = {} if images is None else dict(images=images)
        try:
            expected = self.reference.encode(input_ids, position_ids, input_mask, cache_mask, past, **extra)
        finally:
            self.probe.rows = None
        args = (input_ids, position_ids, input_mask, cache_mask, past)
        actual = self.candidate.encode(*args, **extra)
        envelope = self.envelope.encode(*args, **extra) if self.envelope is not None else [None] * len(expected)
        valid = input_mask[:, None, :, None]  # [B, 1, T, 1]: padding K/V is never attended
        pairs = [
            self._both(f"key/value.{i // 2}", a, e, v, valid)
            for i, (a, e, v) in enumerate(zip(actual, expected, envelope))
        ]
        margin = self.probe.take()
        self._record("encode", pairs, self.probe.tied(margin), margin)
        return expected

    def denoise_and_sample(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise):  # noqa: ANN001, ANN201
        args = (canvas_ids, self_conditioning, position_ids, cache_mask, past)
        pairs = []
        self.probe.take()
        if hasattr(self.reference, "denoise") and hasattr(self.candidate, "denoise"):
            logits_ref = self.reference.denoise(*args)
            logits_env = self.envelope.denoise(*args) if self.envelope is not None else None
            pairs.append(self._both("logits", self.candidate.denoise(*args), logits_ref, logits_env, argmax=True))
        expected = self.reference.denoise_and_sample(*args, temperature, noise)
        actual = self.candidate.denoise_and_sample(*args, temperature, noise)
        envelope = self.envelope.denoise_and_sample(*args, temperature, noise) if self.envelope is not None else None
        pairs.append((self._entropy(actual, expected), self._entropy(envelope, expected) if envelope else None))
        sc_envelope = envelope.next_self_conditioning if envelope is not None else None
        sc = (actual.next_self_conditioning, expected.next_self_conditioning, sc_envelope)
        pairs.append(self._both("next self-conditioning", *sc))
        margin = self.probe.take()
        tie = self.probe.tied(margin)
        decisions = self._decisions(expected, actual, envelope)
        if envelope is not None:
            pairs += decisions  # judged with the rest, against the envelope
        elif not tie:
            for (ours, _), name in zip(decisions, self.decisions):
                self.decisions[name].append((ours.argmax_agreement, self.tolerance.decision_agreement))
        self._record("denoise", pairs, tie, margin)
        self.step += 1
        return expected

    def _entropy(self, run, expected) -> Comparison:  # noqa: ANN001
        """Absolute entropy error, judged by the fixed bound (an envelope replaces it where there is one)."""
        measured = compare("entropy", run.entropy, expected.entropy, self.tolerance.step, features=0)
        error, bound = measured.max_abs, self.tolerance.entropy_abs
        passed = measured.finite and error <= bound
        return Comparison("entropy", error, error, None, passed, Tolerance(bound, 0.0), measured.finite,
                          median_rel=measured.median_rel)  # fmt: skip

    def _decisions(self, expected, actual, envelope) -> list[tuple[Comparison, Comparison | None]]:  # noqa: ANN001
        """argmax, accepted set and sampled token: the candidate's (and the envelope's) share agreeing."""
        picks = {
            "argmax": lambda run: run.argmax,
            "accepted set": lambda run: accepted_positions(run.entropy, self.entropy_bound),
            "sampled token": lambda run: run.sampled,
        }
        strict = GENERATION_TOLERANCES["float32"].step
        out = []
        for name in self.decisions:
            want = picks[name](expected)
            ours = agreement(name, picks[name](actual), want, self.tolerance.step)
            out.append((ours, agreement(name, picks[name](envelope), want, strict) if envelope is not None else None))
        return out

    def _record(self, kind: str, pairs: list, tie: bool, margin: float) -> None:
        record = StepRecord(kind, self.canvas, self.step, [c for c, _ in pairs], tie, margin)
        record.envelope = [e for _, e in pairs if e is not None]
        self.records.append(record)


@dataclass
class GenerationParity:
    dtype: str
    seeds: list[int]
    prompt_lengths: list[int]
    max_new_tokens: int
    near_tie_margin: float  # the RouterTieProbe's threshold: calls at or below it are not judged
    steps: list[StepRecord] = field(default_factory=list)
    decisions: list[Agreement] = field(default_factory=list)
    end_to_end: list[dict] = field(default_factory=list)
    envelope: bool = False  # bounds measured on transformers in the artifact's dtype

    @property
    def judged(self) -> int:
        return sum(not record.router_tie for record in self.steps)

    def verdicts(self) -> list[EnvelopeVerdict]:
        """Reduced precision: every quantity over the judged calls against the envelope (none without one)."""
        pairs = []
        for record in self.steps:
            if record.router_tie or not record.envelope:
                continue
            for ours, envelope in zip(record.comparisons, record.envelope):
                pairs.append((f"{record.kind} {ours.name.split('.')[0]}", ours, envelope))
                if ours.name == "logits":  # its argmax is a decision of its own
                    pairs.append(("denoise logits argmax", _ids(ours), _ids(envelope)))
        return judge_by_envelope(pairs)

    def worst(self) -> dict[str, Comparison]:
        """Per (kind, quantity): a failing comparison if any, else the largest relative error, over every call."""
        worst: dict[str, Comparison] = {}
        for record in self.steps:
            if record.router_tie:
                continue
            for comparison in record.comparisons:
                key = f"{record.kind} {comparison.name.split('.')[0]}"
                best = worst.get(key)
                if best is None or (not comparison.passed, comparison.max_rel) > (not best.passed, best.max_rel):
                    worst[key] = comparison
        return worst

    def failures(self) -> list[str]:
        failed = []
        if self.steps and self.judged < MIN_JUDGED_SHARE * len(self.steps):
            failed.append(
                f"only {self.judged} of {len(self.steps)} replayed calls could be judged (the rest had an fp32 "
                f"router tie); at least {100 * MIN_JUDGED_SHARE:.0f}% must be: use other seeds or prompts"
            )
        if self.envelope:
            failed += [v.line() for v in self.verdicts() if not v.passed]
        else:
            failed += [f"{key}: max rel {c.max_rel:.3e} > {c.tolerance.max_rel:.0e}"
                       for key, c in self.worst().items() if not c.passed]  # fmt: skip
        failed += [f"{a.name} agreement {100 * a.value:.2f}% < {100 * a.required:.2f}% ({a.calls} judged calls)"
                   for a in self.decisions if not a.passed]  # fmt: skip
        for run in self.end_to_end:
            if not run["passed"]:
                failed.append(
                    f"end-to-end seed {run['seed']}: token agreement {100 * run['token_agreement']:.2f}% "
                    f"(first difference at generated token {run['first_difference']})"
                )
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures()

    @property
    def router_ties(self) -> int:
        return sum(record.router_tie for record in self.steps)


def _ids(logits: Comparison) -> Comparison:
    """A logits comparison's argmax agreement as a decision (a share of equal ids)."""
    share = logits.argmax_agreement
    return Comparison(f"{logits.name} argmax", 0.0, 0.0, share, True, logits.tolerance, positions=logits.positions)


def _decisions(tee: TeeStep) -> list[Agreement]:
    """Without an envelope: each decision's worst judged call (with one, the verdicts judge them)."""
    if tee.envelope is not None:
        return []
    out = []
    for name, calls in tee.decisions.items():
        share, required = min(calls, key=lambda c: c[0] - c[1]) if calls else (0.0, 1.0)
        out.append(Agreement(name, share, required, len(calls)))
    return out


@torch.no_grad()
def reference_generate(model, input_ids, attention_mask, settings: GenerationSettings, seed: int, images=None):  # noqa: ANN001, ANN201
    """transformers' generate() under torch.manual_seed(seed); also counts its decoder calls per canvas.

    `images` (a dict: pixel_values, image_position_ids, mm_token_type_ids, as the processor returns
    them) go to generate() as its keyword arguments."""
    calls: list[int] = []
    encoder = model.model.encoder
    original_encoder, original_forward = encoder.forward, model.forward

    def counting_encoder(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(0)
        return original_encoder(*args, **kwargs)

    def counting_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if kwargs.get("decoder_input_ids") is not None:
            calls[-1] += 1
        return original_forward(*args, **kwargs)

    encoder.forward, model.forward = counting_encoder, counting_forward
    try:
        torch.manual_seed(seed)
        output = model.generate(
            input_ids, attention_mask=attention_mask.long(), max_new_tokens=settings.max_new_tokens,
            max_denoising_steps=settings.sampler.max_denoising_steps, t_min=settings.sampler.t_min,
            t_max=settings.sampler.t_max, stability_threshold=settings.sampler.stability_threshold,
            confidence_threshold=settings.sampler.confidence_threshold,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings.sampler.entropy_bound),
            eos_token_id=list(settings.eos_token_ids) or None, pad_token_id=settings.pad_token_id, **(images or {}),
        )  # fmt: skip
    finally:
        del encoder.forward, model.forward
    return output, calls


def generation_parity(
    model,  # noqa: ANN001
    reference_step,  # noqa: ANN001
    candidate_step,  # noqa: ANN001
    settings: GenerationSettings,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    seeds: list[int],
    tolerance_dtype: str | None = None,
    envelope_step=None,  # noqa: ANN001
    images=None,  # noqa: ANN001 (generation.image_inputs.ProcessedImages)
) -> GenerationParity:
    """`tolerance_dtype` names the artifact's dtype where it is not the reference model's;
    `envelope_step`, transformers in that dtype, sets the bounds of a reduced-precision artifact.
    `images` (processed; their placeholders expanded in `input_ids`): the replay hands every backend the
    reference tower's soft tokens (identical inputs); end to end, transformers' generate() takes the pixels
    and the candidate runs its own vision graph."""
    dtype = tolerance_dtype or str(model.dtype).removeprefix("torch.")
    tolerance = GENERATION_TOLERANCES[dtype]
    lengths = attention_mask.sum(dim=-1).tolist()
    probe = RouterTieProbe(model)
    result = GenerationParity(dtype, seeds, lengths, settings.max_new_tokens, probe.threshold)
    result.envelope = envelope_step is not None
    tee = TeeStep(reference_step, candidate_step, tolerance, settings.sampler.entropy_bound, probe, envelope_step)
    replay = own = multimodal = None
    if images is not None:
        from dllm_trt.generation.images import PromptImages

        image = model.config.image_token_id
        bidirectional = getattr(model.config.text_config, "use_bidirectional_attention", None) == "vision"
        args = (images.pixel_values, images.position_ids, images.counts)
        replay = PromptImages.locate(input_ids, image, reference_step.image_features(*args), bidirectional)
        own = PromptImages.locate(input_ids, image, candidate_step.image_features(*args), bidirectional)
        multimodal = dict(pixel_values=images.pixel_values, image_position_ids=images.position_ids,
                          mm_token_type_ids=(input_ids == image).long())  # fmt: skip
    try:
        generate(tee, settings, input_ids, attention_mask, seed=seeds[0], images=replay)
        result.steps = tee.records
        result.decisions = _decisions(tee)
        for seed in seeds:
            expected, expected_calls = reference_generate(model, input_ids, attention_mask, settings, seed, multimodal)
            actual = generate(candidate_step, settings, input_ids, attention_mask, seed=seed, images=own)
            result.end_to_end.append(_end_to_end(seed, input_ids.shape[1], expected, expected_calls, actual, tolerance))
    finally:
        probe.close()
    return result


def _end_to_end(seed, prompt, expected, expected_calls, actual, tolerance) -> dict:  # noqa: ANN001
    """Token agreement of one seed, judged strictly: the replay explains step-level differences, this
    shows whether the candidate's own trajectory stays the reference's."""
    want, got = expected.sequences[:, prompt:], actual.sequences[:, prompt:]
    same_shape = want.shape == got.shape
    agree = (want == got) if same_shape else torch.zeros(1, dtype=torch.bool)
    common = min(want.shape[1], got.shape[1])
    differ = (want[:, :common] != got[:, :common]).nonzero()
    first = int(differ[:, 1].min()) if len(differ) else (None if same_shape else common)
    agreement = float(agree.double().mean())
    return dict(
        seed=seed,
        token_agreement=agreement,
        first_difference=first,
        reference_tokens=list(want.shape),
        candidate_tokens=list(got.shape),
        reference_calls_per_canvas=expected_calls,
        candidate_calls_per_canvas=actual.calls_per_canvas,
        reference_tokens_per_forward=[round(float(t), 4) for t in expected.tokens_per_forward],
        candidate_tokens_per_forward=[round(t, 4) for t in actual.tokens_per_forward],
        passed=same_shape and agreement >= tolerance.token_agreement,
    )
