"""The launch plan of the long-head attention: which Triton kernels, with which constants, grids, workspace.

One plan, two executors, as for the MoE (kernels.moe_launches): `attention_triton.flash_attention`
runs it through Triton's JIT (interpreted on the CPU in the tests), the TensorRT plugin
(trt.attention_plugin) runs the same kernels compiled ahead of time through the CUDA driver, with the
workspace TensorRT hands it.

Two or three launches, never a score in memory::

    attend        out [B, Hq, T, D]    = softmax(Q K^T * scale + bias) V   (SPLITS = 1: normalised, in T)
    attend_split  acc [S, B*Hq, T, D], ml [S, B*Hq, T, 2] fp32               (SPLITS > 1: each split's keys)
    combine       out [B, Hq, T, D]    = the splits merged by their maxima and sums

A program holds BLOCK_M queries of one head against BLOCK_N keys at a time, online softmax in fp32
(flash attention). Splitting the keys gives the GPU enough programs when there are few queries (a
256-token canvas over a long cache: B*Hq*T/BLOCK_M programs alone would leave SMs idle); the split
results live in a workspace bounded by TARGET_PROGRAMS whatever the shapes (`workspace_bytes`).

Letters: B batch, Hq query heads, Hkv key/value heads (Hq a multiple), T queries, S keys (cache +
new), D head dim, S_ splits.
"""

from __future__ import annotations

from dataclasses import dataclass

from dllm_trt.kernels.moe_launches import ALIGN, KernelSpec, cdiv, pow2

MODULE = "dllm_trt.kernels.attention_triton"
STAGES = ("attend", "attend_split", "combine")
TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs: below this many, split the keys
MAX_SPLITS = 16
COMBINE_BM = 4
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class AttentionShape:
    """What the compiled kernels are specialised on: everything but batch, queries and keys."""

    dtype: str  # fp32 | fp16 | bf16: Q, K, V, the bias and the output
    q_heads: int
    kv_heads: int
    head_dim: int
    scale: float = 1.0  # DiffusionGemma's attention scaling

    def __post_init__(self) -> None:
        if self.dtype not in _BYTES:
            raise ValueError(f"attention dtype {self.dtype} is not one of {tuple(_BYTES)}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"{self.q_heads} query heads are not a multiple of {self.kv_heads} key/value heads")

    @property
    def block_d(self) -> int:
        return max(16, pow2(self.head_dim))  # tl.dot needs 16 along the reduction

    @property
    def blocks(self) -> tuple[int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps): tiles whose Q, K and V fit the 48 KB of shared memory a launch
        gets without opting in (trt.triton_aot), with the [BLOCK_M, D] fp32 accumulator in registers."""
        if self.block_d >= 512:
            return 32, 16, 8
        if self.block_d >= 256:
            return 32, 32, 4
        return 64, 32, 4


def splits(shape: AttentionShape, batch: int, queries: int, keys: int) -> tuple[int, int]:
    """(splits, keys per split): split the keys only when the programs over the queries are too few for the
    GPU, and never into splits of less than one key block or more than MAX_SPLITS."""
    block_m, block_n, _ = shape.blocks
    programs = batch * shape.q_heads * cdiv(max(queries, 1), block_m)
    key_blocks = cdiv(max(keys, 1), block_n)
    count = max(1, min(MAX_SPLITS, TARGET_PROGRAMS // programs, key_blocks))
    per_split = cdiv(key_blocks, count) * block_n
    return cdiv(max(keys, 1), per_split), per_split  # no empty split


def kernel_specs(shape: AttentionShape, upcast: bool = False) -> dict[str, KernelSpec]:
    """The three kernels for `shape`. `upcast` runs bf16/fp16 dots in fp32 (the Triton interpreter's
    bf16 tl.dot is wrong, see kernels.moe_triton); fp32 always runs IEEE fp32 dots."""
    t = shape.dtype
    block_m, block_n, warps = shape.blocks
    constants = (
        ("HQ", shape.q_heads), ("HKV", shape.kv_heads), ("D", shape.head_dim), ("BD", shape.block_d),
        ("BM", block_m), ("BN", block_n), ("SCALE", float(shape.scale)), ("UPCAST", upcast or t == "fp32"),
    )  # fmt: skip
    tensors = (("q_ptr", f"*{t}"), ("k_ptr", f"*{t}"), ("v_ptr", f"*{t}"), ("bias_ptr", f"*{t}"))
    sizes = (("queries", "i32"), ("keys", "i32"), ("keys_per_split", "i32"))
    return {
        "attend": KernelSpec(
            "_attend_kernel",
            (*tensors, ("out_ptr", f"*{t}"), *sizes),
            (*constants, ("SPLIT", False), ("acc_ptr", None), ("ml_ptr", None)),
            num_warps=warps,
            num_stages=2,
            module=MODULE,
        ),  # fmt: skip
        "attend_split": KernelSpec(
            "_attend_kernel",
            (*tensors, ("acc_ptr", "*fp32"), ("ml_ptr", "*fp32"), *sizes),
            (*constants, ("SPLIT", True), ("out_ptr", None)),
            num_warps=warps,
            num_stages=2,
            module=MODULE,
        ),  # fmt: skip
        "combine": KernelSpec(
            "_combine_kernel",
            (("acc_ptr", "*fp32"), ("ml_ptr", "*fp32"), ("out_ptr", f"*{t}"), ("queries", "i32"), ("n_splits", "i32")),
            (("D", shape.head_dim), ("BD", shape.block_d), ("BM", COMBINE_BM)),
            num_warps=4,
            num_stages=1,
            module=MODULE,
        ),  # fmt: skip
    }


def grids(shape: AttentionShape, batch: int, queries: int, keys: int) -> dict[str, tuple[int, int, int]]:
    block_m = shape.blocks[0]
    count, _ = splits(shape, batch, queries, keys)
    rows = batch * shape.q_heads
    return {
        "attend": (cdiv(queries, block_m), rows, 1),
        "attend_split": (cdiv(queries, block_m), rows, count),
        "combine": (cdiv(queries, COMBINE_BM), rows, 1),
    }


def workspace_layout(shape: AttentionShape, batch: int, queries: int, keys: int) -> tuple[dict[str, int], int]:
    """Byte offsets of the split results inside one workspace, and its size (0 when the keys are not split).

    acc [splits, B*Hq, T, D] fp32 holds each split's unnormalised output; its running maximum and sum
    follow it as ml [splits, B*Hq, T, 2] fp32, where the split kernel writes them (past acc's end)."""
    count, _ = splits(shape, batch, queries, keys)
    if count == 1:
        return {}, 0
    rows = count * batch * shape.q_heads * queries
    acc = rows * shape.head_dim * 4
    size = cdiv(acc + rows * 2 * 4, ALIGN) * ALIGN
    return {"acc": 0, "ml": acc}, size


def workspace_bytes(shape: AttentionShape) -> int:
    """A bound on `workspace_layout`'s size for any batch, queries and keys: the keys are split only while
    the query programs number fewer than TARGET_PROGRAMS, so splits x rows stays under TARGET_PROGRAMS x BLOCK_M
    query rows (what the plugin asks TensorRT for, and what `plan` counts)."""
    rows = TARGET_PROGRAMS * shape.blocks[0]
    return cdiv(rows * (shape.head_dim + 2) * 4, ALIGN) * ALIGN
