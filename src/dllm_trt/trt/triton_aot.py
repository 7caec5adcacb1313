"""Compile the plugins' Triton kernels (MoE, attention) ahead of time for one GPU architecture, with no GPU present.

Triton compiles a kernel for a named target (`GPUTarget("cuda", 121, 32)` for sm_121) down to a
cubin with the ptxas it bundles; the cubin goes into the engine (trt.moe_plugin) and the CUDA
driver loads it at run time (trt.cuda_launch) without compiling anything. Each compiled kernel
records what a launch needs: its entry name, threads per block, dynamic shared memory, and its
parameters as the cubin declares them (Triton appends scratch pointers to every kernel's own; the
launcher passes null for those, and refuses a kernel that would need them).
"""

from __future__ import annotations

import base64
import functools
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

from dllm_trt.kernels.moe_launches import KernelSpec

# Without an opt-in (cuFuncSetAttribute) a launch gets 48 KB of dynamic shared memory; fewer
# pipeline stages are tried before giving up.
DEFAULT_SMEM_LIMIT = 48 * 1024


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for one architecture, as the engine stores it and the launcher reads it."""

    name: str  # the cubin's entry point
    cubin: bytes
    num_warps: int
    shared_mem: int
    params: tuple[str, ...]  # "ptr" | "i32" per parameter of the entry, Triton's scratch pointers included
    arch: int  # 121 for sm_121

    def to_dict(self) -> dict:
        return asdict(self) | dict(cubin=base64.b64encode(self.cubin).decode(), params=list(self.params))

    @classmethod
    def from_dict(cls, data: dict) -> CompiledKernel:
        return cls(**(data | dict(cubin=base64.b64decode(data["cubin"]), params=tuple(data["params"]))))


def launch_abi_problems(metadata: object) -> list[str]:
    """Triton launch features a plain cuLaunchKernel cannot reproduce (empty when the kernel is fine)."""
    problems = {
        "global_scratch_size": getattr(metadata, "global_scratch_size", 0) != 0,
        "profile_scratch_size": getattr(metadata, "profile_scratch_size", 0) != 0,
        "num_ctas": getattr(metadata, "num_ctas", 1) != 1,
        "launch_cooperative_grid": bool(getattr(metadata, "launch_cooperative_grid", False)),
        "launch_pdl": bool(getattr(metadata, "launch_pdl", False)),
        "tmem_size": getattr(metadata, "tmem_size", 0) != 0,
    }
    return [name for name, bad in problems.items() if bad]


def entry_params(ptx: str, name: str) -> tuple[str, ...]:
    """The entry's parameter kinds, read from its PTX: .u64 pointers, .u32 int32 scalars."""
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError(f"no .entry {name} in the compiled PTX")
    kinds = []
    for param in re.findall(r"\.param\s+\.(\w+)", match.group(1)):
        if param not in ("u64", "u32", "b32", "s32"):
            raise RuntimeError(f"{name}: parameter type .{param} is not a pointer or an int32")
        kinds.append("ptr" if param == "u64" else "i32")
    return tuple(kinds)


@functools.lru_cache(maxsize=64)
def compile_specs(
    specs: tuple[KernelSpec, ...], arch: int, ptx_version: int | None = None
) -> tuple[CompiledKernel, ...]:
    """Every spec compiled for sm_`arch` (e.g. 121); needs Triton, neither TensorRT nor a GPU.

    Under TRITON_INTERPRET=1 (the kernels' CPU tests) this process's kernels are interpreted
    functions, which Triton cannot compile: the compilation then runs in one child process without it.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _compile_in_child(specs, arch, ptx_version)
    return tuple(_compile(spec, arch, ptx_version) for spec in specs)


def _compile(spec: KernelSpec, arch: int, ptx_version: int | None) -> CompiledKernel:
    # Triton 3.9 warns that its FP-fusion default will change; keep the JIT's current behaviour, said once.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    constants = spec.constants()
    signature = dict(spec.signature) | {name: "constexpr" for name in constants}
    kernel = getattr(importlib.import_module(spec.module), spec.kernel)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
    isa = {"ptx_version": ptx_version} if ptx_version else {}
    compiled = None
    for num_stages in range(spec.num_stages, 0, -1):  # fewer pipeline stages, less shared memory
        options = {"num_warps": spec.num_warps, "num_stages": num_stages} | isa
        with triton.knobs.compilation.scope():
            # no source-line tables: the cubins are stored in every engine, twice per plugin layer, and
            # the line info is two thirds of a cubin (87 KB -> about 30 KB for `route`)
            triton.knobs.compilation.disable_line_info = True
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        if compiled.metadata.shared <= DEFAULT_SMEM_LIMIT:
            break
    else:
        raise RuntimeError(f"{spec.kernel} needs {compiled.metadata.shared} B of shared memory, more than 48 KB")
    bad = launch_abi_problems(compiled.metadata)
    if bad:
        raise RuntimeError(f"{spec.kernel} needs launch features the plugin's launcher lacks: {bad}")
    name = compiled.metadata.name
    params = entry_params(compiled.asm["ptx"], name)
    if params[: len(spec.signature)] != tuple("ptr" if t.startswith("*") else "i32" for _, t in spec.signature):
        raise RuntimeError(f"{spec.kernel}: compiled parameters {params} do not start with its signature")
    return CompiledKernel(
        name, compiled.asm["cubin"], compiled.metadata.num_warps, compiled.metadata.shared, params, arch
    )


def _compile_in_child(specs: tuple[KernelSpec, ...], arch: int, ptx_version: int | None) -> tuple[CompiledKernel, ...]:
    request = json.dumps(dict(specs=[asdict(spec) for spec in specs], arch=arch, ptx_version=ptx_version))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", __name__], input=request, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the plugin kernels for sm_{arch} failed: {result.stderr.strip()[-2000:]}")
    return tuple(CompiledKernel.from_dict(kernel) for kernel in json.loads(result.stdout))


def _freeze(value: object) -> object:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


if __name__ == "__main__":  # the child of _compile_in_child: specs on stdin, the compiled kernels on stdout
    request = json.loads(sys.stdin.read())
    specs = tuple(KernelSpec(**{k: _freeze(v) for k, v in spec.items()}) for spec in request["specs"])
    print(json.dumps([k.to_dict() for k in compile_specs(specs, request["arch"], request["ptx_version"])]))
