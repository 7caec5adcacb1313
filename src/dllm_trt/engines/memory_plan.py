"""`dllm-trt plan`: what an engine of a model needs on a GPU, before anything is exported or built.

`run(PlanOptions) -> MemoryPlan`. The model comes from a checkpoint's config.json, an artifact
directory's manifest, or a preset name (`released` is the 26B-A4B config, vision tower included);
nothing is loaded: the weights are counted on transformers' model built on the meta device, through
the step module the graph is exported from (models.diffusion_gemma.Step), so the count is what the
engine holds, and where the model has a vision tower through the vision module its engine is built
from (models.vision.VisionEncoder: category "vision", kept bf16 in every precision).

Per precision, batch and context it gives three terms, and which GPU presets they fit:

* weights: one copy (the step engine serves both phases). Precision rules (QUANTIZED_BYTES):
  bf16 everything; fp8 e4m3 experts and attention / dense-MLP projections with an fp32 scale per
  output channel; nvfp4 experts as e2m1 with an fp8 scale per 16 values and an fp32 scale per
  expert, the projections in fp8. The embedding (tied with the LM head), the router and the norms
  stay bf16 in every precision, as the reference keeps them.
* KV cache: bf16, K and V of every layer; a sliding layer holds at most sliding_window - 1
  positions (the runtime's cache), a full layer the whole context.
* activations: the larger of the two phases, one layer live at a time. The canvas phase (a denoise
  step over the canvas): the sampling noise input and three [B, C, V] fp32 tensors of the sampling
  head, the MoE plugin's workspace (kernels.moe_launches.workspace_layout), ten hidden-sized
  tensors, the additive attention masks [B, 1, T, P + T] the graph builds once per layer type (what
  TensorRT materialises for its attention layers and the plugin's), the live layer's K/V concatenation
  [B, G, P + T, D] (kept outside the attention node), and for attention with no fused TensorRT kernel
  for its head size (trt.support: head 512 in bf16) the DllmAttention plugin's workspace
  (kernels.attention_launches.workspace_bytes, what the plugin asks TensorRT for): it never writes the
  scores. The prompt phase is the same for each pass generate makes of a prompt filling the context
  (generation.prompt_chunks, passes of `prompt_chunk` tokens, each over the cache of the earlier ones),
  without the sampling head.

A plan fits a GPU when the sum stays within 90% of its memory (the rest: CUDA context, the
runtime's own buffers, fragmentation) and the GPU runs the precision (RUNS_FROM: fp8 needs SM89 or
newer, TensorRT for RTX builds no fp8 for SM86; nvfp4 runs natively on SM100/SM12x and dequantized
inside the MoE kernels on SM90). These are estimates from the config, not measurements:
TensorRT reports an engine's activation memory only where it can deserialize it, on the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dllm_trt.errors import DllmError
from dllm_trt.generation.prompt_chunks import DEFAULT_PROMPT_CHUNK, largest_passes
from dllm_trt.trt.gpu_presets import PRESETS

PRECISIONS = ("bf16", "fp8", "nvfp4")
BATCHES = (1, 8)
CONTEXTS = (4096, 32768, 262144)
FIT_SHARE = 0.9  # of a GPU's memory; the same margin build's dry run warns at
GB = 1e9

# Bytes per value and the scales that come with it: (bytes per value, values per scale, scale bytes);
# nvfp4 adds one fp32 scale per expert (or per tensor) on top, counted in weight_bytes.
QUANTIZED_BYTES = {"bf16": (2.0, 0, 0), "fp8": (1.0, 0, 4), "nvfp4": (0.5, 16, 1)}
KEPT_IN_BF16 = ("embedding", "router", "norms", "vision")  # what no precision quantizes
# Activations and the KV cache stay in the graph's float type; quantized precisions compute in bf16.
ACTIVATION_TYPE = {"fp32": ("FP32", 4), "fp16": ("FP16", 2), "bf16": ("BF16", 2), "fp8": ("BF16", 2),
                   "nvfp4": ("BF16", 2)}  # fmt: skip
RUNS_FROM = {"bf16": (8, 0), "fp8": (8, 9), "nvfp4": (9, 0)}  # the oldest compute capability per precision


@dataclass(frozen=True)
class PlanOptions:
    source: str  # a checkpoint or artifact directory, or a preset name ("released", "small", ...)
    precisions: tuple[str, ...] = PRECISIONS
    batches: tuple[int, ...] = BATCHES
    contexts: tuple[int, ...] = CONTEXTS
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK  # tokens per prompt pass: generate's rule (generation.prompt_chunks)
    gpus: tuple[str, ...] = tuple(PRESETS)


@dataclass
class MemoryPlan:
    model: str
    parameters: dict[str, int]  # category -> parameter count of the step module
    weights: dict[str, int]  # precision -> bytes
    rows: list[dict] = field(default_factory=list)  # one per (precision, batch, context)
    gpus: dict[str, int] = field(default_factory=dict)  # preset -> memory in GiB (trt.gpu_presets)
    notes: list[str] = field(default_factory=list)

    def fits(self, row: dict) -> list[str]:
        return [
            name
            for name, gib in self.gpus.items()
            if row["total"] <= FIT_SHARE * gib * 2**30
            and PRESETS[name].compute_capability >= RUNS_FROM[row["precision"]]
        ]

    def table(self) -> str:
        total = sum(self.parameters.values())
        step = total - self.parameters.get("vision", 0)
        share = self.parameters.get("experts", 0) / max(step, 1)
        vision = self.parameters.get("vision")
        tower = f" and {vision / 1e9:.2f} G in the vision engine" if vision else ""
        lines = [
            f"memory plan for {self.model}: {step / 1e9:.2f} G parameters in the step engine "
            f"({share:.1%} experts), one copy for both phases{tower}",
            "weights: " + ", ".join(f"{p} {self.weights[p] / GB:.1f} GB" for p in self.weights),
            "",
            "| precision | batch | context | weights GB | KV cache GB | activations GB | total GB | fits "
            f"(<= {FIT_SHARE:.0%} of memory) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in self.rows:
            fits = ", ".join(self.fits(row)) or "none"
            lines.append(
                f"| {row['precision']} | {row['batch']} | {_k(row['context'])} | {row['weights'] / GB:.1f} | "
                f"{row['kv_cache'] / GB:.1f} | {row['activations'] / GB:.1f} | {row['total'] / GB:.1f} | {fits} |"
            )
        lines += ["", "GPUs (GiB): " + ", ".join(f"{n} {gib}" for n, gib in self.gpus.items()), *self.notes]
        return "\n".join(lines)


def _k(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def load_config(source: str):  # noqa: ANN201 (DiffusionGemmaConfig)
    """(name, config) from a preset name, a checkpoint directory or an artifact directory."""
    name, config, _ = load_model_source(source)
    return name, config


def load_model_source(source: str):  # noqa: ANN201
    """(name, config, whether the model has a vision tower) of a preset, checkpoint or artifact directory."""
    from transformers import DiffusionGemmaConfig

    from dllm_trt.models.presets import PRESETS as MODEL_PRESETS
    from dllm_trt.models.presets import TEXT_ONLY_VISION, build_config, has_tower

    if source == "released":
        return "the released 26B-A4B config", build_config("full-width-vision", num_layers=30), True
    if source in MODEL_PRESETS:
        return f"the {source} preset", build_config(source), has_tower(source)
    path = Path(source)
    if (path / "config.json").is_file():
        from dllm_trt.models.checkpoint import read_config, safetensors_files, tensor_index
        from dllm_trt.models.vision import has_vision_tower

        tower = has_vision_tower(tensor_index(safetensors_files(path)))
        return str(path), read_config(path), tower
    if (path / "manifest.json").is_file():
        model = json.loads((path / "manifest.json").read_text()).get("model", {})
        if "text_config" not in model:
            raise DllmError(f"{path}/manifest.json carries no text_config; re-export it with this dllm-trt")
        vision = (model.get("vision") or {}).get("config")
        config = DiffusionGemmaConfig(text_config=model["text_config"], canvas_length=model["canvas_length"],
                                      vision_config=vision or TEXT_ONLY_VISION)  # fmt: skip
        return str(path), config, vision is not None
    choices = ", ".join(["released", *MODEL_PRESETS])
    raise DllmError(f"{source}: neither a checkpoint (config.json), an artifact directory (manifest.json) "
                    f"nor a preset ({choices})")  # fmt: skip


def _category(name: str, ndim: int) -> str:
    if ".experts." in name:
        return "experts"
    if "embed_tokens" in name or name.startswith("lm_head"):
        return "embedding"
    if ".router." in name:
        return "router"
    return "projections" if ndim >= 2 else "norms"


def meta_model(config):  # noqa: ANN001, ANN201 (DiffusionGemmaForBlockDiffusion)
    """transformers' model on the meta device: every shape, no memory."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    with torch.device("meta"):
        return DiffusionGemmaForBlockDiffusion(config)


