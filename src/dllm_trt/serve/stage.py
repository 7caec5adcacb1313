"""`dllm-trt serve`: `run(ServeOptions)`; an OpenAI-compatible HTTP server over an artifact's Step, requests
batched by generation.scheduler, until it is stopped (SIGINT or SIGTERM)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.generation.backends import BACKENDS, open_step
from dllm_trt.generation.scheduler import Scheduler, SchedulerOptions
from dllm_trt.manifest import read_manifest


@dataclass(frozen=True)
class ServeOptions:
    artifacts: Path
    backend: str = "onnxruntime"  # one of generation.backends.BACKENDS
    device: str = "cpu"  # cpu | cuda
    checkpoint: Path | None = None  # for the torch backend; None: the checkpoint the artifacts came from
    threads: int = 0  # onnxruntime's intra-op threads; 0: one per core
    host: str = "127.0.0.1"  # loopback unless asked: a server is reachable from where it binds
    port: int = 8000
    model_name: str | None = None  # None: the checkpoint directory's name
    chat_template: Path | None = None  # a Jinja template for models whose tokenizer has none
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)
    graceful_shutdown_s: float = 5.0  # open streams get this long before the server closes them


@dataclass
class ServeResult:
    model_name: str
    url: str


def model_name(options: ServeOptions, manifest: dict) -> str:
    return options.model_name or Path(manifest["checkpoint"]["path"]).name


def build_app(options: ServeOptions, on_ready=None, on_stop=None):  # noqa: ANN001, ANN201 (fastapi.FastAPI)
    """The app and its engine, checked and loaded; nothing served yet (tests and run() share it)."""
    try:
        import uvicorn  # noqa: F401 (checked here, used by run)

        from dllm_trt.serve.app import create_app
        from dllm_trt.serve.engine import Engine
        from dllm_trt.serve.metrics import Metrics
    except ImportError as exc:
        missing = f"serving needs the 'serve' extra ({exc.name} is missing)"
        raise DllmError(f"{missing}: pip install 'dllm-trt[serve]'") from None
    if options.backend not in BACKENDS:
        raise DllmError(f"unknown backend '{options.backend}'; choose one of: {', '.join(BACKENDS)}")
    limits = options.scheduler
    for name in ("max_batch", "max_queue", "max_context"):
        if getattr(limits, name) < 1:
            raise DllmError(f"--{name.replace('_', '-')} must be a positive integer")
    if options.chat_template is not None and not options.chat_template.is_file():
        raise DllmError(f"--chat-template {options.chat_template}: no such file")
    manifest = read_manifest(options.artifacts)
    step = open_step(options.artifacts, options.backend, options.device, options.checkpoint, options.threads)
    if options.backend == "torch" and limits.torch_threads:  # a torch Step computes on torch's threads
        limits = dataclasses.replace(limits, torch_threads=0)
    metrics = Metrics()
    scheduler = Scheduler(step, limits, metrics)
    metrics.watch(scheduler)
    template = options.chat_template.read_text() if options.chat_template is not None else None
    engine = Engine(scheduler, options.artifacts, model_name(options, manifest), manifest["model"]["vocab_size"],
                    template)  # fmt: skip
    return create_app(engine, metrics, on_ready, on_stop), engine


def run(options: ServeOptions) -> ServeResult:
    """Serve until SIGINT/SIGTERM; prints one line when ready and one when stopped. uvicorn re-raises the
    signal once it has shut down gracefully, so the process ends as killed by it (exit status -15 for
    SIGTERM), after the scheduler has stopped."""
    import uvicorn

    url = f"http://{options.host}:{options.port}"
    holder: dict = {}

    def ready() -> None:
        engine = holder["engine"]
        execution = getattr(engine.scheduler.step, "execution", "native")
        print(f"dllm-trt: serving '{engine.name}' from {options.artifacts} at {url}/v1 ({options.backend}, "
              f"{execution}; up to {engine.scheduler.options.max_batch} requests batched)", file=sys.stderr,
              flush=True)  # fmt: skip

    def stopped() -> None:
        print(f"dllm-trt: stopped; {holder['engine'].scheduler.finished} requests served", file=sys.stderr,
              flush=True)  # fmt: skip

    app, holder["engine"] = build_app(options, ready, stopped)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=options.graceful_shutdown_s)  # fmt: skip
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise DllmError(f"could not serve at {url}: is the port taken? pass another --port") from None
    return ServeResult(holder["engine"].name, url)
