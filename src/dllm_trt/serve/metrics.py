"""Prometheus metrics of a server: what the scheduler reports (generation.scheduler.Observer) as counters,
gauges and histograms in a registry of the server's own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dllm_trt.generation.scheduler import Observer, RequestResult, Scheduler

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STEPS_BUCKETS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64)


class Metrics(Observer):
    def __init__(self, scheduler: Scheduler | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dllm_trt_requests", "Requests by how they ended (finished, cancelled, failed, "
                                "refused)", ["status"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("dllm_trt_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.tokens = Counter("dllm_trt_generated_tokens", "Tokens generated for finished requests", registry=r)
        self.canvases = Counter("dllm_trt_canvases", "Canvases committed", registry=r)
        self.steps = Histogram("dllm_trt_denoise_steps_per_canvas", "Denoise steps a canvas took",
                               buckets=STEPS_BUCKETS, registry=r)  # fmt: skip
        self.step_seconds = Histogram("dllm_trt_step_seconds", "Wall time of one step call, by phase", ["phase"],
                                      buckets=STEP_BUCKETS, registry=r)  # fmt: skip
        self.step_rows = Histogram("dllm_trt_step_rows", "Requests batched into one step call, by phase",
                                   ["phase"], buckets=ROW_BUCKETS, registry=r)  # fmt: skip
        self.request_seconds = Histogram("dllm_trt_request_seconds", "Admission to last canvas of a finished "
                                         "request", registry=r)  # fmt: skip
        self.queue_depth = Gauge("dllm_trt_queue_depth", "Requests waiting for a row", registry=r)
        self.active = Gauge("dllm_trt_active_requests", "Requests generating", registry=r)
        if scheduler is not None:
            self.watch(scheduler)

    def watch(self, scheduler: Scheduler) -> None:
        self.queue_depth.set_function(lambda: scheduler.queue_depth)
        self.active.set_function(lambda: scheduler.active)

    def on_call(self, phase: str, rows: int, seconds: float) -> None:
        self.step_seconds.labels(phase).observe(seconds)
        self.step_rows.labels(phase).observe(rows)

    def on_canvas(self, steps: int) -> None:
        self.canvases.inc()
        self.steps.observe(steps)

    def on_end(self, status: str, result: RequestResult | None) -> None:
        self.requests.labels(status).inc()
        if result is not None:
            self.prompt_tokens.inc(result.prompt_tokens)
            self.tokens.inc(len(result.tokens))
            self.request_seconds.observe(result.seconds)

    def refused(self) -> None:
        self.requests.labels("refused").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
