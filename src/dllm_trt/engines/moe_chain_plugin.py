"""The MoE as a chain of single-kernel TensorRT AOT plugins: what `build` lowers each DllmMoE node into.

Why a chain: an AOT Quick Deployable Plugin is exactly one kernel launch (engines.moe_plugin), and
the one-launch MoE kernel recomputes the up GEMM for every output slice: 20.4 ms per layer at
N=256 on an H200 against 0.43 ms for the 5-launch ``fused_moe`` (bench/bench_moe_kernel.py), i.e.
about 0.6 s per denoise step over 30 layers where the weight-read floor is 15 ms. Four of those five
launches are pure functions with exclusive writes and int32 scalars, which is the AOT shape; the
fifth (combine) is a fixed-order sum over K, which TensorRT's own ReduceSum does. So each DllmMoE
node becomes (letters as in kernels.moe_triton; all plugin nodes in domain and plugin_namespace
"dllm_trt", plugin_version "1")::

    topk_ids [N,K] i32, topk_w [N,K] f32 = DllmMoERoute(router_logits [N,E] f32, per_expert_scale [E] f32; top_k)
    sorted [E,N] i32, counts [E] i32     = DllmMoEBucket(topk_ids; num_experts)
    act [N,K,I] f32  = DllmMoEExpertUp(hidden [N,H] T, gate_up_proj [E,2I,H] T, sorted, counts; top_k)
    part [N,K,H] f32 = DllmMoEExpertDown(act, down_proj [E,H,I] T, sorted, counts, topk_w)
    out [N,H] T      = Cast(ReduceSum(part, axes=[1], keepdims=0), to=T)

[N,K,I] and [N,K,H] are the kernels' [A,I] and [A,H] buffers (a = n*K + k) with the token axis
split out. Every assignment a belongs to exactly one expert, so the up/down kernels write every
row of act and part and nothing is read uninitialised; the plugins need no workspace and no
memset. Each plugin has at most one attribute, so the positional order in which TensorRT's AOT
path hands attributes over (engines.moe_plugin) cannot mix them up. The expert GEMMs advertise their
row tile BM (16, 32, 64) as custom tactics: TensorRT times them at the profile's opt shape (BM 16
suits a 256-token canvas, about 16 rows per expert; larger batches want 64). Pointer arguments
carry no 16-byte divisibility hint (TensorRT's alignment of plugin buffers is not documented), which
costs vectorised loads: the first thing to measure once an engine runs.

The ReduceSum sums the K partial rows in an order TensorRT picks, in fp32: within an ulp of
``_combine_kernel``'s fixed order, not bit-identical to ``fused_moe``.

``lowered_moe`` runs exactly this chain (same specs, same grids) through Triton's JIT: that is how
the tests check the lowered graph's numerics without TensorRT (CPU interpreter) and how
bench/bench_moe_chain.py times it. Measured on an H200 (bf16, 26B-A4B sizes, CUDA-graph replay,
torch 2.11, Triton 3.6): N=256: fused_moe 0.423 ms, chain BM 16/32/64 0.430/0.409/0.423 ms, the
one-launch plugin kernel 20.9 ms; N=2048: fused_moe 0.857 ms, chain 1.618/1.149/0.859 ms. So the
chain costs what fused_moe costs once TensorRT picks the right tactic, about 50x less than the
one-launch plugin at a batch-1 canvas. (JIT specialises pointer alignment at run time; the AOT PTX
carries no such hint, see above, so the plugins may be slower than these numbers.)

What has never run: the tensorrt.plugin registration, autotune and aot_impl callbacks below, and
any engine containing these plugins (TensorRT cannot be installed where this was written).
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects these annotations as objects.

from collections.abc import Callable

from dllm_trt.engines.moe_plugin import PLUGIN_NAMESPACE, _import_tensorrt, triton_dtype
from dllm_trt.engines.triton_aot import KernelSpec, compile_spec

ROUTE, BUCKET, EXPERT_UP, EXPERT_DOWN = "DllmMoERoute", "DllmMoEBucket", "DllmMoEExpertUp", "DllmMoEExpertDown"
CHAIN_OPS = (ROUTE, BUCKET, EXPERT_UP, EXPERT_DOWN)
M_TILES = (16, 32, 64)  # BM tactics of the expert GEMMs
_ROUTE_BT, _BUCKET_BA = 16, 1024

_registered = False


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2(x)))


def _icdiv(a: int, b: int) -> int:
    return -(-a // b)


def route_spec(n_experts: int, top_k: int) -> KernelSpec:
    sig = (("logits_ptr", "*fp32"), ("scale_ptr", "*fp32"), ("n_tokens", "i32"),
           ("topk_ids_ptr", "*i32"), ("topk_w_ptr", "*fp32"))  # fmt: skip
    consts = (("E", n_experts), ("E_P", _pow2(n_experts)), ("TOP_K", top_k), ("BT", _ROUTE_BT))
    return KernelSpec("_route_kernel", sig, consts, num_warps=4, num_stages=1)


def route_grid(n_tokens, cdiv: Callable) -> tuple:  # noqa: ANN001 (int or a TensorRT ShapeExpr)
    return (cdiv(n_tokens, _ROUTE_BT), 1, 1)


def bucket_spec(top_k: int) -> KernelSpec:
    sig = (("topk_ids_ptr", "*i32"), ("n_tokens", "i32"), ("sorted_ptr", "*i32"), ("count_ptr", "*i32"))
    return KernelSpec("_bucket_kernel", sig, (("TOP_K", top_k), ("BA", _BUCKET_BA)), num_warps=4, num_stages=1)


def bucket_grid(n_experts: int) -> tuple:
    return (n_experts, 1, 1)


def up_spec(dtype: str, n_experts: int, hidden: int, width: int, top_k: int, bm: int) -> KernelSpec:
    sig = (("hidden_ptr", f"*{dtype}"), ("gate_up_ptr", f"*{dtype}"), ("sorted_ptr", "*i32"),
           ("count_ptr", "*i32"), ("n_tokens", "i32"), ("act_ptr", "*fp32"))  # fmt: skip
    consts = (("H", hidden), ("I", width), ("TOP_K", top_k), ("BM", bm), ("BI", _pow2_clamp(width, 16, 64)),
              ("BK", _pow2_clamp(hidden, 16, 64)), ("UPCAST", dtype == "fp32"))  # fmt: skip
    return KernelSpec("_expert_up_kernel", sig, consts, num_warps=4, num_stages=3)


def up_grid(n_tokens, n_experts: int, width: int, bm: int, cdiv: Callable) -> tuple:  # noqa: ANN001
    return (cdiv(n_tokens, bm), _icdiv(width, _pow2_clamp(width, 16, 64)), n_experts)


def down_spec(dtype: str, n_experts: int, hidden: int, width: int, bm: int) -> KernelSpec:
    sig = (("act_ptr", "*fp32"), ("down_ptr", f"*{dtype}"), ("sorted_ptr", "*i32"), ("count_ptr", "*i32"),
           ("topk_w_ptr", "*fp32"), ("n_tokens", "i32"), ("part_ptr", "*fp32"))  # fmt: skip
    consts = (("H", hidden), ("I", width), ("BM", bm), ("BH", _pow2_clamp(hidden, 16, 128)),
              ("BK", _pow2_clamp(width, 16, 64)), ("UPCAST", dtype == "fp32"))  # fmt: skip
    return KernelSpec("_expert_down_kernel", sig, consts, num_warps=4, num_stages=3)


def down_grid(n_tokens, n_experts: int, hidden: int, bm: int, cdiv: Callable) -> tuple:  # noqa: ANN001
    return (cdiv(n_tokens, bm), _icdiv(hidden, _pow2_clamp(hidden, 16, 128)), n_experts)


def tile_for_tactic(tactic: object) -> int:
    # TensorRT hands over one of the advertised tactics; anything else (None, 0) means the default.
    return int(tactic) if tactic in M_TILES else M_TILES[0]


# ---- the same chain through Triton's JIT (tests, GPU checks) -------------------------------------


def _jit(spec: KernelSpec, grid: tuple, *args) -> None:  # noqa: ANN002
    from dllm_trt.kernels import moe_triton

    consts = spec.constants()
    if "UPCAST" in consts:  # the interpreter's bf16 tl.dot is wrong (kernels.moe_triton docstring)
        consts["UPCAST"] = consts["UPCAST"] or moe_triton._interpreting()
    kernel = getattr(moe_triton, spec.kernel)
    kernel[grid](*args, **consts, num_warps=spec.num_warps, num_stages=spec.num_stages)


def lowered_moe(hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, top_k: int, bm: int = 16):  # noqa: ANN001, ANN201
    """The lowered graph of one DllmMoE node, node by node, with the plugins' own specs and grids."""
    import torch

    n_tokens, hidden_size = hidden.shape
    n_experts, two_width, _ = gate_up_proj.shape
    width = two_width // 2
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[hidden.dtype]
    dev = hidden.device
    logits, scale = router_logits.float().contiguous(), per_expert_scale.float().contiguous()
    topk_ids = torch.empty((n_tokens, top_k), dtype=torch.int32, device=dev)
    topk_w = torch.empty((n_tokens, top_k), dtype=torch.float32, device=dev)
    _jit(route_spec(n_experts, top_k), route_grid(n_tokens, _icdiv), logits, scale, n_tokens, topk_ids, topk_w)
    sorted_ids = torch.empty((n_experts, n_tokens), dtype=torch.int32, device=dev)
    counts = torch.empty((n_experts,), dtype=torch.int32, device=dev)
    _jit(bucket_spec(top_k), bucket_grid(n_experts), topk_ids, n_tokens, sorted_ids, counts)
    act = torch.empty((n_tokens, top_k, width), dtype=torch.float32, device=dev)
    _jit(up_spec(dtype, n_experts, hidden_size, width, top_k, bm), up_grid(n_tokens, n_experts, width, bm, _icdiv),
         hidden.contiguous(), gate_up_proj.contiguous(), sorted_ids, counts, n_tokens, act)  # fmt: skip
    part = torch.empty((n_tokens, top_k, hidden_size), dtype=torch.float32, device=dev)
    _jit(down_spec(dtype, n_experts, hidden_size, width, bm), down_grid(n_tokens, n_experts, hidden_size, bm, _icdiv),
         act, down_proj.contiguous(), sorted_ids, counts, topk_w, n_tokens, part)  # fmt: skip
    return part.sum(dim=1).to(hidden.dtype)  # ReduceSum(axes=[1]) + Cast


