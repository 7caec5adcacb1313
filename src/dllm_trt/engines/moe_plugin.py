"""TensorRT Quick Deployable Plugin (QDP) for the ``dllm_trt::DllmMoE`` ONNX node, AOT-compiled Triton.

The node (emitted by the optimize pass; interface fixed): op_type ``DllmMoE``, domain and
attribute ``plugin_namespace`` "dllm_trt", ``plugin_version`` "1", attributes ``top_k`` (int)
and ``activation`` ("gelu_tanh"); inputs hidden [N, H] T, router_logits [N, E] fp32,
per_expert_scale [E] fp32, gate_up_proj [E, 2I, H] T, down_proj [E, H, I] T; output [N, H] T,
T in {fp32, fp16, bf16}. Semantics: ``dllm_trt.kernels.moe_triton`` (module docstring).

What an AOT QDP can express (read, not run; sources below):

* ``@trtp.aot_impl`` returns ONE ``(kernel_name, compiled_kernel, KernelLaunchParams, SymExprs)``
  per (I/O types, formats, tactic). "Presently, only PTX is supported". The launch params are a
  single grid/block/dynamic-shared-memory triple, each an int or a symbolic expression of the
  input shapes. So a plugin instance is exactly one kernel launch per enqueue. TensorRT's C++
  side (``IPluginV3QuickAOTBuild``) has ``getKernel`` and ``getLaunchParams`` and nothing else:
  no workspace, no second kernel, no cluster dimensions.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/index.html
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/tensorrt.plugin/trt_plugin_aot_impl/KernelLaunchParams.html
  https://docs.nvidia.com/deeplearning/tensorrt/11.3.0/_static/c-api/_nv_infer_python_plugin_8h.html
* Kernel arguments are (input pointers..., extra scalars..., output pointers...); the extra
  scalars are ``SymIntExprs`` of ``SymInt32`` (int32 only; TensorRT's loader rejects other
  kinds). Plugin attributes are not serialized into the engine with AOT: ``top_k`` and the
  dtypes are compiled into the PTX as Triton constexprs. Triton >= 3.3 appends two pointer
  parameters (global/profile scratch) to every kernel; per Torch-TensorRT's launch-ABI checks
  TensorRT passes null for arguments it was not given, so the kernel must report zero scratch
  (checked in ``compile_single_launch``).
  https://github.com/NVIDIA/TensorRT/tree/main/samples/python/quickly_deployable_plugins
  (README "Providing an Ahead-of-Time (AOT) implementation", qdp_defs.py circ_pad AOT) and
  Torch-TensorRT's ``py/torch_tensorrt/kernels/_triton.py`` (launch-ABI checks),
  https://docs.pytorch.org/TensorRT/tutorials/_rendered_examples/dynamo/aot_plugin.html
* The ONNX parser picks a plugin by op_type + ``plugin_namespace`` + ``plugin_version``
  (10.10+ also reads the namespace from the node's domain); other attributes become plugin
  fields. The sample adds a bool node attribute ``aot=True`` to request the AOT path; this
  plugin defines only ``aot_impl`` (no JIT ``impl``), and the QDP creator then builds the AOT
  plugin unless a strictly-JIT creation is requested (``tensorrt/plugin/_lib.py``).
* ``@trtp.autotune`` lists type/format combinations ("FP32|FP16|BF16" dependent across
  positions); ``@trtp.register`` must carry type hints (read at decoration time, so this
  module must not use ``from __future__ import annotations``).
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/pluginGuide.html

Consequence for the MoE: one launch, no scratch, an output buffer that is not zeroed. The
efficient form (``fused_moe``: route, bucket, grouped up GEMM, grouped down GEMM, combine; 5
launches) needs the reduction over experts to cross programs, which needs scratch or a zeroed
fp32 buffer. So the plugin embeds ``moe_single_launch_kernel``: each program owns an output
tile [16 tokens, 256 columns] and recomputes the up GEMM for its column slice. Correct and
deterministic, but measured on an H200 at N=256 it takes 20.4 ms against 0.43 ms for
``fused_moe`` (64x the weight-read floor; bench/bench_moe_kernel.py). The fast path inside
TensorRT needs the node split into one-kernel plugins that hand their intermediates over as
real tensors: ``_route_kernel`` (or plain ONNX Softmax/TopK), ``_bucket_kernel``,
``_expert_up_kernel`` (act [N*K, I]), ``_expert_down_kernel`` (part [N*K, H]) and an ONNX
ReduceSum over K + Cast for the combine; every one of those kernels already has the AOT shape
(inputs -> exclusive outputs, int32 scalars, no atomics). Or a C++ IPluginV3 with a workspace.

What has never run: everything that touches ``tensorrt`` here (registration, autotune, the
aot_impl callback, symbolic launch params, parsing a DllmMoE node, building or running an
engine). TensorRT cannot be installed on the machines this was written on. What has run:
``compile_single_launch`` (Triton -> sm_90 PTX with the exact signature and constexprs used
below; Triton 3.9 on a CPU machine and 3.6 on the GPU machine; tests/engines/test_moe_plugin.py),
and the kernel itself through Triton's JIT (``fused_moe_single_launch``): the interpreter on CPU,
and compiled on an H100 and an H200 (torch 2.11, Triton 3.6) against ``moe_reference``.
"""