def count_parameters(model, tower: bool = False) -> tuple[dict[str, int], dict[str, list[tuple[int, ...]]]]:  # noqa: ANN001
    """Parameter count and shapes per category of the step module (what the step graph holds), and of the
    vision module with `tower` (what its graphs hold, once whatever their count)."""
    from dllm_trt.models.diffusion_gemma import Step
    from dllm_trt.models.vision import VisionEncoder

    counts: dict[str, int] = {}
    shapes: dict[str, list[tuple[int, ...]]] = {}
    named = [*Step(model).named_parameters()]  # tied tensors once
    if tower:
        named += [(f"vision.{n}", p) for n, p in VisionEncoder(model).named_parameters()]
    for name, parameter in named:
        category = "vision" if name.startswith("vision.") else _category(name, parameter.dim())
        counts[category] = counts.get(category, 0) + parameter.numel()
        shapes.setdefault(category, []).append(tuple(parameter.shape))
    return counts, shapes


def weight_bytes(shapes: dict[str, list[tuple[int, ...]]], precision: str) -> int:
    """Bytes of the weights in `precision` (QUANTIZED_BYTES, KEPT_IN_BF16)."""
    total = 0.0
    for category, tensors in shapes.items():
        for shape in tensors:
            numel = 1
            for dim in shape:
                numel *= dim
            if category in KEPT_IN_BF16 or precision == "bf16":
                total += 2 * numel
                continue
            if precision == "nvfp4" and category != "experts":
                per_value, per_scale, scale_bytes = QUANTIZED_BYTES["fp8"]
            else:
                per_value, per_scale, scale_bytes = QUANTIZED_BYTES[precision]
            total += per_value * numel
            if per_scale:  # block scales along the reduction axis, plus one fp32 scale per expert
                total += numel / per_scale * scale_bytes + 4 * (shape[0] if len(shape) == 3 else 1)
            else:  # one scale per output channel
                total += numel / shape[-1] * scale_bytes
    return int(total)