# ---- TensorRT registration (never run here: needs the `tensorrt` package) ------------------------


def register_chain_plugins(ptx_version: int | None = None) -> None:
    """Register the four chain plugins with TensorRT (idempotent). Call before parsing the ONNX graph."""
    global _registered
    trt, trtp = _import_tensorrt()
    if _registered:
        return
    _define_route(trt, trtp, ptx_version)
    _define_bucket(trt, trtp, ptx_version)
    _define_up(trt, trtp, ptx_version)
    _define_down(trt, trtp, ptx_version)
    _registered = True


def _constant(dim: object, what: str) -> int:
    # Weight shapes are build-time constants; a dynamic one cannot become a Triton constexpr.
    if getattr(dim, "is_fake", False) or not dim.is_constant:
        raise ValueError(f"the dllm_trt MoE plugins need a static {what}; got a dynamic dimension")
    return int(dim.constant_value())


def _launch(trtp, kernel, grid: tuple, n_tokens) -> tuple:  # noqa: ANN001
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = grid
    params.block_x = kernel.num_warps * 32
    params.shared_mem = kernel.shared_mem
    extra = trtp.SymIntExprs(1)
    extra[0] = trtp.SymInt32(n_tokens)  # the only runtime scalar of every chain kernel
    return kernel.name, kernel.ptx, params, extra


