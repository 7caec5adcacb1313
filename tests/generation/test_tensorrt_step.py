"""The tensorrt backend: refusals without TensorRT, the CUDA-graph logic on a GPU, the engines with TensorRT.

The CUDA-graph tests drive DenoiseGraphs with a stand-in for EngineRunner (torch ops on the bound
tensors), so they run on any CUDA machine; the rest needs TensorRT and skips with the reason.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dllm_trt.errors import DllmError
from dllm_trt.generation import cuda_graphs
from dllm_trt.generation.tensorrt_step import NotCapturable

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "TensorRT is not installed here (its wheels download from NVIDIA's index, unreachable)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def _manifest_dir(path: Path, stage: str) -> Path:
    from dllm_trt.manifest import write_manifest

    path.mkdir(parents=True)
    write_manifest(path, dict(stage=stage, model={}, graphs={}))
    return path


def test_the_backend_refuses_a_directory_that_is_not_a_build(tmp_path):
    from dllm_trt.generation.backends import open_step

    with pytest.raises(DllmError, match="holds 'optimize' output; the tensorrt backend runs the engines"):
        open_step(_manifest_dir(tmp_path / "opt", "optimize"), "tensorrt")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed, so the missing-TensorRT error cannot occur")
def test_without_the_engines_library_the_backend_says_so_in_one_line(tmp_path):
    from dllm_trt.generation.backends import open_step
    from dllm_trt.trt.build_info import write_build_info

    engines = _manifest_dir(tmp_path / "engines", "build")
    write_build_info(engines, dict(library="tensorrt", tensorrt_version="11.3.0"))
    with pytest.raises(DllmError, match="^tensorrt is not installed: pip install 'dllm-trt\\[trt\\]'"):
        open_step(engines, "tensorrt", device="cuda")


class FakeDenoiser:
    """EngineRunner's interface over torch ops, on a stream of its own as the step's runners are: sampled =
    canvas + 1, argmax = canvas, entropy = temperature + cache sum (reads the cache by reference, as TensorRT
    reads it by address), next_sc = 2 * self_conditioning. `stream_capturable` is what the context answers."""

    name = "fake.engine"

    def __init__(self, device: str = "cuda", stream_capturable: bool = True) -> None:
        self.device, self.stream_capturable = device, stream_capturable
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.capturable = True
        self.bound: dict[str, torch.Tensor] = {}
        self.enqueues = 0

    def set_inputs(self, feeds):
        self.bound = dict(feeds)

    def new_outputs(self):
        b, c = self.bound["input_ids"].shape
        self.out = dict(
            sampled_ids=torch.empty(b, c, dtype=torch.int64, device=self.device),
            argmax_ids=torch.empty(b, c, dtype=torch.int64, device=self.device),
            entropy=torch.empty(b, c, device=self.device),
            next_self_conditioning=torch.empty_like(self.bound["self_conditioning"]),
        )
        return self.out

    def _execute(self):
        self.enqueues += 1
        x = self.bound
        self.out["sampled_ids"].copy_(x["input_ids"] + 1)
        self.out["argmax_ids"].copy_(x["input_ids"])
        self.out["entropy"].copy_(
            x["temperature"] + x["past_key.0"].float().sum() + torch.zeros_like(self.out["entropy"])
        )
        self.out["next_self_conditioning"].copy_(2 * x["self_conditioning"])

    def enqueue(self):
        if self.stream is None:
            return self._execute()
        cuda_graphs.run_on(self.stream, self._execute)

    def capture(self):
        if not self.stream_capturable:
            raise NotCapturable("TensorRT says the execution context is not stream capturable")
        return cuda_graphs.capture(self._execute, self.stream)

    def replay(self, graph):
        cuda_graphs.replay(graph, self.stream)

    def synchronize(self):
        if self.stream is not None:
            self.stream.synchronize()


def _step_feeds(batch, canvas, hidden, seed, temperature=0.5, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return dict(
        input_ids=torch.randint(0, 100, (batch, canvas), device=device, generator=gen),
        self_conditioning=torch.randn(batch, canvas, hidden, device=device, generator=gen, dtype=torch.bfloat16),
        temperature=torch.tensor(temperature, device=device),
    )


def test_a_context_that_is_not_stream_capturable_is_asked_first_and_runs_eagerly(capsys):
    """The capture is never attempted where the context says no; the fallback says so once and stays."""
    from dllm_trt.generation.tensorrt_step import DenoiseGraphs

    fake = FakeDenoiser("cpu", stream_capturable=False)
    graphs = DenoiseGraphs(fake)
    cache = {"past_key.0": torch.ones(1, 2, 4, 8, dtype=torch.bfloat16)}
    feeds = _step_feeds(1, 4, 8, 0, device="cpu")
    out = graphs.run(feeds, cache)
    torch.testing.assert_close(out["sampled_ids"], feeds["input_ids"] + 1)
    assert "not stream capturable); running it eagerly" in capsys.readouterr().err
    out = graphs.run(_step_feeds(1, 4, 8, 1, device="cpu"), cache)
    assert graphs.captures == 0 and fake.capturable is False and capsys.readouterr().err == ""
    assert fake.enqueues == 3  # the warm-up before asking, then one eager call each


def test_inputs_are_placed_where_the_engine_reads_them():
    """`get_tensor_location` decides host or device per tensor (TensorRT reads shape tensors on the host)."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX is not installed (the rtx extra)")
    from dllm_trt.generation.tensorrt_step import placements
    from dllm_trt.trt.trt_library import TENSORRT_RTX, load_library

    trt = load_library(TENSORRT_RTX).trt
    assert hasattr(trt.ICudaEngine, "get_tensor_location")  # the name the bindings expose

    class Locations:  # the one question placements asks an engine
        def get_tensor_location(self, name):
            return trt.TensorLocation.HOST if name == "shape_in" else trt.TensorLocation.DEVICE

    assert placements(trt, Locations(), ["input_ids", "shape_in"]) == {"input_ids": "cuda", "shape_in": "cpu"}


