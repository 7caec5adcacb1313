"""`dllm-trt generate`: the block-diffusion loop of `generation/` over an artifact's Step, as a verb.

stage.py  run(GenerateOptions) -> GenerateResult: prompts in, canvases streamed as committed, stats out
"""

__all__ = ["CanvasText", "GenerateOptions", "GenerateResult", "run"]


def __getattr__(name: str):  # noqa: ANN202
    # Lazy, so that importing the package costs nothing until the verb runs.
    if name in __all__:
        from dllm_trt.runtime import stage

        return getattr(stage, name)
    raise AttributeError(f"module 'dllm_trt.runtime' has no attribute {name!r}")
