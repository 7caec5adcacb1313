"""The whole step on one CUDA GPU at the released widths, random weights: the torch backend's CUDA step
(generation.triton_step: transformers' modules, the MoE through the Triton kernels the engine plugin
launches, the denoise step from a CUDA graph) with bf16, fp8 and nvfp4 experts, against transformers on
the same GPU and against the byte floor.

    PYTHONPATH=src python bench/bench_cuda_step.py --json step.json    # a GPU: as many layers as fit, up to 30
    PYTHONPATH=src python bench/bench_cuda_step.py --preflight         # every code path, tiny preset, on CPU

The model is the `full-width` preset (models.presets: the released widths) with as many layers as fit in
the GPU's memory beside its quantized experts and a batch-8 step (30 on an 80 GB card), built in GPU
memory with random weights (no checkpoint). Per expert format and batch (1 and 8), after a prompt of
--prompt tokens is encoded:
* denoise_ms: one denoise step as the loop calls it (per-step inputs copied into the CUDA graph, the graph
  replayed, its outputs copied out: the step, the sampling head, the next self-conditioning input);
  graph_ms: the replay alone; encode_ms: one encoder pass over a canvas (eager, the commit);
* per layer and scaled to the released 30 layers: the same step over the first layer only gives the
  cost of what is not a layer (rest = T_1 - per_layer, per_layer = (T_L - T_1) / (L - 1));
* tok/s at 16 denoise steps per canvas: B * canvas / (16 * denoise + encode);
* the floor: the bytes one denoise step must read (every weight the step reads, experts as stored, the
  embedding twice: LM head and next self-conditioning; and the KV cache) over the GPU's bandwidth;
* transformers: its own decoder forward and encoder pass (parity.reference: the calls its generate()
  makes), bf16, its default experts implementation; its decoder step excludes the sampling head and
  computes the self-conditioning embedding of the previous step's logits instead of the next one.
Medians of CUDA-event times. `--json` writes every row with the GPU's name.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--preflight" in sys.argv:  # before anything imports triton: the kernels run on the CPU, interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe_kernel import peak_bandwidth  # noqa: E402

STEPS_PER_CANVAS = 16
RELEASED_LAYERS = 30
FORMATS = ("float", "fp8", "nvfp4")  # float: the model's dtype (bf16)
# DESIGN.md's floors for the released model (30 layers, batch 1), ms a step: for the reader's comparison
DESIGN_FLOOR_MS = {"H100": {"float": 15.5, "fp8": 8.2, "nvfp4": 5.5}, "H200": {"float": 10.8, "fp8": 5.7, "nvfp4": 3.8}}


def timed(fn, args, setup=None) -> float:  # noqa: ANN001
    """Median ms of fn() over args.iters calls after args.warmup (CUDA events on a GPU); setup() runs before
    each call, outside the timing."""
    cuda, warmup, iters = args.device == "cuda", args.warmup, args.iters
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(iters):
        if setup:
            setup()
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - started))
    return statistics.median(samples)


def layer_bytes(config, dtype_bytes: int = 2) -> list[tuple[int, int]]:  # noqa: ANN001
    """(bytes of each layer's weights, of its experts) for a config, counted on transformers' meta model."""
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    out = []
    for layer in model.model.decoder.layers:
        experts = sum(p.numel() for p in layer.experts.parameters()) * dtype_bytes
        out.append((sum(p.numel() for p in layer.parameters()) * dtype_bytes, experts))
    return out


def layers_that_fit(preset: str, free: int, canvas: int, vocab: int, batch: int) -> int:
    """How many layers fit: the bf16 model beside its fp8 and nvfp4 experts while they are made (the bf16
    experts are released layer by layer as the nvfp4 ones are made), and beside a batch-`batch` step."""
    from dllm_trt.models.presets import build_config

    per_layer = layer_bytes(build_config(preset, RELEASED_LAYERS))
    embedding = vocab * build_config(preset).text_config.hidden_size * 2
    activations = 9 * batch * canvas * vocab * 4 + (2 << 30)  # logits, softmax, entropy, noise, fp32 [B, C, V] each
    fits = 0
    for count in range(1, RELEASED_LAYERS + 1):
        weights = sum(w for w, _ in per_layer[:count])
        fp8_experts = sum(e for _, e in per_layer[:count]) * 0.52  # e4m3 values and their channel scales
        if max(weights + fp8_experts, weights + activations) + embedding + (1 << 30) > free:
            break
        fits = count
    return fits


class Case:
    """One batch's inputs: a random prompt (encoded into the step's cache when `encode`), a canvas to denoise
    and to commit."""

    def __init__(self, step, batch: int, prompt: int, device: str, seed: int, encode: bool = True) -> None:  # noqa: ANN001
        from dllm_trt.generation.kv_cache import StaticKVCache

        info = step.info
        gen = torch.Generator(device=device).manual_seed(seed)
        canvas = info.canvas_length
        self.batch, self.canvas = batch, canvas
        self.prompt_ids = torch.randint(0, info.vocab_size, (batch, prompt), device=device, generator=gen)
        self.canvas_ids = torch.randint(0, info.vocab_size, (batch, canvas), device=device, generator=gen)
        self.canvas_positions = torch.arange(prompt, prompt + canvas, device=device).expand(batch, -1).contiguous()
        self.self_conditioning = torch.randn(batch, canvas, info.hidden_size, device=device, generator=gen).to(
            info.dtype
        )
        self.noise = torch.empty(batch * canvas, info.vocab_size, device=device).exponential_(generator=gen)
        self.past: list[torch.Tensor] = []
        if encode:
            cache = StaticKVCache(step.specs, batch, prompt + canvas, info.sliding_window, info.dtype, device)
            valid = torch.ones(batch, prompt, dtype=torch.bool, device=device)
            positions = torch.arange(prompt, device=device).expand(batch, -1).contiguous()
            cache.append(step.encode(self.prompt_ids, positions, valid, cache.mask(), cache.tensors()), valid)
            self.cache_mask, self.past = cache.mask(), cache.tensors()

    def first_layers(self, count: int) -> Case:
        """The same inputs for a step over the first `count` layers: their part of the cache."""
        other = copy.copy(self)
        other.past = self.past[: 2 * count]
        return other

    @property
    def denoise_args(self) -> tuple:
        return (self.canvas_ids, self.self_conditioning, self.canvas_positions, self.cache_mask, self.past,
                torch.tensor(0.6), self.noise)  # fmt: skip

    @property
    def encode_args(self) -> tuple:
        valid = torch.ones(self.canvas_ids.shape, dtype=torch.bool, device=self.canvas_ids.device)
        return self.canvas_ids, self.canvas_positions, valid, self.cache_mask, self.past

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.past)

    @staticmethod
    def cache_bytes_for(step, batch: int, prompt: int) -> int:  # noqa: ANN001
        """The KV cache a denoise step reads after `prompt` tokens (sliding layers hold window - 1 at most)."""
        window = step.info.sliding_window - 1
        return step.info.dtype.itemsize * sum(
            2 * batch * s.num_kv_heads * (min(prompt, window) if s.sliding else prompt) * s.head_dim for s in step.specs
        )


def step_weight_bytes(step) -> int:  # noqa: ANN001
    """Bytes of weights one denoise step reads: every parameter of the step module but the experts, the
    experts as stored, and the embedding once more (the next self-conditioning input reads it again)."""
    module = step.step
    seen, total = set(), 0
    for name, param in module.named_parameters():
        if ".experts." not in name and id(param) not in seen:
            seen.add(id(param))
            total += param.numel() * param.element_size()
    experts = sum(store.nbytes for store in step.moe.stores[: len(module.layers)])
    embedding = module.embed_tokens.weight
    return total + experts + embedding.numel() * embedding.element_size()


def measure_ours(step, case: Case, args) -> dict:  # noqa: ANN001
    denoise = timed(lambda: step.denoise_and_sample(*case.denoise_args), args)  # the first warm-up captures
    graph = None
    if getattr(step, "captured", None) is not None:
        from dllm_trt.generation import cuda_graphs

        captured = step.captured
        graph = timed(lambda: cuda_graphs.replay(captured.graph, captured.stream), args)
    encode = timed(lambda: step.encode(*case.encode_args), args)
    step.captured, step.key = None, None  # the graph's memory goes before the next case
    return dict(denoise_ms=denoise, graph_ms=graph, encode_ms=encode)


def measure_transformers(model, case: Case, args) -> dict:  # noqa: ANN001
    from dllm_trt.parity.reference import new_cache, reference_denoise, reference_encode

    batch, canvas = case.batch, case.canvas
    device = case.canvas_ids.device
    cache = new_cache(model)
    prompt_valid = torch.ones(case.prompt_ids.shape, dtype=torch.bool, device=device)
    positions = torch.arange(case.prompt_ids.shape[1], device=device).expand(batch, -1)
    reference_encode(model, cache, case.prompt_ids, prompt_valid, positions)
    vocab = model.config.text_config.vocab_size
    holder = dict(logits=torch.randn(batch, canvas, vocab, device=device).to(model.dtype))  # the last step's
    denoise = timed(lambda: reference_denoise(model, cache, case.canvas_ids, holder["logits"], prompt_valid,
                                              case.canvas_positions), args)  # fmt: skip
    del holder["logits"]
    history = torch.ones(batch, prompt_valid.shape[1] + canvas, dtype=torch.bool, device=device)

    def fresh() -> None:  # the encoder appends to its cache: each timed call gets a copy of the prompt's
        holder["cache"] = copy.deepcopy(cache)

    encode = timed(lambda: reference_encode(model, holder["cache"], case.canvas_ids, history, case.canvas_positions),
                   args, setup=fresh)  # fmt: skip
    return dict(denoise_ms=denoise, graph_ms=None, encode_ms=encode)


def tokens_per_second(batch: int, canvas: int, denoise_ms: float, encode_ms: float) -> float:
    return batch * canvas / (STEPS_PER_CANVAS * denoise_ms + encode_ms) * 1e3


def scaled(full: dict, one: dict, layers: int) -> dict:
    """Per layer and at the released 30 layers, from the step over all `layers` and over the first one."""
    out = {}
    for key in ("denoise_ms", "encode_ms"):
        per_layer = (full[key] - one[key]) / (layers - 1)
        out[f"{key}_per_layer"] = per_layer
        out[f"{key}_rest"] = one[key] - per_layer
        out[f"{key}_at_30"] = one[key] - per_layer + RELEASED_LAYERS * per_layer
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preflight", action="store_true", help="every code path at the tiny preset, on CPU")
    parser.add_argument("--layers", type=int, help="default: as many as fit, at most 30")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens encoded before the canvas")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if set(formats) - set(FORMATS):
        print(f"--formats: choose from {', '.join(FORMATS)}")
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    if args.preflight:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "--preflight runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1 before Python starts"
            )
            return 2
        preset, device, layers, args.prompt, args.warmup, args.iters = "tiny", "cpu", 2, 8, 0, 1
        dtype = torch.float32  # the interpreter's bf16 is slower still; the code paths are the same
        batches = [min(b, 2) for b in batches]
        gpu, peak, peak_label = "CPU (preflight)", 1e11, "an assumed 100 GB/s"
    else:
        if not torch.cuda.is_available():
            print("bench_cuda_step.py needs a CUDA GPU (or --preflight); torch sees none.")
            return 2
        preset, device, dtype = "full-width", "cuda", torch.bfloat16
        gpu = torch.cuda.get_device_name()
        peak, peak_label = peak_bandwidth(gpu)
        free = torch.cuda.mem_get_info()[0]
        layers = args.layers or layers_that_fit(preset, free, 256, 262_144, max(batches))
        if layers < 2:
            print(f"{gpu}: {free / 2**30:.1f} GiB free holds fewer than 2 full-width layers; nothing to measure")
            return 2
    args.device = device
    from dllm_trt.generation.triton_step import TritonMoE, TritonStep
    from dllm_trt.models.presets import build_random_model

    started = time.perf_counter()
    model = build_random_model(preset, layers, device, seed=0, dtype=dtype)
    built = time.perf_counter() - started
    what = f"{preset} preset, {layers} layers (random, {str(dtype).removeprefix('torch.')})"
    print(f"{gpu}; torch {torch.__version__}; floor at {peak_label}; {what} built in {built:.1f} s; "
          f"prompt {args.prompt} tokens")  # fmt: skip
    graphs = device == "cuda"
    rows: list[dict] = []

    def write() -> None:
        if args.json:
            report = dict(gpu=gpu, torch=torch.__version__, peak_bytes_per_s=peak, preset=preset, layers=layers,
                          prompt=args.prompt, rows=rows)  # fmt: skip
            args.json.write_text(json.dumps(report, indent=1))

    def record(impl: str, fmt: str, batch: int, result: dict, weights: int, cache: int, extra: dict) -> None:
        floor_ms = (weights + cache) / peak * 1e3
        canvas = model.config.canvas_length
        tok_s = tokens_per_second(batch, canvas, result["denoise_ms"], result["encode_ms"])
        row = dict(impl=impl, experts=fmt, batch=batch, layers=layers, **result, weight_bytes=weights,
                   cache_bytes=cache, floor_ms=floor_ms, x_floor=result["denoise_ms"] / floor_ms, tok_s=tok_s,
                   **extra)  # fmt: skip
        if "denoise_ms_at_30" in extra:
            at_30 = extra["denoise_ms_at_30"], extra["encode_ms_at_30"]
            row["tok_s_at_30"] = tokens_per_second(batch, canvas, *at_30)
        rows.append(row)
        write()  # after every row: a deadline that cuts the run keeps what it measured
        graph = f"{row['graph_ms']:9.2f}" if row.get("graph_ms") is not None else f"{'n/a':>9}"
        at_30 = f"{row['denoise_ms_at_30']:9.2f}" if "denoise_ms_at_30" in row else f"{'n/a':>9}"
        print(f"{impl:>12} {fmt:>6} {batch:>3} {row['denoise_ms']:10.2f} {graph} {row['encode_ms']:9.2f} {at_30} "
              f"{floor_ms:8.2f} {row['x_floor']:7.2f}x {row['tok_s']:9.1f}")  # fmt: skip

    print(f"{'impl':>12} {'experts':>6} {'B':>3} {'denoise_ms':>10} {'graph_ms':>9} {'encode_ms':>9} "
          f"{'step@30':>9} {'floor_ms':>8} {'x_floor':>8} {'tok/s':>9}")  # fmt: skip
    if not args.no_transformers:
        probe = TritonStep(model, "float", cuda_graphs=False)  # the same inputs and byte count as ours
        for batch in batches:
            try:
                case = Case(probe, batch, args.prompt, device, seed=batch, encode=False)
                result = measure_transformers(model, case, args)
                cache = Case.cache_bytes_for(probe, batch, args.prompt)
                record("transformers", "float", batch, result, step_weight_bytes(probe), cache, {})
            except Exception as exc:  # a transformers that cannot run here must not cost the rest
                print(f"transformers at batch {batch} failed: {type(exc).__name__}: {exc}")
                rows.append(dict(impl="transformers", batch=batch, error=f"{type(exc).__name__}: {exc}"))
                write()
            case = None
            _release(device)
        del probe

    def measure(fmt: str, experts: TritonMoE) -> None:
        full = TritonStep(model, fmt, cuda_graphs=graphs, experts=experts)
        one = TritonStep(model, fmt, cuda_graphs=graphs, layers=1, experts=experts)
        for batch in batches:
            case = Case(full, batch, args.prompt, device, seed=batch)
            result = measure_ours(full, case, args)
            one_result = measure_ours(one, case.first_layers(1), args)
            record("triton_step", fmt, batch, result, step_weight_bytes(full), case.cache_bytes,
                   scaled(result, one_result, layers))  # fmt: skip
            del case
            _release(device)

    if "float" in formats:  # first: the bf16 experts are released once the quantized ones are made
        measure("float", TritonMoE(model.model.decoder.layers, "float"))
        _release(device)
    quantized = [fmt for fmt in formats if fmt != "float"]
    # every quantized format is made before any is timed, the bf16 experts released layer by layer as the last
    # is made: so each format's batch-8 step fits beside the weights (layers_that_fit)
    stores = {fmt: TritonMoE(model.model.decoder.layers, fmt, model if fmt == quantized[-1] else None)
              for fmt in quantized}  # fmt: skip
    _release(device)
    for fmt in quantized:
        measure(fmt, stores.pop(fmt))
        _release(device)
    _summary(rows, gpu, layers)
    write()
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _release(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _summary(rows: list[dict], gpu: str, layers: int) -> None:
    """Ratios the issue asks for: to transformers at the same batch, to the floor, to the bf16 experts."""
    ours = {(r["experts"], r["batch"]): r for r in rows if r.get("impl") == "triton_step"}
    theirs = {r["batch"]: r for r in rows if r.get("impl") == "transformers" and "error" not in r}
    design = next((v for k, v in DESIGN_FLOOR_MS.items() if k in gpu), None)
    for (fmt, batch), row in sorted(ours.items(), key=lambda item: (item[0][1], item[0][0])):
        parts = [f"{fmt:>6} B={batch}: {row['denoise_ms']:.2f} ms/step at {layers} layers"]
        if batch in theirs:
            parts.append(f"{theirs[batch]['denoise_ms'] / row['denoise_ms']:.2f}x transformers' speed")
        if (fmt != "float") and ("float", batch) in ours:
            bf16 = ours[("float", batch)]
            bytes_ratio = (bf16["weight_bytes"] + bf16["cache_bytes"]) / (row["weight_bytes"] + row["cache_bytes"])
            parts.append(f"{bf16['denoise_ms'] / row['denoise_ms']:.2f}x the bf16 experts' speed (bytes: "
                         f"{bytes_ratio:.2f}x fewer)")  # fmt: skip
        if "denoise_ms_at_30" in row:
            parts.append(f"at 30 layers {row['denoise_ms_at_30']:.2f} ms, {row['tok_s_at_30']:.0f} tok/s")
            if design and batch == 1:
                parts.append(f"{row['denoise_ms_at_30'] / design[fmt]:.2f}x DESIGN.md's floor")
        print("; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