def test_rtx_runtime_settings_are_names_its_bindings_have():
    """Read against the installed bindings, not guessed: every IRuntimeConfig attribute and enum member the
    tensorrt backend sets exists in TensorRT for RTX, and TensorRT proper gets none of them."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX is not installed (the rtx extra)")
    from dllm_trt.trt.trt_library import TENSORRT_RTX, TrtLibrary, load_library, runtime_settings

    lib = load_library(TENSORRT_RTX)
    trt = lib.trt
    graphed, plain = runtime_settings(lib, True), runtime_settings(lib, False)
    assert graphed == {
        "cuda_graph_strategy": trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE,
        "dynamic_shapes_kernel_specialization_strategy": trt.DynamicShapesKernelSpecializationStrategy.LAZY,
    }
    assert plain["cuda_graph_strategy"] == trt.CudaGraphStrategy.DISABLED
    assert all(isinstance(getattr(trt.IRuntimeConfig, name), property) for name in graphed)
    for name in ("create_runtime_config", "create_execution_context"):
        assert hasattr(trt.ICudaEngine, name)
    assert hasattr(trt.IRuntimeConfig, "set_execution_context_allocation_strategy")
    assert hasattr(trt.IExecutionContext, "is_stream_capturable")
    assert lib.captures_graphs and not TrtLibrary("tensorrt", trt, "11").captures_graphs
    assert runtime_settings(TrtLibrary("tensorrt", trt, "11"), True) == {}


@needs_cuda
def test_denoise_graph_replays_new_inputs_and_recaptures_when_the_cache_grows():
    from dllm_trt.generation.tensorrt_step import DenoiseGraphs

    storage = torch.ones(2 * 2 * 64 * 8, dtype=torch.bfloat16, device="cuda")  # one layer's flat KV storage
    fake = FakeDenoiser()
    graphs = DenoiseGraphs(fake)
    for length in (16, 24):  # two canvases: the cache grew between them
        cache = {"past_key.0": storage[: 2 * 2 * length * 8].view(2, 2, length, 8)}
        for seed in range(3):
            feeds = _step_feeds(2, 4, 8, seed, temperature=0.1 * (seed + 1))
            out = {k: v.clone() for k, v in graphs.run(feeds, cache).items()}
            torch.testing.assert_close(out["sampled_ids"], feeds["input_ids"] + 1)
            torch.testing.assert_close(out["next_self_conditioning"], 2 * feeds["self_conditioning"])
            expected = 0.1 * (seed + 1) + float(cache["past_key.0"].float().sum())
            torch.testing.assert_close(out["entropy"], torch.full((2, 4), expected, device="cuda"))
    assert graphs.captures == 2  # one capture per cache length, replays in between
    assert fake.enqueues == 2 * 2  # each capture: one eager warm-up + one captured enqueue; replays do not enqueue


@needs_cuda
def test_a_failed_capture_clears_its_error_and_the_step_runs_eagerly(capsys):
    """An enqueue that does what a capture forbids (a host sync) fails the capture; its CUDA error is cleared,
    so the eager fallback's own launches and copies work, and it says so once."""
    from dllm_trt.generation.tensorrt_step import DenoiseGraphs

    class Syncing(FakeDenoiser):
        def _execute(self):
            super()._execute()
            float(self.out["entropy"].sum())  # a device-to-host copy: illegal inside a capture

    graphs = DenoiseGraphs(Syncing())
    cache = {"past_key.0": torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16, device="cuda")}
    feeds = _step_feeds(1, 4, 8, 0)
    out = graphs.run(feeds, cache)
    torch.testing.assert_close(out["argmax_ids"], feeds["input_ids"])
    assert graphs.runner.capturable is False and "running it eagerly" in capsys.readouterr().err
    out = graphs.run(_step_feeds(1, 4, 8, 1), cache)  # and stays eager, with working CUDA calls
    torch.cuda.synchronize()
    assert graphs.captures == 0 and cuda_graphs.clear_cuda_error() == 0


