"""The launch plan of the fused MoE: which Triton kernels, with which constants, grids and arguments.

One plan, two executors. `moe_triton.fused_moe` runs it through Triton's JIT (interpreted on the
CPU in the tests, compiled on a GPU); the TensorRT plugin (trt.moe_plugin) runs the same
kernels, compiled ahead of time to PTX, through the CUDA driver, with its buffers carved out of the
workspace TensorRT hands it (`workspace_layout`). What the tests prove about `fused_moe` therefore
holds for the plugin's arithmetic; only the launch mechanism differs.

Five launches, each a pure function of its inputs (exclusive writes, no atomics, no memset)::

    route    topk_ids [A] i32, topk_w [A] f32 = softmax/top-k/renormalise/scale(router_logits, per_expert_scale)
    bucket   sorted [E, N] i32, counts [E] i32 = the assignments of every expert, in token order
    up       act [A, I] f32   = gelu_tanh(x @ Wg^T) * (x @ Wu^T) per assignment
    down     part [A, H] f32  = topk_w * (act @ Wd^T)
    combine  out [N, H] T     = sum over k of part, in fixed order

Letters as in kernels.moe_triton: N tokens, H hidden, E experts, K = top_k, I expert width, A = N*K.

Quantized experts (`MoEShape.weight_format`, contract.MOE_INPUTS): `up` and `down` take the stored
values and their scales and dequantize inside the kernel. fp8: e4m3 values read as such; nvfp4:
the packed e2m1 codes read as bytes (two a byte, the even element in the low nibble, as ONNX packs
FLOAT4E2M1), their e4m3 block scales, the fp32 global scales. The scale inputs a format does not
have are constexpr None in the kernel (compiled out), so a plain kernel's signature is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.contract import MOE_WEIGHT_FORMATS

STAGES = ("route", "bucket", "up", "down", "combine")
ROUTE_BT, BUCKET_BA, COMBINE_BT = 16, 1024, 8
ALIGN = 256  # workspace buffers start on 256-byte boundaries (what cudaMalloc gives)
_BYTES = {"i32": 4, "fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class KernelSpec:
    """Everything that decides a compiled kernel: which kernel, its runtime signature in argument
    order, its constexprs and launch options."""

    kernel: str  # name of a @triton.jit function in `module`
    signature: tuple[tuple[str, str], ...]  # (parameter, Triton type), in argument order
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 3
    module: str = "dllm_trt.kernels.moe_triton"  # where the kernel is (attention's: kernels.attention_triton)

    def constants(self) -> dict[str, object]:
        return dict(self.constexprs)

    @property
    def args(self) -> tuple[str, ...]:
        """The buffer or scalar each parameter takes, by its name in `buffers` (the parameter minus `_ptr`)."""
        return tuple(name.removesuffix("_ptr") for name, _ in self.signature)


@dataclass(frozen=True)
class MoEShape:
    """What the compiled kernels are specialised on: everything but the token count."""

    dtype: str  # fp32 | fp16 | bf16: hidden and output (and the expert weights when weight_format is "float")
    experts: int
    hidden: int
    width: int
    top_k: int
    weight_format: str = "float"  # contract.MOE_WEIGHT_FORMATS: float | fp8 | nvfp4

    def __post_init__(self) -> None:
        if self.weight_format not in MOE_WEIGHT_FORMATS:
            raise ValueError(f"unknown weight_format '{self.weight_format}'; one of {MOE_WEIGHT_FORMATS}")


# The kernels' WFMT constexpr, and per format: (weight pointer type, the kernel's scale parameters with
# their types). Scale parameters missing from a format's list are passed as constexpr None.
WFMT = {"float": 0, "fp8": 1, "nvfp4": 2}
_SCALES = {
    "up": ("gate_up_scale_ptr", "gate_up_block_scale_ptr", "gate_up_global_scale_ptr"),
    "down": ("down_scale_ptr", "down_block_scale_ptr", "down_global_scale_ptr"),
}
_SCALE_TYPES = {"float": (None, None, None), "fp8": ("*fp32", None, None), "nvfp4": (None, "*fp8e4nv", "*fp32")}
_ACT = {"fp32": 0, "fp16": 1, "bf16": 2}  # the dot operands' dtype code (kernels.moe_triton._as_act)


Params = tuple[tuple[str, object], ...]


def _weights(shape: MoEShape, stage: str, name: str) -> tuple[Params, Params]:
    """(signature entries, constexprs) of one expert weight and its scales, in the kernel's parameter order."""
    pointer = {"float": f"*{shape.dtype}", "fp8": "*fp8e4nv", "nvfp4": "*u8"}[shape.weight_format]
    signature, constexprs = [(name, pointer)], []
    for param, kind in zip(_SCALES[stage], _SCALE_TYPES[shape.weight_format], strict=True):
        if kind is None:
            constexprs.append((param, None))
        else:
            signature.append((param, kind))
    return tuple(signature), tuple(constexprs)


def pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, pow2(x)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_m(n_tokens: int, shape: MoEShape) -> int:
    """Rows per expert block: about one block per expert on average (16 rows at N=256, K=8, E=128)."""
    return pow2_clamp(cdiv(n_tokens * shape.top_k, shape.experts), 16, 64)


