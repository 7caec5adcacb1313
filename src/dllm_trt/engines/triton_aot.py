"""Compile one Triton kernel to PTX for a TensorRT AOT plugin, refusing what such a launch cannot provide.

TensorRT launches an AOT kernel with (input pointers..., int32 extras..., output pointers...), one
grid/block/dynamic-shared-memory triple, null for any further parameter, and no opt-in to more
than the default 48 KB of dynamic shared memory (see engines.moe_plugin's docstring for sources).
So a kernel compiled here must take its arguments in that order, need no Triton scratch memory,
one CTA per cluster and no cooperative/PDL launch, and fit in 48 KB (fewer pipeline stages first).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from dllm_trt.engines.moe_plugin import DEFAULT_SMEM_LIMIT, CompiledKernel


@dataclass(frozen=True)
class KernelSpec:
    """Everything that decides the PTX: which kernel, its TensorRT-ordered signature, its constexprs."""

    kernel: str  # name of a @triton.jit function in dllm_trt.kernels.moe_triton
    signature: tuple[tuple[str, str], ...]  # (parameter, Triton type) in TensorRT's argument order
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int = 4
    num_stages: int = 3

    def constants(self) -> dict[str, object]:
        return dict(self.constexprs)


def launch_abi_problems(metadata: object) -> list[str]:
    """Triton launch features TensorRT's AOT launch cannot reproduce (empty when the kernel is fine)."""
    problems = {
        "global_scratch_size": getattr(metadata, "global_scratch_size", 0) != 0,
        "profile_scratch_size": getattr(metadata, "profile_scratch_size", 0) != 0,
        "num_ctas": getattr(metadata, "num_ctas", 1) != 1,
        "launch_cooperative_grid": bool(getattr(metadata, "launch_cooperative_grid", False)),
        "launch_pdl": bool(getattr(metadata, "launch_pdl", False)),
        "tmem_size": getattr(metadata, "tmem_size", 0) != 0,
    }
    return [name for name, bad in problems.items() if bad]


@functools.lru_cache(maxsize=64)
def compile_spec(spec: KernelSpec, target: object = None, ptx_version: int | None = None) -> CompiledKernel:
    """PTX for `spec` (`target` None = the GPU of this process); needs Triton, not TensorRT."""
    import triton

    from dllm_trt.kernels import moe_triton

    fn = getattr(moe_triton, spec.kernel)
    constants = spec.constants()
    signature = dict(spec.signature) | {name: "constexpr" for name in constants}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    isa = {"ptx_version": ptx_version} if ptx_version else {}
    compiled = None
    for num_stages in range(spec.num_stages, 0, -1):  # fewer pipeline stages, less shared memory
        options = {"num_warps": spec.num_warps, "num_stages": num_stages} | isa
        compiled = triton.compile(source, target=target, options=options)
        if compiled.metadata.shared <= DEFAULT_SMEM_LIMIT:
            break
    else:
        raise RuntimeError(f"{spec.kernel} needs {compiled.metadata.shared} B of shared memory, more than 48 KB")
    bad = launch_abi_problems(compiled.metadata)
    if bad:
        raise RuntimeError(f"{spec.kernel} needs launch features TensorRT AOT plugins lack: {bad}")
    blocks = tuple((k, v) for k, v in spec.constexprs if isinstance(v, int) and k.startswith("B"))
    return CompiledKernel(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        num_warps=compiled.metadata.num_warps,
        shared_mem=compiled.metadata.shared,
        blocks=blocks,
    )