# ---- needs TensorRT (never run on the machines this was written on) ------------------------------


def test_engines_built_from_the_contract_graphs_run_with_and_without_cuda_graphs(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import trt_graphs

    from dllm_trt.engines.stage import BuildOptions, build_engines
    from dllm_trt.generation.tensorrt_step import TensorRTStep
    from dllm_trt.trt.gpu import detect_gpu, preset_for
    from dllm_trt.trt.gpu_presets import get_preset
    from dllm_trt.trt.trt_library import installed

    gpu = preset_for(detect_gpu())
    if gpu is None:
        pytest.skip("this GPU has no dllm-trt preset")
    if not installed(get_preset(gpu).library):
        pytest.skip(f"{get_preset(gpu).library}, which builds for this GPU, is not installed")
    opt = trt_graphs.write_optimized(tmp_path / "opt")
    engines = tmp_path / "engines"
    profiles = ("batch=1:1:2", "new_tokens=1:8:16", "cache_full=0:16:64")
    build_engines(BuildOptions(opt, engines, gpu=gpu, profiles=profiles, timing_cache=tmp_path / "t.cache", quiet=True))
    assert json.loads((engines / "build_info.json").read_text())["engines"]["step"]["network"]["plugins"] == {
        "DllmMoE": 2
    }
    from dllm_trt.manifest import read_manifest

    manifest = read_manifest(engines)
    graphed, eager = TensorRTStep(engines, manifest), TensorRTStep(engines, manifest, use_cuda_graphs=False)
    facts = trt_graphs.FACTS
    b, t, c = 1, 5, facts["canvas_length"]
    past = [torch.zeros(b, s["num_kv_heads"], 0, s["head_dim"], dtype=torch.bfloat16, device="cuda")
            for s in facts["layers"] for _ in ("key", "value")]  # fmt: skip
    ids = torch.randint(0, facts["vocab_size"], (b, t), device="cuda")
    positions = torch.arange(t, device="cuda")[None]
    valid = torch.ones(b, t, dtype=torch.bool, device="cuda")
    new = graphed.encode(ids, positions, valid, valid[:, :0], past)
    assert [tuple(k.shape) for k in new] == [(b, s["num_kv_heads"], t, s["head_dim"]) for s in facts["layers"]
                                             for _ in ("key", "value")]  # fmt: skip
    for _ in range(3):
        args = (
            torch.randint(0, facts["vocab_size"], (b, c), device="cuda"),
            torch.zeros(b, c, facts["hidden_size"], dtype=torch.bfloat16, device="cuda"),
            torch.arange(t, t + c, device="cuda")[None], valid, [k.contiguous() for k in new],
            torch.tensor(0.6), torch.empty(b, c, facts["vocab_size"], device="cuda").exponential_(),
        )  # fmt: skip
        a, e = graphed.denoise_and_sample(*args), eager.denoise_and_sample(*args)
        torch.testing.assert_close(a.argmax, e.argmax)
        torch.testing.assert_close(a.next_self_conditioning, e.next_self_conditioning)
    assert graphed.denoise_graphs.captures == 1
