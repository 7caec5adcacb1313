"""Continuous batching: many generation requests over one Step, requests at different stages sharing its calls.

Each request is one row of the loop (generation.loop): its own KV cache, its own random generator seeded
as `generate --seed` seeds it, its own CanvasState. A tick advances every active request by one stage:
one encoder call for the requests with tokens to encode (prompts, and canvases just committed), then one
denoise call for every request inside a canvas, whatever step each is at (the temperature is per row).
Requests join between ticks as others finish, up to `max_batch` rows; more wait in a bounded queue; a
cancelled request leaves at the next tick and its cache goes with it.

A request's output is the same bits alone or batched, for three reasons: no op of the step mixes rows;
every row keeps one fixed cache layout whatever its neighbours (kv_cache.AlignedKVCache: reductions over
the keys see the same slots in the same lanes); and prompts are padded to whole canvases, so an encoder
call groups rows of equal width only. It is not the bits of `generate()`, whose cache has no padding:
those agree with these to rounding (onnxruntime sums the keys in another order), as any two batch shapes
of one graph do.

The step's two phases cannot share one call (the phase is the self-conditioning's row count, one per
call), so "stages sharing a call" means: every prompt pass and commit of a tick in one encoder call, every
denoise step of the tick in one denoise call. Letters: B rows in a call, C canvas, T new tokens, V vocab.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from dllm_trt.generation.kv_cache import AlignedKVCache
from dllm_trt.generation.loop import CanvasState, GenerationSettings, finalize_canvas
from dllm_trt.generation.sampler import RandomDraws
from dllm_trt.generation.step import DenoiseSample


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 16  # rows in one step call: requests generating at once
    max_queue: int = 64  # requests waiting beyond those; more are refused (QueueFull)
    max_context: int = 512  # prompt + generated tokens of one request: the slots of its cache
    draw_workers: int = 1  # threads drawing the sampler's noise while the step runs
    # torch's intra-op threads for the scheduler's own tensor work (stacking caches, the sampler); 0 leaves
    # torch as it is (a torch Step needs its threads). Process-wide: at 2 threads, stacking a few hundred
    # KB of cache waited on OpenMP barriers against the step's own threads (8 ms a torch.cat, measured).
    torch_threads: int = 1


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    settings: GenerationSettings  # max_new_tokens, the sampler's knobs, EOS and padding
    seed: int = 0
    provisional: bool = False  # also report each denoise step's argmax canvas


@dataclass
class CanvasUpdate:
    """A committed canvas (its tokens after EOS handling, padding dropped), or with `provisional` the
    argmax canvas after one denoise step, which later steps may still change."""

    index: int
    tokens: list[int]
    steps: int
    provisional: bool = False


@dataclass
class RequestResult:
    prompt_tokens: int
    tokens: list[int]  # generated, padding dropped, at most max_new_tokens
    finish_reason: str  # "stop" (an EOS id) or "length"
    steps_per_canvas: list[int]
    seconds: float  # from admission to the last canvas
    queued_seconds: float


@dataclass
class Finished:
    result: RequestResult


@dataclass
class Failed:
    message: str
    cancelled: bool = False


Update = CanvasUpdate | Finished | Failed


class QueueFull(Exception):
    """The bounded queue is full: the caller should retry later."""


class ContextTooLong(ValueError):
    """A prompt plus its new tokens would not fit the cache of `max_context` slots."""


class Observer:
    """What the scheduler reports as it works (a server turns it into metrics); does nothing by default."""

    def on_call(self, phase: str, rows: int, seconds: float) -> None:
        """One step call: phase "encode" or "denoise", the rows it held, its wall time."""

    def on_canvas(self, steps: int) -> None:
        """One committed canvas and the denoise steps it took."""

    def on_end(self, status: str, result: RequestResult | None) -> None:
        """A request left: status "finished", "cancelled" or "failed"."""


class Ticket:
    """A submitted request: cancel it, or wait for its result."""

    def __init__(self, number: int, request: Request, listener: Callable[[Update], None] | None) -> None:
        self.number, self.request, self.listener = number, request, listener
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.done = threading.Event()
        self.outcome: Finished | Failed | None = None

    def result(self, timeout: float | None = None) -> RequestResult:
        """Block until the request ends; its result, or RuntimeError naming why it has none."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.number} still running after {timeout} s")
        if isinstance(self.outcome, Failed):
            raise RuntimeError(self.outcome.message)
        return self.outcome.result


