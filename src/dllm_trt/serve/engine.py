"""The one call the server makes: an OpenAI request -> a scheduler request -> its updates, as text, on asyncio.

The scheduler (generation.scheduler) runs on its own thread; its updates reach the request's coroutine
through `loop.call_soon_threadsafe`. A request whose client goes away is cancelled (its row leaves the
batch at the next tick, its cache with it), streaming or not.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from dllm_trt.generation.loop import GenerationSettings
from dllm_trt.generation.scheduler import (
    CanvasUpdate,
    ContextTooLong,
    Failed,
    Finished,
    QueueFull,
    Request,
    Scheduler,
    Ticket,
    Update,
)
from dllm_trt.generation.tokenizer import TextStream, generation_config, load_tokenizer
from dllm_trt.serve.schema import ApiError, ChatRequest, CompletionRequest, _Request

DISCONNECT_POLL_S = 1.0  # how often a waiting request checks that its client is still there


class _IdText:
    """Text of a model without a tokenizer: the ids, space-separated (as `dllm-trt generate` prints them)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def push(self, ids: list[int], final: bool = False) -> str:
        piece = " ".join(map(str, ids))
        piece = f" {piece}" if self.ids and piece else piece
        self.ids += ids
        return piece

    def text(self) -> str:
        return " ".join(map(str, self.ids))


@dataclass
class Job:
    """A submitted request as the server follows it."""

    ticket: Ticket
    updates: asyncio.Queue
    prompt_tokens: int
    text: TextStream | _IdText

    def decode(self, ids: list[int]) -> str:
        stream = TextStream(self.text.tokenizer) if isinstance(self.text, TextStream) else _IdText()
        return stream.push(ids, final=True)


class Engine:
    def __init__(self, scheduler: Scheduler, artifacts: Path, name: str, vocab_size: int,
                 chat_template: str | None = None) -> None:  # fmt: skip
        self.scheduler, self.name, self.vocab_size = scheduler, name, vocab_size
        self.tokenizer = load_tokenizer(artifacts)
        self.generation_config = generation_config(artifacts)
        if chat_template is not None and self.tokenizer is not None:
            self.tokenizer.chat_template = chat_template

    # ---- request -> prompt ids and settings ---------------------------------------------------------------

    def check_model(self, request: _Request) -> None:
        if request.model != self.name:
            raise ApiError(404, f"The model '{request.model}' does not exist; this server serves '{self.name}'",
                           "model", "model_not_found")  # fmt: skip

    def completion_prompt(self, request: CompletionRequest) -> list[int]:
        if isinstance(request.prompt, list):
            bad = [i for i in request.prompt if not 0 <= i < self.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                               "prompt")  # fmt: skip
            return list(request.prompt)
        if self.tokenizer is None:
            raise ApiError(400, f"the model '{self.name}' has no tokenizer: send the prompt as a list of token ids",
                           "prompt")  # fmt: skip
        return self.tokenizer(request.prompt)["input_ids"]

    def chat_prompt(self, request: ChatRequest) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"the model '{self.name}' has no chat template; use /v1/completions, or start the "
                           "server with --chat-template FILE", "messages")  # fmt: skip
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 (a template's own check, e.g. roles out of order)
            raise ApiError(400, f"the chat template refused the messages: {exc}", "messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def settings(self, request: _Request, max_tokens: int | None) -> GenerationSettings:
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, not {max_tokens}", "max_tokens")
        knobs = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                 "confidence_threshold")  # fmt: skip
        settings = GenerationSettings.from_generation_config(
            self.generation_config, max_new_tokens=max_tokens, **{k: getattr(request, k) for k in knobs}
        )
        if settings.sampler.t_min > settings.sampler.t_max:
            raise ApiError(400, f"t_min ({settings.sampler.t_min}) is above t_max ({settings.sampler.t_max})", "t_min")
        return settings

    # ---- the call ------------------------------------------------------------------------------------------

    def submit(self, request: _Request, prompt: list[int], max_tokens: int | None) -> Job:
        """Queue the request (raising ApiError if it cannot be); its updates arrive on the returned job."""
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        settings = self.settings(request, max_tokens)
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def listen(update: Update) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, update)

        scheduled = Request(tuple(prompt), settings, seed, provisional=request.stream_provisional)
        try:
            ticket = self.scheduler.submit(scheduled, listen)
        except ContextTooLong as exc:
            raise ApiError(400, str(exc), "max_tokens", "context_length_exceeded") from None
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", None, "queue_full") from None
        text = TextStream(self.tokenizer) if self.tokenizer is not None else _IdText()
        return Job(ticket, updates, len(prompt), text)

    async def follow(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[Update]:
        """The job's updates until it ends; cancels it if the client goes away or the caller stops reading."""
        try:
            while True:
                try:
                    update = await asyncio.wait_for(job.updates.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:  # noqa: UP041 (builtins.TimeoutError only from 3.11)
                    if await disconnected():
                        return
                    continue
                yield update
                if isinstance(update, Finished | Failed):
                    return
        finally:
            if not job.ticket.done.is_set():
                self.scheduler.cancel(job.ticket)


def failure(update: Failed) -> ApiError:
    return ApiError(500, f"generation failed: {update.message}", None, "generation_failed")


__all__ = ["CanvasUpdate", "Engine", "Failed", "Finished", "Job", "failure"]
