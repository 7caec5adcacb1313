"""The HTTP layer: OpenAI's routes over one Engine. Each handler is request schema -> one call into the
engine -> response schema; streaming is Server-Sent Events, one chunk per committed canvas, then
`data: [DONE]`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from dllm_trt.serve import schema
from dllm_trt.serve.engine import CanvasUpdate, Engine, Failed, Finished, Job, failure
from dllm_trt.serve.metrics import Metrics


def create_app(
    engine: Engine,
    metrics: Metrics,
    on_ready: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.scheduler.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            engine.scheduler.stop()
            if on_stop is not None:
                on_stop()

    app = FastAPI(title="dllm-trt", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(exc: schema.ApiError) -> JSONResponse:
        if exc.status < 500:
            metrics.refused()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(schema.ApiError)
    async def api_error(request: Request, exc: schema.ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return error(schema.ApiError(400, f"the body is not valid JSON: {first.get('msg')}", None, "invalid_json"))
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return error(schema.ApiError(400, message, param, first.get("type")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(schema.ApiError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.scheduler.alive
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = dict(id=engine.name, object="model", created=int(time.time()), owned_by="dllm-trt",
                    max_model_len=engine.scheduler.options.max_context)  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: schema.CompletionRequest, request: Request) -> Response:
        engine.check_model(body)
        _refuse(body)
        job = engine.submit(body, engine.completion_prompt(body), body.max_tokens)
        return await _respond(engine, job, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: schema.ChatRequest, request: Request) -> Response:
        engine.check_model(body)
        _refuse(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = engine.submit(body, engine.chat_prompt(body), max_tokens)
        return await _respond(engine, job, body, request, chat=True)

    return app


def _refuse(body: schema._Request) -> None:
    refused = schema.refusal(body)
    if refused is not None:
        raise refused


async def _respond(engine: Engine, job: Job, body: schema._Request, request: Request, chat: bool) -> Response:
    ident = schema.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = _chunks(engine, job, ident, chat, usage, request)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, result = "", None
    async for update in engine.follow(job, request.is_disconnected):
        if isinstance(update, Failed):
            raise failure(update)
        if isinstance(update, Finished):
            result = update.result
    if result is None:  # the client went away
        return Response(status_code=499)
    text = job.decode(result.tokens)
    extra = dict(usage=schema.usage(job.prompt_tokens, len(result.tokens)), dllm_trt=_stats(result))
    if chat:
        choice = schema.chat_choice(text, result.finish_reason, delta=False)
        return JSONResponse(schema.completion("chat.completion", ident, engine.name, choice, extra))
    choice = schema.text_choice(text, result.finish_reason)
    return JSONResponse(schema.completion("text_completion", ident, engine.name, choice, extra))


def _stats(result) -> dict:  # noqa: ANN001 (generation.scheduler.RequestResult)
    return dict(steps_per_canvas=result.steps_per_canvas, canvases=len(result.steps_per_canvas),
                seconds=round(result.seconds, 4), queued_seconds=round(result.queued_seconds, 4))  # fmt: skip


async def _chunks(
    engine: Engine, job: Job, ident: str, chat: bool, usage: bool, request: Request
) -> AsyncIterator[str]:
    """SSE lines: (chat: a role chunk), a chunk per committed canvas (and per provisional one when asked),
    the finish reason, the usage when asked, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None = None, provisional: dict | None = None, role: bool = False,
              extra: dict | None = None) -> str:  # fmt: skip
        if chat:
            choice = schema.chat_choice(text, finish, delta=True, role=role, provisional=provisional)
        else:
            choice = schema.text_choice(text or "", finish, provisional)
        body = schema.completion(kind, ident, engine.name, choice, extra)
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        yield chunk("", role=True)
    async for update in engine.follow(job, request.is_disconnected):
        if isinstance(update, CanvasUpdate) and update.provisional:
            provisional = dict(canvas=update.index, step=update.steps, text=job.decode(update.tokens))
            yield chunk("" if not chat else None, provisional=provisional)
        elif isinstance(update, CanvasUpdate):
            piece = job.text.push(update.tokens)
            if piece:
                yield chunk(piece)
        elif isinstance(update, Failed):
            yield f"data: {json.dumps(failure(update).body())}\n\n"
            return
        elif isinstance(update, Finished):
            tail = job.text.push([], final=True)
            yield chunk(tail if tail else ("" if not chat else None), update.result.finish_reason,
                        extra=dict(dllm_trt=_stats(update.result)))  # fmt: skip
            if usage:
                body = dict(id=ident, object=kind, created=int(time.time()), model=engine.name, choices=[],
                            usage=schema.usage(job.prompt_tokens, len(update.result.tokens)))  # fmt: skip
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