@dataclass
class _Row:
    """One active request: the loop's per-row state, kept across ticks."""

    ticket: Ticket
    cache: AlignedKVCache
    draws: RandomDraws
    sequences: torch.Tensor  # [1, L] prompt and committed canvases, as generate() builds them
    pending: torch.Tensor | None  # [1, T] tokens the encoder has not seen yet
    max_canvases: int
    admitted: float
    canvas: CanvasState | None = None
    canvases: int = 0
    tokens: list[int] = field(default_factory=list)
    steps_per_canvas: list[int] = field(default_factory=list)


class Scheduler:
    """Runs requests over `step` on a thread of its own: `start()`, `submit()` from any thread, `stop()`."""

    def __init__(self, step, options: SchedulerOptions = SchedulerOptions(), observer: Observer | None = None) -> None:  # noqa: ANN001, B008
        self.step, self.options = step, options
        self.observer = observer or Observer()
        self.info = step.info
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Ticket] = collections.deque()
        self._active: list[_Row] = []
        self._numbers = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.finished = 0  # requests that ran to their end
        self._draw_pool = ThreadPoolExecutor(options.draw_workers, thread_name_prefix="dllm-trt-draws")

    # ---- the caller's side (any thread) --------------------------------------------------------------

    def context_needed(self, prompt_length: int, max_new_tokens: int) -> int:
        """Cache slots a request takes: its prompt and every canvas it may commit."""
        return prompt_length + math.ceil(max_new_tokens / self.info.canvas_length) * self.info.canvas_length

    def submit(self, request: Request, listener: Callable[[Update], None] | None = None) -> Ticket:
        """Queue a request; `listener` gets its updates on the scheduler's thread (keep it short)."""
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if request.settings.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        needed = self.context_needed(len(request.prompt), request.settings.max_new_tokens)
        if needed > self.options.max_context:
            raise ContextTooLong(
                f"the prompt ({len(request.prompt)} tokens) and {request.settings.max_new_tokens} new tokens "
                f"(whole canvases of {self.info.canvas_length}) need {needed} positions; this server holds "
                f"{self.options.max_context}"
            )
        with self._lock:
            if self._stopping:
                raise QueueFull("the scheduler is stopping")
            if len(self._queue) >= self.options.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (the queue holds "
                                f"{self.options.max_queue})")  # fmt: skip
            ticket = Ticket(next(self._numbers), request, listener)
            self._queue.append(ticket)
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a request: from the queue at once, from the batch at the next tick (its cache freed)."""
        with self._lock:
            ticket.cancelled = True
            queued = ticket in self._queue
            if queued:
                self._queue.remove(ticket)
        if queued:
            self._end(ticket, Failed("cancelled", cancelled=True))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Scheduler:
        if self.options.torch_threads:
            torch.set_num_threads(self.options.torch_threads)
        self._thread = threading.Thread(target=self._serve, name="dllm-trt-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the current tick, fail what is left, release the threads."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self._draw_pool.shutdown(wait=True)

    # ---- the scheduler's thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        reason = "the server is shutting down"
        try:
            self._loop()
        except BaseException as exc:  # a bug in the scheduler itself: no request may wait forever on it
            reason = f"the scheduler stopped: {type(exc).__name__}: {exc}"
            raise
        finally:
            with self._lock:
                self._stopping = True
                left = list(self._queue)
                self._queue.clear()
            for row in list(self._active):
                self._drop(row, Failed(reason))
            for ticket in left:
                self._end(ticket, Failed(reason))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._active and not self._queue:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = []
                while self._queue and len(self._active) + len(admitted) < self.options.max_batch:
                    admitted.append(self._queue.popleft())
            for ticket in admitted:
                try:
                    self._active.append(self._admit(ticket))
                except Exception as exc:  # noqa: BLE001 (e.g. no memory for its cache: that request fails alone)
                    self._end(ticket, Failed(f"could not start: {type(exc).__name__}: {exc}"))
            self.tick()

    def _admit(self, ticket: Ticket) -> _Row:
        request, info = ticket.request, self.info
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=info.device)  # [1, T]
        generator = torch.Generator(device=info.device).manual_seed(request.seed)
        return _Row(
            ticket=ticket,
            cache=AlignedKVCache(
                self.step.specs, self.options.max_context, info.sliding_window, info.dtype, info.device
            ),  # fmt: skip
            draws=RandomDraws(generator, 1, info.canvas_length, info.vocab_size, pool=self._draw_pool),
            sequences=prompt,
            pending=prompt,
            max_canvases=math.ceil(request.settings.max_new_tokens / info.canvas_length),
            admitted=time.perf_counter(),
        )

    def tick(self) -> None:
        """Advance every active request by one stage (one encoder call, one denoise call at most)."""
        for row in [r for r in self._active if r.ticket.cancelled]:
            self._drop(row, Failed("cancelled", cancelled=True))
        canvas, groups = self.info.canvas_length, {}
        for row in self._active:  # rows of one encoder call have one width: whole canvases of pending tokens
            if row.pending is not None:
                groups.setdefault(math.ceil(row.pending.shape[1] / canvas), []).append(row)
        for width in sorted(groups):
            self._call(self._encode, groups[width])
        denoising = [r for r in self._active if r.canvas is not None]
        if denoising:
            self._call(self._denoise, denoising)

    def _call(self, run: Callable[[list[_Row]], None], rows: list[_Row]) -> None:
        """One step call over `rows`; a failure fails those rows only, and the scheduler goes on."""
        try:
            run(rows)
        except Exception as exc:  # noqa: BLE001 (a backend fault must not stop the other requests)
            for row in rows:
                self._drop(row, Failed(f"the step failed: {type(exc).__name__}: {exc}"))

    def _encode(self, rows: list[_Row]) -> None:
        """1.a for every row: its pending tokens, right-padded to the group's width, after its cache."""
        info, device = self.info, torch.device(self.info.device)
        width = math.ceil(rows[0].pending.shape[1] / info.canvas_length) * info.canvas_length
        pad = rows[0].ticket.request.settings.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)  # [B, T]
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        positions = torch.empty(len(rows), width, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            tokens = row.pending.shape[1]
            ids[i, :tokens], valid[i, :tokens] = row.pending[0], True
            positions[i] = torch.arange(row.cache.length, row.cache.length + width, device=device)
        t0 = time.perf_counter()
        new = self.step.encode(ids, positions, valid, *self._caches(rows))
        self.observer.on_call("encode", len(rows), time.perf_counter() - t0)
        for i, row in enumerate(rows):
            row.cache.append([kv[i : i + 1, :, : row.pending.shape[1]] for kv in new])
            row.pending = None
            row.canvas = CanvasState.start(row.draws, info, row.ticket.request.settings.sampler)

    def _denoise(self, rows: list[_Row]) -> None:
        """1.c one step for every row, each at its own step of its own canvas."""
        info, device = self.info, torch.device(self.info.device)
        not_finished = torch.zeros(1, dtype=torch.bool, device=device)
        draws = []
        for row in rows:
            row.canvas.count(not_finished)
            draws.append(row.draws.step())  # (noise [C, V], re-noising ids [1, C])
        positions = torch.stack(
            [torch.arange(r.cache.length, r.cache.length + info.canvas_length, device=device) for r in rows]
        )  # [B, C]
        t0 = time.perf_counter()
        out = self.step.denoise_and_sample(
            torch.cat([r.canvas.current for r in rows]), torch.cat([r.canvas.self_conditioning for r in rows]),
            positions, *self._caches(rows), torch.stack([r.canvas.step_temperature() for r in rows]),
            torch.cat([noise for noise, _ in draws]),
        )  # fmt: skip
        self.observer.on_call("denoise", len(rows), time.perf_counter() - t0)
        for i, (row, (_, renoised)) in enumerate(zip(rows, draws)):
            state = row.canvas
            state.advance(DenoiseSample(out.sampled[i : i + 1], out.argmax[i : i + 1], out.entropy[i : i + 1],
                                        out.next_self_conditioning[i : i + 1]), renoised)  # fmt: skip
            if row.ticket.request.provisional and not state.done:
                self._send(row.ticket, CanvasUpdate(row.canvases, state.argmax[0].tolist(), state.calls, True))
            if state.done:
                self._commit(row)

    def _caches(self, rows: list[_Row]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The rows' caches stacked: cache_mask [B, S_full] and every layer's K/V [B, G, S, D]."""
        if len(rows) == 1:
            return rows[0].cache.mask(), rows[0].cache.tensors()
        mask = torch.cat([r.cache.mask() for r in rows])
        layers = zip(*(r.cache.tensors() for r in rows))
        return mask, [torch.cat(tensors) for tensors in layers]

    def _commit(self, row: _Row) -> None:
        """1.d/e commit the argmax canvas, handle EOS; 1.f queue it for the encoder unless the request ended."""
        settings, canvas = row.ticket.request.settings, self.info.canvas_length
        state, row.canvas = row.canvas, None
        max_length = len(row.ticket.request.prompt) + settings.max_new_tokens
        finished = torch.zeros(1, dtype=torch.bool, device=state.argmax.device)
        sequences = torch.cat([row.sequences, state.argmax], dim=-1)
        row.sequences, finished = finalize_canvas(
            sequences, finished, canvas, max_length, settings.eos_token_ids, settings.pad_token_id
        )
        committed = row.sequences[0, -canvas:]
        tokens = [t for t in committed.tolist() if t != settings.pad_token_id]
        tokens = tokens[: settings.max_new_tokens - len(row.tokens)]  # canvases are whole; max_new_tokens is not
        row.tokens += tokens
        row.steps_per_canvas.append(int(state.steps[0]))
        self.observer.on_canvas(int(state.steps[0]))
        self._send(row.ticket, CanvasUpdate(row.canvases, tokens, int(state.steps[0])))
        row.canvases += 1
        stopped = settings.eos_token_ids and bool(torch.isin(committed, torch.tensor(settings.eos_token_ids)).any())
        if bool(finished[0]) or row.canvases == row.max_canvases:
            result = RequestResult(
                prompt_tokens=len(row.ticket.request.prompt), tokens=row.tokens,
                finish_reason="stop" if stopped else "length", steps_per_canvas=row.steps_per_canvas,
                seconds=time.perf_counter() - row.admitted, queued_seconds=row.admitted - row.ticket.submitted,
            )  # fmt: skip
            self._drop(row, Finished(result))
        else:
            row.pending = committed[None, :]

    def _drop(self, row: _Row, outcome: Finished | Failed) -> None:
        if row in self._active:
            self._active.remove(row)
        row.draws.close()
        row.cache = row.canvas = None  # the cache goes now, not when the listener lets go of the ticket
        self._end(row.ticket, outcome)

    def _send(self, ticket: Ticket, update: Update) -> None:
        if ticket.listener is not None:
            try:
                ticket.listener(update)
            except Exception:  # noqa: BLE001 (a listener's fault is its request's, not the batch's)
                ticket.cancelled = True

    def _end(self, ticket: Ticket, outcome: Finished | Failed) -> None:
        ticket.outcome = outcome
        self.finished += isinstance(outcome, Finished)
        status = "finished" if isinstance(outcome, Finished) else "cancelled" if outcome.cancelled else "failed"
        self.observer.on_end(status, outcome.result if isinstance(outcome, Finished) else None)
        self._send(ticket, outcome)
        ticket.done.set()
