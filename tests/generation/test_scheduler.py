"""The scheduler batches requests at different stages into shared step calls, and each request still gets the
bits it gets alone; cancellation, limits and step failures touch only the requests they concern."""

import dataclasses

import pytest
import torch

from dllm_trt.generation.loop import GenerationSettings, generate
from dllm_trt.generation.scheduler import (
    ContextTooLong,
    Failed,
    Finished,
    QueueFull,
    Request,
    Scheduler,
    SchedulerOptions,
)
from dllm_trt.generation.step import OnnxRuntimeStep
from dllm_trt.generation.tokenizer import generation_config

# tiny preset: canvas 8, window 8. Prompts up to 11 tokens (two canvases wide), different seeds, knobs and
# lengths; a loose confidence threshold makes rows stop at different steps, so they drift apart.
CASES = [
    ((5, 17, 42), 0, dict(max_new_tokens=24)),
    (tuple(range(3, 14)), 1, dict(max_new_tokens=16, max_denoising_steps=5)),
    ((7, 8), 2, dict(max_new_tokens=8)),
    ((9, 9, 9, 4), 3, dict(max_new_tokens=24, max_denoising_steps=7)),
    ((11,), 4, dict(max_new_tokens=16, max_denoising_steps=4)),
    ((6, 5, 4, 3, 2, 30, 31, 32, 33), 5, dict(max_new_tokens=24)),
]


class Spy:
    """The step, recording what each call held."""

    def __init__(self, step):
        self.step, self.specs, self.info = step, step.specs, step.info
        self.encodes, self.denoises = [], []

    def encode(self, input_ids, position_ids, input_mask, cache_mask, past):
        self.encodes.append(cache_mask.any(dim=1).tolist())  # per row: had a cache (a commit) or not (a prompt)
        return self.step.encode(input_ids, position_ids, input_mask, cache_mask, past)

    def denoise_and_sample(self, *args):
        self.denoises.append(args[5].tolist())  # per row temperatures
        return self.step.denoise_and_sample(*args)


@pytest.fixture(scope="module")
def step(tiny_export):
    return OnnxRuntimeStep.from_artifacts(tiny_export)


def settings(tiny_export, **overrides):
    loose = dict(stability_threshold=0, confidence_threshold=5.9)
    return GenerationSettings.from_generation_config(generation_config(tiny_export), **(loose | overrides))


def requests(tiny_export):
    return [Request(prompt, settings(tiny_export, **knobs), seed) for prompt, seed, knobs in CASES]


def run_all(step, reqs, **options):
    scheduler = Scheduler(step, SchedulerOptions(max_context=64, torch_threads=0, **options)).start()
    try:
        tickets = [scheduler.submit(r) for r in reqs]
        return [t.result(timeout=300) for t in tickets]
    finally:
        scheduler.stop()


def test_batched_requests_get_their_solo_bits_while_sharing_calls(step, tiny_export):
    reqs = requests(tiny_export)
    solo = [run_all(step, [r])[0] for r in reqs]
    spy = Spy(step)
    batched = run_all(spy, reqs, max_batch=4)  # two wait in the queue and join as others finish
    assert [r.tokens for r in batched] == [r.tokens for r in solo]
    assert [r.steps_per_canvas for r in batched] == [r.steps_per_canvas for r in solo]
    # the batch really mixed stages: denoise calls over rows at different steps (temperatures), and
    # encoder calls holding a new prompt beside a committed canvas
    assert max(len(set(t)) for t in spy.denoises) > 1, spy.denoises
    assert max(len(t) for t in spy.denoises) == 4
    assert any(True in rows and False in rows for rows in spy.encodes), spy.encodes
    # and the loop itself (generate()) agrees with the scheduler's rows on these requests
    for request, result in zip(reqs, solo):
        sequences = generate(step, request.settings, torch.tensor([request.prompt]), seed=request.seed).sequences
        expected = [t for t in sequences[0, len(request.prompt) :].tolist() if t != request.settings.pad_token_id]
        assert result.tokens == expected[: request.settings.max_new_tokens]


def test_a_cancelled_request_leaves_and_the_others_are_untouched(step, tiny_export):
    reqs = requests(tiny_export)[:3]
    solo = [run_all(step, [r])[0] for r in (reqs[0], reqs[2])]
    scheduler = Scheduler(step, SchedulerOptions(max_context=64, torch_threads=0)).start()
    try:
        seen = []

        def cancel_after_the_first_canvas(update):  # on the scheduler's thread, as a server's listener runs
            seen.append(update)
            if len(seen) == 1:
                scheduler.cancel(victim)

        victim = scheduler.submit(reqs[0], cancel_after_the_first_canvas)  # three canvases
        others = [scheduler.submit(r) for r in (reqs[0], reqs[2])]
        assert [t.result(timeout=300).tokens for t in others] == [r.tokens for r in solo]
        assert victim.done.wait(60) and isinstance(victim.outcome, Failed) and victim.outcome.cancelled
        assert [type(u).__name__ for u in seen] == ["CanvasUpdate", "Failed"]  # left after its first canvas
        assert scheduler.active == 0 and scheduler.queue_depth == 0
    finally:
        scheduler.stop()


def test_limits_are_refused_at_submission(step, tiny_export):
    scheduler = Scheduler(step, SchedulerOptions(max_queue=2, max_context=32))  # not started: nothing drains
    request = Request((5, 6), settings(tiny_export, max_new_tokens=16))
    scheduler.submit(request)
    scheduler.submit(request)
    with pytest.raises(QueueFull):
        scheduler.submit(request)
    with pytest.raises(ContextTooLong, match="need 42 positions; this server holds 32"):  # 2 + 5 canvases of 8
        scheduler.submit(dataclasses.replace(request, settings=settings(tiny_export, max_new_tokens=33)))
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit(dataclasses.replace(request, prompt=()))
    scheduler.stop()


def test_a_failing_step_fails_its_rows_and_the_scheduler_goes_on(step, tiny_export):
    class Flaky(Spy):
        def denoise_and_sample(self, *args):
            if not self.denoises:
                self.denoises.append(None)
                raise RuntimeError("device lost")
            return super().denoise_and_sample(*args)

    scheduler = Scheduler(Flaky(step), SchedulerOptions(max_context=64, torch_threads=0)).start()
    try:
        request = requests(tiny_export)[2]
        first = scheduler.submit(request)
        assert first.done.wait(120) and "device lost" in first.outcome.message
        second = scheduler.submit(request)
        assert second.done.wait(120)
        assert isinstance(second.outcome, Finished)
    finally:
        scheduler.stop()
