"""`dllm-trt serve` and `dllm-trt triton-repo`: generation behind an OpenAI-compatible HTTP API, and a Triton
Inference Server model repository for scale-out. A stage: it imports leaves only (the scheduler, the loop
and the Steps of generation/).

stage.py         run(ServeOptions): the server over an artifact's Step, until stopped
app.py           the HTTP routes: request schema -> one call into the engine -> response schema, SSE streams
engine.py        the one call: an OpenAI request -> a scheduler request -> its updates as text, on asyncio
schema.py        OpenAI's request and response shapes; the fields refused; the error shape
metrics.py       Prometheus metrics of the scheduler's work, in the server's own registry
triton_repo.py   run(TritonRepoOptions): write a Triton model repository for an artifact directory
triton_model.py  the repository's Python model: decoupled, over the scheduler (copied as it is)
"""

__all__ = ["ServeOptions", "ServeResult", "run"]


def __getattr__(name: str):  # noqa: ANN202
    # Lazy, so that importing the package costs nothing until the verb runs.
    if name in __all__:
        from dllm_trt.serve import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'dllm_trt.serve' has no attribute {name!r}")