def _define_route(trt, trtp, ptx_version) -> None:  # noqa: ANN001
    plugin_id = f"{PLUGIN_NAMESPACE}::{ROUTE}"

    @trtp.register(plugin_id)
    def _desc(
        router_logits: trtp.TensorDesc, per_expert_scale: trtp.TensorDesc, top_k: int
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        n = router_logits.shape_expr[0]
        return trtp.from_shape_expr((n, top_k), dtype=trt.int32), trtp.from_shape_expr((n, top_k), dtype=trt.float32)

    @trtp.autotune(plugin_id)
    def _autotune(router_logits, per_expert_scale, top_k, outputs):
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 1, 3], "FP32")
        combo.pos([2], "INT32")
        return [combo]

    @trtp.aot_impl(plugin_id)
    def _aot(router_logits, per_expert_scale, top_k, outputs, tactic):
        n_experts = _constant(router_logits.shape_expr[1], "expert count")
        kernel = compile_spec(route_spec(n_experts, int(top_k)), ptx_version=ptx_version)
        n = router_logits.shape_expr[0]
        return _launch(trtp, kernel, route_grid(n, trtp.cdiv), n)


def _define_bucket(trt, trtp, ptx_version) -> None:  # noqa: ANN001
    plugin_id = f"{PLUGIN_NAMESPACE}::{BUCKET}"

    @trtp.register(plugin_id)
    def _desc(topk_ids: trtp.TensorDesc, num_experts: int) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        n = topk_ids.shape_expr[0]
        return (
            trtp.from_shape_expr((num_experts, n), dtype=trt.int32),
            trtp.from_shape_expr((num_experts,), dtype=trt.int32),
        )

    @trtp.autotune(plugin_id)
    def _autotune(topk_ids, num_experts, outputs):
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 1, 2], "INT32")
        return [combo]

    @trtp.aot_impl(plugin_id)
    def _aot(topk_ids, num_experts, outputs, tactic):
        top_k = _constant(topk_ids.shape_expr[1], "top_k")
        kernel = compile_spec(bucket_spec(top_k), ptx_version=ptx_version)
        return _launch(trtp, kernel, bucket_grid(int(num_experts)), topk_ids.shape_expr[0])