def kv_cache_bytes(model, batch: int, context: int, precision: str = "bf16", sliding: int | None = None) -> int:  # noqa: ANN001
    """K and V of every layer in the graph's float type; a sliding layer keeps `sliding` positions, by
    default as many as the runtime keeps (sliding_window - 1, or the whole context when shorter)."""
    from dllm_trt.models.diffusion_gemma import layer_specs

    if sliding is None:
        sliding = min(context, model.config.text_config.sliding_window - 1)
    element_bytes = ACTIVATION_TYPE[precision][1]
    return sum(
        2 * batch * spec.num_kv_heads * spec.head_dim * element_bytes * (sliding if spec.sliding else context)
        for spec in layer_specs(model)
    )


def activation_bytes(model, batch: int, context: int, prompt_chunk: int, precision: str = "bf16") -> int:  # noqa: ANN001
    """The larger phase's working memory (module docstring)."""
    from dllm_trt.kernels.attention_launches import AttentionShape, workspace_bytes
    from dllm_trt.kernels.moe_launches import MoEShape, workspace_layout
    from dllm_trt.models.diffusion_gemma import layer_specs
    from dllm_trt.trt.support import fuses_attention

    config = model.config
    text = config.text_config
    attention_type, element_bytes = ACTIVATION_TYPE[precision]
    dtype = precision if precision in ("fp32", "fp16") else "bf16"
    canvas, hidden, vocab, window = config.canvas_length, text.hidden_size, text.vocab_size, text.sliding_window
    heads = text.num_attention_heads
    moe = MoEShape(dtype, text.num_experts, hidden, text.moe_intermediate_size, text.top_k_experts)
    specs = layer_specs(model)
    width = max(hidden, heads * max(s.head_dim for s in specs), 2 * text.intermediate_size)
    plugin = max(
        (workspace_bytes(AttentionShape(dtype, heads, s.num_kv_heads, s.head_dim)) for s in specs
         if not fuses_attention(attention_type, s.head_dim)),
        default=0,
    )  # fmt: skip

    def phase(tokens: int, cached: int, rows: int) -> int:
        keys = {True: min(cached, window - 1) + tokens, False: cached + tokens}  # per layer type: sliding or not
        masks = sum(element_bytes * batch * tokens * keys[sliding] for sliding in {s.sliding for s in specs})
        concat = max(2 * element_bytes * batch * s.num_kv_heads * keys[s.sliding] * s.head_dim for s in specs)
        head = 4 * 4 * batch * rows * vocab  # the noise input, the logits and two more of the sampling head
        hidden_states = 10 * element_bytes * batch * tokens * width
        return plugin + masks + concat + head + workspace_layout(moe, batch * tokens)[1] + hidden_states

    # the prompt fills the context, in the passes generate makes of it
    prompt = max(phase(tokens, cached, 0) for tokens, cached in largest_passes(context, prompt_chunk).items())
    return max(phase(canvas, max(context - canvas, 0), canvas), prompt)


