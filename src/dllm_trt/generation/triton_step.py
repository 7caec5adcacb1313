"""The torch backend on a CUDA GPU, without TensorRT: the step module with its MoE through the Triton
kernels the engine plugin launches, its experts as `optimize` stores them, the denoise step replayed
from a CUDA graph.

* The step is models.diffusion_gemma.Step over transformers' own modules (attention, norms, dense MLP,
  router projection, LM head, self-conditioning), each layer's router and experts replaced by
  `TritonMoE`: transformers' router up to its logits, then kernels.moe_triton.fused_moe, the five
  launches of kernels.moe_launches that the DllmMoE plugin runs (route, bucket, up, down, combine).
* Experts: "float" (the model's dtype, no copy), "fp8" or "nvfp4", made by kernels.expert_formats on the
  GPU, byte for byte what `optimize --precision` stores. Only the experts: the projections stay as the
  checkpoint holds them.
* The KV cache is the loop's StaticKVCache, read by address.
* The denoise step, its sampling head and the next self-conditioning input run as one CUDA graph per
  shape key (the batch, and the cache's length and addresses, which change once per canvas), made by
  generation.cuda_graphs (its own stream, thread-local capture, the eager fallback said on stderr).
  Per-step inputs are copied into the graph's static buffers, its outputs cloned out. The temperature
  enters as its fp32 reciprocal: on CUDA torch divides by a host scalar as a multiplication by its
  reciprocal, which is what the reference's `logits / temperature` computes, and a graph cannot take a
  host scalar (it would bake the first step's in).
The encoder pass runs eagerly: its token count changes, and it runs once per canvas.

On a CPU (the tests) the same step runs with the kernels interpreted by Triton and no graph.
Letters: B batch, C canvas, H hidden, V vocab, N tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from dllm_trt.errors import DllmError
from dllm_trt.generation import cuda_graphs
from dllm_trt.generation.step import DenoiseSample, LogitsStep, TorchStep
from dllm_trt.kernels.expert_formats import StoredExperts, store_experts
from dllm_trt.models.diffusion_gemma import SoftEmbedding, layer_specs
from dllm_trt.models.diffusion_gemma import Step as StepGraph

EXPERT_FORMATS = ("float", "fp8", "nvfp4")


class TritonMoE(nn.Module):
    """Every layer's router and experts through the fused kernels, over experts stored in one format."""

    def __init__(self, layers: nn.ModuleList, weight_format: str, release_from: nn.Module | None = None) -> None:
        """`release_from`: a model whose every reference to a layer's float experts (the decoder's and the
        tied encoder's) is dropped once that layer's are stored in another format, layer by layer, so the
        float and the stored experts are never all in memory at once."""
        super().__init__()
        if weight_format not in EXPERT_FORMATS:
            raise DllmError(f"unknown expert format '{weight_format}'; one of {', '.join(EXPERT_FORMATS)}")
        self.weight_format = weight_format
        self.top_k = layers[0].router.config.top_k_experts
        self.stores: list[StoredExperts] = []
        self.per_expert_scale: list[torch.Tensor] = []  # fp32 once, not a cast per call
        holders: dict[int, list[tuple[nn.Module, str]]] = {}
        if release_from is not None and weight_format != "float":
            for module in release_from.modules():
                for name in ("gate_up_proj", "down_proj"):
                    if isinstance(module._parameters.get(name), torch.Tensor):
                        holders.setdefault(id(module._parameters[name]), []).append((module, name))
        for layer in layers:
            experts = layer.experts
            gate_up, down = experts.gate_up_proj, experts.down_proj
            self.stores.append(store_experts(weight_format, gate_up.detach(), down.detach(), gate_up.dtype))
            self.per_expert_scale.append(layer.router.per_expert_scale.detach().float().contiguous())
            for module, name in holders.get(id(gate_up), []) + holders.get(id(down), []):
                setattr(module, name, None)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores)

    def forward(self, index: int, layer: nn.Module, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        from dllm_trt.kernels.moe_triton import fused_moe

        router = layer.router
        # DiffusionGemmaTextRouter.forward up to its expert scores; the kernels do softmax, top-k,
        # renormalisation and the per-expert scale in fp32, in the reference's order
        logits = router.proj(router.norm(residual) * router.scale * router.scalar_root_size)  # [N, E]
        store = self.stores[index]
        return fused_moe(
            normed, logits.float(), self.per_expert_scale[index], store.gate_up, store.down, self.top_k,
            weight_format=self.weight_format, scales=store.scales,
        )  # fmt: skip


class _CapturedDenoise:
    """The denoise step and sampling head at one shape key: static inputs, one graph, static outputs."""

    def __init__(self, step: TritonStep, inputs: dict[str, torch.Tensor], past: list[torch.Tensor]) -> None:
        self.static = {name: t.clone() for name, t in inputs.items()}
        self.past = past

        def call() -> DenoiseSample:
            return step.sample_eagerly(**self.static, past=self.past)

        cuda_graphs.run_on(step.stream, call)  # warm-up on the capture's stream: kernels compiled, workspaces made
        self.outputs: DenoiseSample | None = None

        def record() -> None:
            self.outputs = call()

        self.graph = cuda_graphs.capture(record, step.stream)
        self.stream = step.stream

    def run(self, inputs: dict[str, torch.Tensor]) -> DenoiseSample:
        for name, tensor in inputs.items():
            self.static[name].copy_(tensor)
        cuda_graphs.replay(self.graph, self.stream)
        out = self.outputs  # overwritten by the next replay: the loop keeps the previous step's
        return DenoiseSample(*(t.clone() for t in (out.sampled, out.argmax, out.entropy, out.next_self_conditioning)))


class TritonStep(TorchStep):
    """TorchStep with the MoE through the fused Triton kernels, and on CUDA the denoise step from a graph."""

    def __init__(
        self, model, weight_format: str = "float", cuda_graphs: bool = True, layers: int | None = None,
        release_float: bool = False, experts: TritonMoE | None = None, images: bool = False,
    ) -> None:  # noqa: ANN001  # fmt: skip
        """`layers`: the first layers only (a bench's per-layer cost); `release_float`: drop the model's float
        experts once stored in another format; `experts`: stored experts to share with another step; `images`:
        the checkpoint has a vision tower (TorchStep's image path, through transformers' own tower)."""
        from dllm_trt.generation.step import StepInfo
        from dllm_trt.kernels.moe_triton import triton_available

        if not triton_available():
            raise DllmError("the torch backend on CUDA runs the MoE through Triton: pip install 'dllm-trt[triton]'")
        decoder_layers = model.model.decoder.layers
        if layers is not None:
            decoder_layers = nn.ModuleList(list(decoder_layers)[:layers])
        if experts is None:
            experts = TritonMoE(decoder_layers, weight_format, model if release_float else None)
        self.moe = experts
        self.model, self.images = model, images
        if self.moe.weight_format != weight_format or len(self.moe.stores) < len(decoder_layers):
            raise ValueError(f"the shared experts are {self.moe.weight_format} for {len(self.moe.stores)} layers")
        self.step = StepGraph(model, dense_moe=False, moe=self.moe, layers=layers)
        self.specs = layer_specs(model)[: len(decoder_layers)]
        self.info = StepInfo.from_model(model)
        self.soft = SoftEmbedding(model)
        self.graphs = cuda_graphs and model.device.type == "cuda"
        self.stream = torch.cuda.Stream(device=model.device) if self.graphs else None
        self.captured: _CapturedDenoise | None = None
        self.key: tuple | None = None
        self.captures = 0
        self.execution = f"torch on {model.device.type}, MoE through Triton ({weight_format} experts)" + (
            ", denoise step from a CUDA graph" if self.graphs else ""
        )

    @torch.no_grad()
    def sample_eagerly(self, canvas_ids, self_conditioning, position_ids, cache_mask, inverse_temperature, noise,
                       past) -> DenoiseSample:  # noqa: ANN001  # fmt: skip
        """LogitsStep.denoise_and_sample with the temperature as a device-side reciprocal (module docstring)."""
        logits = self.denoise(canvas_ids, self_conditioning, position_ids, cache_mask, past)
        processed = logits * inverse_temperature  # [B, C, V]
        return self.head(processed, noise)

    def head(self, processed: torch.Tensor, noise: torch.Tensor) -> DenoiseSample:
        from dllm_trt.generation.sampler import sampling_head

        out = sampling_head(processed, noise)
        return DenoiseSample(out.sampled, out.argmax, out.entropy, self.soft_embedding(processed.to(self.info.dtype)))

    @torch.no_grad()
    def denoise_and_sample(self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise):  # noqa: ANN001, ANN201
        if not self.graphs:
            return LogitsStep.denoise_and_sample(
                self, canvas_ids, self_conditioning, position_ids, cache_mask, past, temperature, noise
            )
        device = canvas_ids.device
        inverse = torch.tensor(1.0 / float(temperature), dtype=torch.float32).to(device, non_blocking=True)
        inputs = dict(
            canvas_ids=canvas_ids, self_conditioning=self_conditioning.to(self.info.dtype), position_ids=position_ids,
            cache_mask=cache_mask, inverse_temperature=inverse, noise=noise,
        )  # fmt: skip
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        key += tuple((tuple(t.shape), t.data_ptr()) for t in past)
        if key != self.key:
            self.captured, self.key = None, None  # the cache only grows: an old graph never comes back
            try:
                self.captured = _CapturedDenoise(self, inputs, past)
            except RuntimeError as exc:
                self.graphs = False
                cuda_graphs.eager_fallback("the torch step", str(exc).splitlines()[0] if str(exc) else repr(exc))
                return self.denoise_and_sample(canvas_ids, self_conditioning, position_ids, cache_mask, past,
                                               temperature, noise)  # fmt: skip
            self.key = key
            self.captures += 1
        return self.captured.run(inputs)
