"""OpenAI's request and response shapes, as this server takes and gives them.

Requests are pydantic models mirroring OpenAI's (`/v1/completions`, `/v1/chat/completions`): the fields
this server honours, the diffusion sampler's knobs as extra fields, and OpenAI's other fields, taken
only at their neutral value and refused otherwise (`refusal`), so a client never gets a silently
different behaviour. An unknown field is refused, as OpenAI does. Responses are plain dicts in
OpenAI's shapes; errors are `{"error": {message, type, param, code}}` with an HTTP status.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None  # None: the generation config's max_new_tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    # None: a random seed; a given seed gives what `dllm-trt generate --seed` gives (torch takes 64 bits)
    seed: int | None = Field(None, ge=0, lt=2**64)
    n: int = 1
    user: str | None = None
    # the block-diffusion sampler's knobs (None: the generation config's)
    max_denoising_steps: int | None = Field(None, ge=1, le=1024)
    entropy_bound: float | None = Field(None, ge=0)
    t_min: float | None = Field(None, gt=0)
    t_max: float | None = Field(None, gt=0)
    stability_threshold: int | None = Field(None, ge=0, le=1024)
    confidence_threshold: float | None = Field(None, ge=0)
    stream_provisional: bool = False  # an extension: every denoise step's canvas, marked provisional
    # OpenAI's fields this sampler has no use for: refused unless neutral (see `refusal`)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Request):
    prompt: str | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None


_SAMPLER = ("t_min .. t_max, entropy_bound, max_denoising_steps, stability_threshold and confidence_threshold "
            "steer the block-diffusion sampler")  # fmt: skip


def refusal(request: _Request) -> ApiError | None:
    """The first field set to something this server does not do, as an error saying what to do instead."""
    checks = [
        ("n", request.n != 1, "n > 1 is not supported: send one request per completion"),
        ("temperature", request.temperature is not None, f"temperature is not used by this model; {_SAMPLER}"),
        ("top_p", request.top_p not in (None, 1), f"top_p is not used by this model; {_SAMPLER}"),
        ("stop", bool(request.stop), "stop sequences are not supported: cut the text where you need it"),
        ("logprobs", request.logprobs not in (None, False, 0), "logprobs are not supported"),
        ("presence_penalty", request.presence_penalty not in (None, 0), "penalties are not supported"),
        ("frequency_penalty", request.frequency_penalty not in (None, 0), "penalties are not supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        ("stream_provisional", request.stream_provisional and not request.stream,
         "stream_provisional needs stream: true"),
    ]  # fmt: skip
    if isinstance(request, CompletionRequest):
        checks += [
            ("echo", request.echo, "echo is not supported"),
            ("best_of", request.best_of not in (None, 1), "best_of > 1 is not supported"),
            ("suffix", request.suffix is not None, "suffix (insertion) is not supported"),
        ]
    if isinstance(request, ChatRequest):
        checks.append(("top_logprobs", request.top_logprobs is not None, "logprobs are not supported"))
    for param, refused, message in checks:
        if refused:
            return ApiError(400, message, param, "unsupported_parameter")
    return None


# ---- responses ----------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)  # fmt: skip


def completion(kind: str, ident: str, model: str, choice: dict, extra: dict | None = None) -> dict:
    """One response object or stream chunk; `kind` is OpenAI's `object` (text_completion, chat.completion...)."""
    return dict(id=ident, object=kind, created=int(time.time()), model=model, choices=[choice], **(extra or {}))


def text_choice(text: str, finish_reason: str | None, provisional: dict | None = None) -> dict:
    choice = dict(index=0, text=text, logprobs=None, finish_reason=finish_reason)
    return choice | ({"provisional": provisional} if provisional else {})


def chat_choice(content: str | None, finish_reason: str | None, delta: bool, role: bool = False,
                provisional: dict | None = None) -> dict:  # fmt: skip
    message: dict = {"role": "assistant"} if role or not delta else {}
    if content is not None:
        message["content"] = content
    choice = dict(index=0, finish_reason=finish_reason, logprobs=None)
    choice["delta" if delta else "message"] = message
    return choice | ({"provisional": provisional} if provisional else {})
