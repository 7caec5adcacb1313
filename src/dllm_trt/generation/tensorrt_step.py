"""The tensorrt backend: the engines of `dllm-trt build` behind the Step interface.

Loading checks build_info.json against this process's TensorRT library, version and GPU, registers
the MoE and attention plugins (trt.moe_plugin, trt.attention_plugin: their compiled kernels are inside the
engine), then deserializes
the one step engine: one copy of the weights, for both phases. An engine with one optimization
profile (the default) runs both phases in one execution context: every encoder pass grows the
cache, so the denoise step's CUDA graph is captured anew after it anyway. An engine with a profile
per phase (trt.profiles.PHASES) gets an execution context per phase, each fixed to its profile
so that no call switches profiles; the two never run at once, so they share one activation buffer,
sized for the larger profile. I/O is bound by name with shapes set per call.
Inputs are placed where the engine says it reads them (`get_tensor_location`: the host for shape
tensors, the device otherwise). Inputs that already are contiguous CUDA tensors of the engine's dtype
are bound by address: the KV cache's tensors are (generation.kv_cache lays each layer's current
[B, G, P, D] tensor out at the start of its storage), so the cache is never copied. Every
set_input_shape, set_tensor_address and execute_async_v3 result is checked. Execution contexts are made
through IRuntimeConfig (trt.trt_library.execution_context) with user-managed activations; the engines
of TensorRT for RTX are built with REQUIRE_USER_ALLOCATION (trt.engine) so that they can be captured.

CUDA graphs, for the denoise step (12-48 calls per canvas with the same shapes):
* TensorRT for RTX captures its own (its runtime config's WHOLE_GRAPH_CAPTURE, once the shape's
  specialised kernels are compiled): the step calls it eagerly and never captures it by hand;
* TensorRT: one graph for the canvas context, keyed by every input shape (and the values of host-placed
  inputs) and the cache's addresses; a new key (the cache grew by a canvas, another batch) drops the old
  graph and captures a new one as trtexec does (generation.cuda_graphs): set shapes, bind, one eager
  execute_async_v3 (TensorRT's deferred per-shape setup) on the step's own stream, ask the context
  whether it is stream capturable there, then capture one enqueue on that stream in thread-local mode;
* the per-step inputs (canvas, self-conditioning, positions, mask, temperature, noise) are copied
  into static buffers the graph was captured with; outputs are cloned out of its static buffers;
* an engine whose enqueue cannot be captured (the context says so, or the capture fails: its CUDA error
  is cleared) runs eagerly from then on, said once on stderr.
The encoder pass runs eagerly: its token count changes every call and it runs once per canvas.

Letters: B batch, T new tokens, C canvas, H hidden, V vocab, P cached positions.
What has never run: the engine half (no GPU where this was written; TensorRT for RTX builds engines
here but cannot deserialize them without CUDA; no lent GPU has a TensorRT that builds for it). The
CUDA-graph bookkeeping is tested with a stand-in runner: its eager fallback on the CPU, its captures
and replays on a GPU (bench/gpu_session.sh).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dllm_trt.contract import (
    SAMPLING_INPUTS,
    SAMPLING_OUTPUTS,
    STEP,
    STEP_IMAGE_INPUTS,
    STEP_INPUTS,
    VISION_INPUTS,
    VISION_OUTPUT,
    cache_names,
)
from dllm_trt.errors import DllmError
from dllm_trt.generation import cuda_graphs

# generation.step (and through it transformers and onnx) is imported where it is used, so that the engine
# plumbing below imports with torch alone (the GPU checks run it on machines with nothing else).

_TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
    "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8,
}  # fmt: skip


def placements(trt, engine, names: list[str]) -> dict[str, str]:  # noqa: ANN001
    """Where each I/O tensor must live, as the engine says (`get_tensor_location`): "cpu" for what TensorRT
    reads on the host (shape tensors), "cuda" otherwise."""
    host = trt.TensorLocation.HOST
    return {name: "cpu" if engine.get_tensor_location(name) == host else "cuda" for name in names}


class NotCapturable(RuntimeError):
    """The execution context says its enqueue cannot be captured on this stream."""


class EngineRunner:
    """One execution context of an engine, fixed to one optimization profile: bind by name, set
    shapes, enqueue on the step's own stream, each checked. Its activations live in `scratch`, which
    contexts may share (they share the stream too, so they never overlap)."""

    def __init__(
        self, lib, engine, name: str, profile: int, scratch: torch.Tensor, stream: torch.cuda.Stream,
        cuda_graphs: bool = True,
    ) -> None:  # noqa: ANN001  # fmt: skip
        from dllm_trt.trt.trt_library import execution_context

        trt = lib.trt
        self.name = f"{name} (profile {profile})"
        self.engine, self.profile_index, self.stream = engine, profile, stream
        self.context = execution_context(lib, engine, cuda_graphs)
        if self.context is None:
            raise DllmError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
        if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise DllmError(f"{name}: TensorRT refused optimization profile {profile}")
        stream.synchronize()
        self.context.set_device_memory(scratch.data_ptr(), scratch.numel())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _TORCH_DTYPES[engine.get_tensor_dtype(n).name] for n in names}
        self.devices = placements(trt, engine, names)
        self.capturable = True
        self._profiles: dict[str, tuple] = {}
        self._dummy = {device: torch.zeros(16, dtype=torch.uint8, device=device) for device in ("cpu", "cuda")}

    def check_names(self, expected_inputs: list[str], expected_outputs: list[str]) -> None:
        missing = [n for n in [*expected_inputs, *expected_outputs] if n not in self.dtypes]
        if missing:
            raise DllmError(f"{self.name} has no tensor named {missing[0]}; it was not built from this manifest")

    def as_input(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as the engine wants it: where the engine reads it (host or device), its dtype, contiguous
        (no copy when it already is)."""
        return tensor.to(device=self.devices[name], dtype=self.dtypes[name]).contiguous()

    def _address(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._dummy[tensor.device.type].data_ptr()

    def profile(self, name: str) -> tuple:
        """(min, opt, max) shapes an input accepts (its static shape three times when it has no dynamic axis)."""
        if name not in self._profiles:
            dims = tuple(self.engine.get_tensor_shape(name))
            static = all(d >= 0 for d in dims)
            shapes = (dims, dims, dims) if static else self.engine.get_tensor_profile_shape(name, self.profile_index)
            self._profiles[name] = shapes
        return self._profiles[name]

    def set_inputs(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, tensor in feeds.items():
            lo, _, hi = self.profile(name)
            if len(tensor.shape) != len(lo) or any(d < a or d > b for d, a, b in zip(tensor.shape, lo, hi)):
                raise DllmError(
                    f"{self.name}: input {name} has shape {tuple(tensor.shape)}, outside the engine's profile "
                    f"{tuple(lo)}..{tuple(hi)}; rebuild with a wider --profile"
                )
            if tensor.device.type != self.devices[name]:
                raise DllmError(f"{self.name}: input {name} is on {tensor.device.type}, the engine reads it on "
                                f"{self.devices[name]}")  # fmt: skip
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise DllmError(f"{self.name}: TensorRT refused shape {tuple(tensor.shape)} for input {name}")
            if not self.context.set_tensor_address(name, self._address(tensor)):
                raise DllmError(f"{self.name}: TensorRT refused the address of input {name}")

    def new_outputs(self) -> dict[str, torch.Tensor]:
        """Output buffers for the shapes set last, bound to the context."""
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise DllmError(f"{self.name}: output {name} has unresolved shape {shape}; are all inputs set?")
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.devices[name])
            if not self.context.set_tensor_address(name, self._address(outputs[name])):
                raise DllmError(f"{self.name}: TensorRT refused the address of output {name}")
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DllmError(f"{self.name}: execute_async_v3 failed (see TensorRT's log above)")

    def enqueue(self) -> None:
        """One eager enqueue on the step's stream, ordered with the caller's stream."""
        cuda_graphs.run_on(self.stream, self._execute)

    def capture(self) -> torch.cuda.CUDAGraph:
        """One enqueue captured on the step's stream (after an eager one: TensorRT's deferred per-shape setup
        must not land in the graph), once the context says it can be."""
        if not self.context.is_stream_capturable(self.stream.cuda_stream):
            raise NotCapturable("TensorRT says the execution context is not stream capturable")
        return cuda_graphs.capture(self._execute, self.stream)

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        cuda_graphs.replay(graph, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class CapturedDenoise:
    """One CUDA graph of the denoise step at one shape key, with its static input and output buffers."""

    def __init__(self, runner: EngineRunner, feeds: dict[str, torch.Tensor], past: dict[str, torch.Tensor]) -> None:
        self.runner = runner
        self.static = {name: torch.empty_like(t) for name, t in feeds.items()}  # per-step inputs
        for name, tensor in self.static.items():
            tensor.copy_(feeds[name])
        runner.set_inputs(self.static | past)
        self.outputs = runner.new_outputs()
        runner.enqueue()  # eager warm-up on the stream the capture uses
        runner.synchronize()
        self.graph = runner.capture()

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, tensor in feeds.items():
            self.static[name].copy_(tensor)
        self.runner.replay(self.graph)
        return self.outputs


class DenoiseGraphs:
    """The denoise step's one CUDA graph: replayed while the shapes and cache addresses stay, re-captured when not."""

    def __init__(self, runner: EngineRunner, enabled: bool = True) -> None:
        self.runner = runner
        self.enabled = enabled
        self.graph: CapturedDenoise | None = None
        self.key: tuple | None = None
        self.captures = 0

    def run(self, step_feeds: dict[str, torch.Tensor], cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not (self.enabled and self.runner.capturable):
            return self._eager(step_feeds, cache)
        key = tuple((n, tuple(t.shape), _host_value(t)) for n, t in step_feeds.items())
        key += tuple((n, tuple(t.shape), t.data_ptr()) for n, t in cache.items())
        if key != self.key:
            self.graph, self.key = None, None  # the cache only grows: an old graph never comes back
            try:
                self.graph = CapturedDenoise(self.runner, step_feeds, cache)
            except (RuntimeError, DllmError) as exc:  # NotCapturable, a failed capture, a refused enqueue
                self.runner.capturable = False
                cuda_graphs.eager_fallback(self.runner.name, str(exc))
                return self._eager(step_feeds, cache)
            self.key = key
            self.captures += 1
        return self.graph.run(step_feeds)

    def drop(self) -> None:
        """Forget the captured graph (its context was re-shaped for another call)."""
        self.graph, self.key = None, None

    def _eager(self, step_feeds: dict[str, torch.Tensor], cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.runner.set_inputs(step_feeds | cache)
        outputs = self.runner.new_outputs()
        self.runner.enqueue()
        return outputs


def _host_value(tensor: torch.Tensor) -> tuple | None:
    """What a graph bakes in of a host-placed input (TensorRT reads it when the graph is captured)."""
    return tuple(tensor.reshape(-1).tolist()) if tensor.device.type == "cpu" else None


def open_step_engine(trt, runtime, path: Path) -> tuple:  # noqa: ANN001
    """(engine, scratch): the deserialized step engine and one activation buffer for all its profiles."""
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise DllmError(f"TensorRT could not deserialize {path}; rebuild it with 'dllm-trt build' on this machine")
    if engine.num_optimization_profiles not in (1, 2):
        raise DllmError(f"{path} has {engine.num_optimization_profiles} optimization profiles, not 1 (both phases) "
                        "or 2 (prompt, canvas); rebuild it with this dllm-trt")  # fmt: skip
    scratch = torch.empty(max(int(engine.device_memory_size_v2), 1), dtype=torch.uint8, device="cuda")
    return engine, scratch


class TensorRTStep:
    """encode and denoise_and_sample over the one step engine of an engine directory."""

    def __init__(self, artifacts: Path, manifest: dict, use_cuda_graphs: bool = True) -> None:
        from dllm_trt.generation.step import StepInfo
        from dllm_trt.models.diffusion_gemma import LayerSpec
        from dllm_trt.trt.attention_plugin import register_attention_plugin
        from dllm_trt.trt.build_info import check_compatible, read_build_info
        from dllm_trt.trt.gpu import detect_gpu
        from dllm_trt.trt.moe_plugin import register_moe_plugin
        from dllm_trt.trt.profiles import PHASES
        from dllm_trt.trt.trt_library import TENSORRT, load_library

        info = read_build_info(artifacts)
        lib = load_library(info.get("library", TENSORRT))
        trt = lib.trt
        if not torch.cuda.is_available():
            raise DllmError("the tensorrt backend needs a CUDA GPU and a CUDA build of torch; torch sees none")
        check_compatible(info, lib.version, detect_gpu())
        register_moe_plugin(trt)  # the engine's MoE layers: their kernels are inside the engine
        register_attention_plugin(trt)  # and its attention without a fused TensorRT kernel, likewise
        self.specs = [LayerSpec(**spec) for spec in manifest["model"]["layers"]]
        self.past_names = cache_names(self.specs, "past_")
        self.new_names = cache_names(self.specs, "")
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        if STEP not in info.get("engines", {}):
            raise DllmError(f"{artifacts} holds engines of an older dllm-trt (no '{STEP}' engine); rebuild them")
        file = info["engines"][STEP]["file"]
        self.engine, self.scratch = open_step_engine(trt, runtime, artifacts / file)
        self.stream = torch.cuda.Stream()  # every enqueue, warm-up, capture and replay of this step
        if self.engine.num_optimization_profiles == 1:
            self.prompt = self.canvas = EngineRunner(lib, self.engine, file, 0, self.scratch, self.stream,
                                                     use_cuda_graphs)  # fmt: skip
        else:
            self.prompt, self.canvas = (
                EngineRunner(lib, self.engine, file, PHASES.index(phase), self.scratch, self.stream, use_cuda_graphs)
                for phase in PHASES
            )
        self.canvas.check_names(
            [*STEP_INPUTS, *SAMPLING_INPUTS, *self.past_names], [*self.new_names, *SAMPLING_OUTPUTS]
        )
        # TensorRT for RTX captures its own graphs (trt_library.RTX_RUNTIME); a capture by hand would nest in it
        self.denoise_graphs = DenoiseGraphs(self.canvas, use_cuda_graphs and not lib.captures_graphs)
        self.images = STEP_IMAGE_INPUTS[0] in self.canvas.dtypes  # built from a step with image inputs
        self.artifacts, self.trt, self.runtime = artifacts, trt, runtime
        self.vision_engines = {
            int(count): info["engines"][name]["file"]
            for count, name in ((manifest["model"].get("vision") or {}).get("graphs") or {}).items()
            if name in info.get("engines", {})
        }  # fmt: skip
        self.pooling_kernel = (manifest["model"].get("vision") or {}).get("pooling_kernel_size", 1)
        self.vision_runners: dict[int, EngineRunner] = {}
        model = manifest["model"]
        cache_dtype = self.canvas.dtypes[self.past_names[0]]
        longest_pass = int(self.prompt.profile(STEP_INPUTS[0])[2][1])  # input_ids [B, T]: the profile's max T
        self.info = StepInfo(
            model["canvas_length"], model["vocab_size"], model["hidden_size"], model["sliding_window"], cache_dtype,
            "cuda", prompt_chunk_max=longest_pass,
        )  # fmt: skip

    @classmethod
    def from_artifacts(cls, artifacts: Path, device: str = "cuda") -> TensorRTStep:
        from dllm_trt.manifest import read_manifest

        if device not in ("cuda", "cpu"):
            raise DllmError(f"--device {device}: the tensorrt backend runs on CUDA")
        return cls(artifacts, read_manifest(artifacts))

    @torch.no_grad()
    def encode(self, input_ids, position_ids, input_mask, cache_mask, past, images=None):  # noqa: ANN001, ANN201
        from dllm_trt.generation.step import encoder_feeds

        runner = self.prompt
        if runner is self.canvas:  # one context for both phases: this call re-shapes it
            self.denoise_graphs.drop()
        feeds = encoder_feeds(self, input_ids, position_ids, input_mask, cache_mask, past, images)
        feeds = {name: runner.as_input(name, tensor) for name, tensor in feeds.items()}
        runner.set_inputs(feeds)
        outputs = runner.new_outputs()
        runner.enqueue()
        return [outputs[name] for name in self.new_names]

    @torch.no_grad()
    def image_features(self, pixel_values, position_ids, counts):  # noqa: ANN001, ANN201
        """The vision engine for the processor's patch count (deserialized on first use), valid rows per image."""
        from dllm_trt.models.vision import valid_rows

        soft_tokens = pixel_values.shape[1] // self.pooling_kernel**2
        if soft_tokens not in self.vision_engines:
            raise DllmError(f"{self.artifacts} has no vision engine for {soft_tokens} soft tokens per image (it has: "
                            f"{', '.join(map(str, sorted(self.vision_engines))) or 'none'})")  # fmt: skip
        if soft_tokens not in self.vision_runners:
            file = self.vision_engines[soft_tokens]
            engine = self.runtime.deserialize_cuda_engine((self.artifacts / file).read_bytes())
            if engine is None:
                raise DllmError(f"TensorRT could not deserialize {self.artifacts / file}; rebuild it on this machine")
            scratch = torch.empty(max(int(engine.device_memory_size_v2), 1), dtype=torch.uint8, device="cuda")
            self.vision_runners[soft_tokens] = EngineRunner(self.trt, engine, file, 0, scratch)
        runner = self.vision_runners[soft_tokens]
        runner.check_names(list(VISION_INPUTS), [VISION_OUTPUT])
        feeds = dict(zip(VISION_INPUTS, (pixel_values, position_ids)))
        runner.set_inputs({name: runner.as_input(name, tensor) for name, tensor in feeds.items()})
        outputs = runner.new_outputs()
        runner.enqueue(torch.cuda.current_stream())
        return valid_rows(outputs[VISION_OUTPUT], counts)

    @torch.no_grad()
    def denoise_and_sample(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise):  # noqa: ANN001, ANN201
        from dllm_trt.generation.step import DenoiseSample, sampling_feeds

        runner = self.canvas
        feeds = sampling_feeds(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise)
        feeds = {name: runner.as_input(name, tensor) for name, tensor in feeds.items()}
        cache = {name: feeds.pop(name) for name in self.past_names}
        outputs = self.denoise_graphs.run(feeds, cache)
        # graph outputs are overwritten by the next replay: the loop keeps the previous step's
        return DenoiseSample(*(outputs[name].clone() for name in SAMPLING_OUTPUTS))