def attention_note(model, prompt_chunk: int) -> str | None:  # noqa: ANN001
    """What the plan says about attention without a fused TensorRT kernel, if the model has any."""
    from dllm_trt.kernels.attention_launches import AttentionShape, workspace_bytes
    from dllm_trt.models.diffusion_gemma import layer_specs
    from dllm_trt.trt.support import fuses_attention

    heads = model.config.text_config.num_attention_heads
    unfused = {(s.head_dim, s.num_kv_heads) for s in layer_specs(model) if not fuses_attention("BF16", s.head_dim)}
    if not unfused:
        return None
    sizes = ", ".join(f"{d} ({heads}:{g} heads)" for d, g in sorted(unfused))
    workspace = max(workspace_bytes(AttentionShape("bf16", heads, g, d)) for d, g in unfused)
    return (
        f"Attention of head size {sizes} has no fused TensorRT kernel in bf16: it runs in the DllmAttention plugin "
        f"(optimize --target trt), which never writes its scores to memory; counted is its workspace, "
        f"{workspace / 1e6:.1f} MB, whatever the context. Prompt passes of {prompt_chunk} tokens (--prompt-chunk, "
        "generate's rule): the masks and the MoE's intermediates grow with a pass's tokens."
    )


def run(options: PlanOptions) -> MemoryPlan:
    """The plan for every precision x batch x context asked for."""
    unknown = [p for p in options.precisions if p not in PRECISIONS]
    if unknown:
        raise DllmError(f"--precisions {unknown[0]}: the plan knows {', '.join(PRECISIONS)}")
    for name in options.gpus:
        if name not in PRESETS:
            raise DllmError(f"unknown GPU preset '{name}'; choose among: {', '.join(PRESETS)}")
    if min(options.batches, default=1) < 1 or min(options.contexts, default=1) < 1 or options.prompt_chunk < 1:
        raise DllmError("batches, contexts and the prompt chunk are positive integers")
    name, config, tower = load_model_source(options.source)
    model = meta_model(config)
    counts, shapes = count_parameters(model, tower)
    weights = {p: weight_bytes(shapes, p) for p in options.precisions}
    plan = MemoryPlan(name, counts, weights, gpus={g: PRESETS[g].memory_gib for g in options.gpus})
    note = attention_note(model, options.prompt_chunk)
    if note:
        plan.notes.append(note)
    if tower:
        plan.notes.append(
            f"The vision tower ({counts['vision'] / 1e9:.2f} G parameters, bf16 in every precision) is counted in "
            "the weights: its engine (vision.engine) holds it beside the step engine. Its activations, one image "
            "call at a time before the prompt pass, are not in the table."
        )
    for precision in options.precisions:
        for batch in options.batches:
            for context in options.contexts:
                kv = kv_cache_bytes(model, batch, context, precision)
                act = activation_bytes(model, batch, context, options.prompt_chunk, precision)
                plan.rows.append(dict(
                    precision=precision, batch=batch, context=context, weights=weights[precision], kv_cache=kv,
                    activations=act, total=weights[precision] + kv + act,
                ))  # fmt: skip
    return plan