def kernel_specs(shape: MoEShape, bm: int, upcast: bool = False) -> dict[str, KernelSpec]:
    """The five kernels for `shape` with expert-block rows `bm`. `upcast` runs bf16/fp16 dots in fp32
    (the Triton interpreter's bf16 tl.dot is wrong, see kernels.moe_triton)."""
    t, e, h, i, k = shape.dtype, shape.experts, shape.hidden, shape.width, shape.top_k
    upcast = upcast or t == "fp32"
    up_weight, up_none = _weights(shape, "up", "gate_up_proj_ptr")
    down_weight, down_none = _weights(shape, "down", "down_proj_ptr")
    quant = (("WFMT", WFMT[shape.weight_format]), ("ACT", _ACT[t]))
    return {
        "route": KernelSpec(
            "_route_kernel",
            (
                ("router_logits_ptr", "*fp32"),
                ("per_expert_scale_ptr", "*fp32"),
                ("n_tokens", "i32"),
                ("topk_ids_ptr", "*i32"),
                ("topk_w_ptr", "*fp32"),
            ),
            (("E", e), ("E_P", pow2(e)), ("TOP_K", k), ("BT", ROUTE_BT)),
            num_stages=1,
        ),  # fmt: skip
        "bucket": KernelSpec(
            "_bucket_kernel",
            (("topk_ids_ptr", "*i32"), ("n_tokens", "i32"), ("sorted_ptr", "*i32"), ("counts_ptr", "*i32")),
            (("TOP_K", k), ("BA", BUCKET_BA)),
            num_stages=1,
        ),
        "up": KernelSpec(
            "_expert_up_kernel",
            (
                ("hidden_ptr", f"*{t}"),
                *up_weight,
                ("sorted_ptr", "*i32"),
                ("counts_ptr", "*i32"),
                ("n_tokens", "i32"),
                ("act_ptr", "*fp32"),
            ),
            (
                ("H", h),
                ("I", i),
                ("TOP_K", k),
                ("BM", bm),
                ("BI", pow2_clamp(i, 16, 64)),
                ("BK", pow2_clamp(h, 16, 64)),
                ("UPCAST", upcast),
                *quant,
                *up_none,
            ),
        ),  # fmt: skip
        "down": KernelSpec(
            "_expert_down_kernel",
            (
                ("act_ptr", "*fp32"),
                *down_weight,
                ("sorted_ptr", "*i32"),
                ("counts_ptr", "*i32"),
                ("topk_w_ptr", "*fp32"),
                ("n_tokens", "i32"),
                ("part_ptr", "*fp32"),
            ),
            (
                ("H", h),
                ("I", i),
                ("BM", bm),
                ("BH", pow2_clamp(h, 16, 128)),
                ("BK", pow2_clamp(i, 16, 64)),
                ("UPCAST", upcast),
                *quant,
                *down_none,
            ),
        ),  # fmt: skip
        "combine": KernelSpec(
            "_combine_kernel",
            (("part_ptr", "*fp32"), ("n_tokens", "i32"), ("out_ptr", f"*{t}")),
            (("H", h), ("TOP_K", k), ("BT", COMBINE_BT), ("BH", pow2_clamp(h, 16, 256))),
            num_stages=1,
        ),
    }


def grids(specs: dict[str, KernelSpec], shape: MoEShape, n_tokens: int) -> dict[str, tuple[int, int, int]]:
    """Each kernel's grid for `n_tokens` tokens (the only runtime size)."""
    up, down, combine = (specs[name].constants() for name in ("up", "down", "combine"))
    return {
        "route": (cdiv(n_tokens, ROUTE_BT), 1, 1),
        "bucket": (shape.experts, 1, 1),
        "up": (cdiv(n_tokens, up["BM"]), cdiv(shape.width, up["BI"]), shape.experts),
        "down": (cdiv(n_tokens, down["BM"]), cdiv(shape.hidden, down["BH"]), shape.experts),
        "combine": (cdiv(n_tokens, combine["BT"]), cdiv(shape.hidden, combine["BH"]), 1),
    }


def intermediates(shape: MoEShape, n_tokens: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The buffers the launches hand each other: name -> (element type, shape)."""
    a = n_tokens * shape.top_k
    return {
        "topk_ids": ("i32", (a,)),
        "topk_w": ("fp32", (a,)),
        "sorted": ("i32", (shape.experts, n_tokens)),
        "counts": ("i32", (shape.experts,)),
        "act": ("fp32", (a, shape.width)),
        "part": ("fp32", (a, shape.hidden)),
    }


def workspace_layout(shape: MoEShape, n_tokens: int) -> tuple[dict[str, int], int]:
    """Byte offsets of the intermediates inside one workspace, and its size (for at most `n_tokens`)."""
    offsets, size = {}, 0
    for name, (dtype, dims) in intermediates(shape, n_tokens).items():
        offsets[name] = size
        count = 1
        for dim in dims:
            count *= dim
        size += cdiv(count * _BYTES[dtype], ALIGN) * ALIGN
    return offsets, size
