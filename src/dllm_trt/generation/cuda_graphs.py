"""CUDA graphs as trtexec makes them, for every Step that replays one (tensorrt_step, triton_step).

* One dedicated non-default stream per Step for its warm-up, its capture and every replay (the legacy
  default stream synchronises with every other stream, and a capture on one stream of work warmed up on
  another captures nothing of what that left pending); the caller's stream waits on it, and it on the
  caller's, around each use, so tensors made on either side are ordered.
* Capture in thread-local mode: CUDA calls that other threads make meanwhile (a library's background
  compiler, TensorRT for RTX's for one) do not invalidate the capture, as they do in torch's default
  global mode; this thread's unsafe calls still fail it.
* A failed capture leaves its error in the CUDA runtime's last-error slot, where the next kernel launch
  of the eager fallback would find it and fail: it is cleared, and the fallback says so on stderr.

Only `eager_fallback` runs without CUDA; the rest needs a GPU (bench/gpu_session.sh runs its tests).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

CAPTURE_MODE = "thread_local"
Result = TypeVar("Result")


def run_on(stream: torch.cuda.Stream, fn: Callable[[], Result]) -> Result:
    """fn() on `stream`, after what the current stream has queued, and before what it queues next."""
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        result = fn()
    current.wait_stream(stream)
    return result


def capture(fn: Callable[[], object], stream: torch.cuda.Stream, mode: str = CAPTURE_MODE) -> torch.cuda.CUDAGraph:
    """A graph of fn() captured on `stream` (warm it up on the same stream first); on failure the CUDA error
    is cleared before the exception goes on."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode=mode):
            fn()
    except Exception:
        clear_cuda_error()
        raise
    return graph


def replay(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> None:
    run_on(stream, graph.replay)


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime torch uses (dlopen of a loaded library returns that very instance), or None."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    return ctypes.CDLL(sorted(paths)[0]) if paths else None


def clear_cuda_error() -> int:
    """Reset the CUDA runtime's last error (what a failed capture leaves behind); returns the code it held."""
    cudart = _cudart()
    return int(cudart.cudaGetLastError()) if cudart is not None else 0


def eager_fallback(name: str, reason: str) -> None:
    """Say, once per Step, that it runs eagerly from now on, and why."""
    print(f"dllm-trt: {name} cannot be captured in a CUDA graph ({reason}); running it eagerly", file=sys.stderr)