# No `from __future__ import annotations`: tensorrt.plugin inspects these annotations as objects.

import functools
from dataclasses import dataclass

PLUGIN_NAMESPACE = "dllm_trt"
PLUGIN_NAME = "DllmMoE"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
ACTIVATION = "gelu_tanh"
TRITON_DTYPES = ("fp32", "fp16", "bf16")
# Whether TensorRT raises cudaFuncAttributeMaxDynamicSharedMemorySize for AOT kernels is not
# documented, so stay within the 48 KB every launch gets without it.
DEFAULT_SMEM_LIMIT = 48 * 1024

_registered = False


@dataclass(frozen=True)
class CompiledKernel:
    """What TensorRT needs from Triton: name, PTX, threads per block, dynamic shared memory, tiles."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    blocks: tuple[tuple[str, int], ...]

    def block(self, key: str) -> int:
        return dict(self.blocks)[key]


def register_moe_plugin(ptx_version: int | None = None) -> None:
    """Register ``dllm_trt::DllmMoE`` with TensorRT (idempotent). Call before parsing the ONNX graph.

    ``ptx_version`` (e.g. 88 for PTX ISA 8.8) caps the PTX ISA Triton emits: Triton targets its
    bundled ptxas, which can be newer than the GPU driver, and the driver then refuses the PTX
    when the engine loads.
    """
    global _registered
    _, trtp = _import_tensorrt()
    if _registered:
        return
    _define_plugin(trtp, ptx_version)
    _registered = True


def _import_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise RuntimeError(
            "TensorRT is not installed: registering the dllm_trt::DllmMoE plugin needs the `tensorrt` "
            "Python package with tensorrt.plugin.aot_impl (pip install 'dllm-trt[trt]' where NVIDIA's "
            "package index is reachable)"
        ) from exc
    if not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; upgrade TensorRT")
    return trt, trtp


def triton_dtype(trt_dtype_name: str) -> str:
    """Triton element type for a ``trt.DataType`` name (FLOAT, HALF, BF16)."""
    names = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}
    if trt_dtype_name not in names:
        raise ValueError(f"DllmMoE supports FLOAT, HALF, BF16 activations/weights, got {trt_dtype_name}")
    return names[trt_dtype_name]


def _kernel_signature(dtype: str) -> dict[str, str]:
    # TensorRT's argument order: input pointers, int32 extras, output pointers.
    return {
        "hidden_ptr": f"*{dtype}",
        "logits_ptr": "*fp32",
        "scale_ptr": "*fp32",
        "gate_up_ptr": f"*{dtype}",
        "down_ptr": f"*{dtype}",
        "n_tokens": "i32",
        "out_ptr": f"*{dtype}",
    }


@functools.lru_cache(maxsize=16)
def compile_single_launch(
    dtype: str,
    n_experts: int,
    hidden_size: int,
    width: int,
    top_k: int,
    target: object = None,
    ptx_version: int | None = None,
) -> CompiledKernel:
    """Compile ``moe_single_launch_kernel`` to PTX (no TensorRT needed; ``target`` None = this GPU)."""
    import triton

    from dllm_trt.kernels import moe_triton

    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype must be one of {TRITON_DTYPES}, got {dtype}")
    blocks = moe_triton.single_launch_blocks(hidden_size, width, 4 if dtype == "fp32" else 2)
    constexprs = dict(
        E=n_experts, E_P=triton.next_power_of_2(n_experts), H=hidden_size, I=width, TOP_K=top_k,
        UPCAST=dtype == "fp32", **blocks,
    )  # fmt: skip
    signature = _kernel_signature(dtype) | {name: "constexpr" for name in constexprs}
    source = triton.compiler.ASTSource(
        fn=moe_triton.moe_single_launch_kernel, signature=signature, constexprs=constexprs
    )
    compiled = None
    isa = {"ptx_version": ptx_version} if ptx_version else {}
    for num_stages in (3, 2, 1):  # fewer pipeline stages, less shared memory
        options = {"num_warps": 4, "num_stages": num_stages} | isa
        compiled = triton.compile(source, target=target, options=options)
        if compiled.metadata.shared <= DEFAULT_SMEM_LIMIT:
            break
    else:
        raise RuntimeError(f"moe_single_launch_kernel needs {compiled.metadata.shared} B of shared memory")
    _check_launch_abi(compiled.metadata)
    return CompiledKernel(
        name=compiled.metadata.name,
        ptx=compiled.asm["ptx"],
        num_warps=compiled.metadata.num_warps,
        shared_mem=compiled.metadata.shared,
        blocks=tuple(sorted(blocks.items())),
    )


def _check_launch_abi(metadata: object) -> None:
    from dllm_trt.engines.triton_aot import launch_abi_problems

    bad = launch_abi_problems(metadata)
    if bad:
        raise RuntimeError(f"moe_single_launch_kernel needs launch features TensorRT AOT plugins lack: {bad}")


def _constant(dim: object, what: str) -> int:
    # Weight shapes are build-time constants in an engine; a dynamic one cannot become a constexpr.
    if getattr(dim, "is_fake", False) or not dim.is_constant:
        raise ValueError(f"DllmMoE needs a static {what}; got a dynamic dimension")
    return int(dim.constant_value())


def _attrs_in_order(top_k: object, activation: object) -> tuple[int, str]:
    # TensorRT's AOT path passes every attribute positionally in the order of the node's fields,
    # not by name (tensorrt/plugin/_plugin_class.py get_launch_params), so accept either order.
    if isinstance(top_k, str):
        top_k, activation = activation, top_k
    return int(top_k), str(activation)


def _define_plugin(trtp, ptx_version: int | None) -> None:
    @trtp.register(PLUGIN_ID)
    def _desc(
        hidden: trtp.TensorDesc,
        router_logits: trtp.TensorDesc,
        per_expert_scale: trtp.TensorDesc,
        gate_up_proj: trtp.TensorDesc,
        down_proj: trtp.TensorDesc,
        top_k: int,
        activation: str,
    ) -> trtp.TensorDesc:
        return hidden.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, outputs):
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 3, 4, 5], "FP32|FP16|BF16")  # hidden, gate_up, down, out share T
        combo.pos([1, 2], "FP32")  # router logits and scales stay fp32
        return [combo]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot_impl(
        hidden, router_logits, per_expert_scale, gate_up_proj, down_proj, top_k, activation, outputs, tactic
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        top_k, activation = _attrs_in_order(top_k, activation)
        if activation != ACTIVATION:
            raise ValueError(f"DllmMoE supports activation={ACTIVATION!r}, got {activation!r}")
        n_experts = _constant(gate_up_proj.shape_expr[0], "expert count")
        width = _constant(down_proj.shape_expr[2], "expert width")
        hidden_size = _constant(down_proj.shape_expr[1], "hidden size")
        kernel = compile_single_launch(
            triton_dtype(hidden.dtype.name), n_experts, hidden_size, width, top_k, ptx_version=ptx_version
        )
        n_tokens = hidden.shape_expr[0]  # dynamic: the only runtime scalar
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n_tokens, kernel.block("BT"))
        launch.grid_y = -(-hidden_size // kernel.block("BH"))
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_mem
        extra_args = trtp.SymIntExprs(1)
        extra_args[0] = trtp.SymInt32(n_tokens)
        return kernel.name, kernel.ptx, launch, extra_args