def _define_up(trt, trtp, ptx_version) -> None:  # noqa: ANN001
    plugin_id = f"{PLUGIN_NAMESPACE}::{EXPERT_UP}"

    @trtp.register(plugin_id)
    def _desc(
        hidden: trtp.TensorDesc,
        gate_up_proj: trtp.TensorDesc,
        sorted_ids: trtp.TensorDesc,
        counts: trtp.TensorDesc,
        top_k: int,
    ) -> trtp.TensorDesc:
        n, width = hidden.shape_expr[0], gate_up_proj.shape_expr[1] // 2
        return trtp.from_shape_expr((n, top_k, width), dtype=trt.float32)

    @trtp.autotune(plugin_id)
    def _autotune(hidden, gate_up_proj, sorted_ids, counts, top_k, outputs):
        combo = trtp.AutoTuneCombination(tactics=M_TILES)
        combo.pos([0, 1], "FP32|FP16|BF16")  # hidden and the weights share T
        combo.pos([2, 3], "INT32")
        combo.pos([4], "FP32")
        return [combo]

    @trtp.aot_impl(plugin_id)
    def _aot(hidden, gate_up_proj, sorted_ids, counts, top_k, outputs, tactic):
        n_experts = _constant(gate_up_proj.shape_expr[0], "expert count")
        width = _constant(gate_up_proj.shape_expr[1], "expert width") // 2
        hidden_size = _constant(gate_up_proj.shape_expr[2], "hidden size")
        bm = tile_for_tactic(tactic)
        spec = up_spec(triton_dtype(hidden.dtype.name), n_experts, hidden_size, width, int(top_k), bm)
        kernel = compile_spec(spec, ptx_version=ptx_version)
        n = hidden.shape_expr[0]
        return _launch(trtp, kernel, up_grid(n, n_experts, width, bm, trtp.cdiv), n)


def _define_down(trt, trtp, ptx_version) -> None:  # noqa: ANN001
    plugin_id = f"{PLUGIN_NAMESPACE}::{EXPERT_DOWN}"

    @trtp.register(plugin_id)
    def _desc(
        act: trtp.TensorDesc,
        down_proj: trtp.TensorDesc,
        sorted_ids: trtp.TensorDesc,
        counts: trtp.TensorDesc,
        topk_w: trtp.TensorDesc,
    ) -> trtp.TensorDesc:
        n, top_k, hidden = act.shape_expr[0], act.shape_expr[1], down_proj.shape_expr[1]
        return trtp.from_shape_expr((n, top_k, hidden), dtype=trt.float32)

    @trtp.autotune(plugin_id)
    def _autotune(act, down_proj, sorted_ids, counts, topk_w, outputs):
        combo = trtp.AutoTuneCombination(tactics=M_TILES)
        combo.pos([0, 4, 5], "FP32")
        combo.pos([1], "FP32|FP16|BF16")
        combo.pos([2, 3], "INT32")
        return [combo]

    @trtp.aot_impl(plugin_id)
    def _aot(act, down_proj, sorted_ids, counts, topk_w, outputs, tactic):
        n_experts = _constant(down_proj.shape_expr[0], "expert count")
        hidden_size = _constant(down_proj.shape_expr[1], "hidden size")
        width = _constant(down_proj.shape_expr[2], "expert width")
        bm = tile_for_tactic(tactic)
        spec = down_spec(triton_dtype(down_proj.dtype.name), n_experts, hidden_size, width, bm)
        kernel = compile_spec(spec, ptx_version=ptx_version)
        n = act.shape_expr[0]
        return _launch(trtp, kernel, down_grid(n, n_experts, hidden_size, bm, trtp.cdiv), n)
