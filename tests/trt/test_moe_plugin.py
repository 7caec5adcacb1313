"""The dllm_trt::DllmMoE plugin, built into real engines by TensorRT for RTX on this CPU.

What runs here: the plugin's build-time callbacks inside a real builder (TensorRT for RTX, ahead of
time for sm_121 and sm_89, no GPU), the kernels it compiles and stores in the engine, the workspace
it asks for, and its refusals. Its enqueue is trt.moe_plugin.launch_moe, tested in
test_moe_launch.py (interpreted here, through the CUDA driver on a GPU); the kernels' arithmetic is the
plan that tests/kernels proves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dllm_trt.kernels.moe_launches import MoEShape, kernel_specs, workspace_layout
from dllm_trt.trt.moe_plugin import kernels_in_engine
from dllm_trt.trt.trt_library import TENSORRT_RTX, installed

needs_rtx = pytest.mark.skipif(not installed(TENSORRT_RTX), reason="TensorRT for RTX is not installed (the rtx extra)")
E, H, I, K = 6, 40, 24, 2  # noqa: E741  odd sizes: no power of two, H not a multiple of the tiles
ONNX_TYPES = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16, "fp32": TensorProto.FLOAT}
NP_TYPES = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}


def moe_graph(dtype: str, weight_dtype: str | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    t, w = ONNX_TYPES[dtype], NP_TYPES[weight_dtype or dtype]
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, E).astype(np.float32), "scale"),
        numpy_helper.from_array(rng.standard_normal((E, 2 * I, H)).astype(w), "gate_up"),
        numpy_helper.from_array(rng.standard_normal((E, H, I)).astype(w), "down"),
    ]
    node = helper.make_node(
        "DllmMoE", ["x", "logits", "scale", "gate_up", "down"], ["y"], name="moe", domain="dllm_trt",
        top_k=K, activation="gelu_tanh", plugin_namespace="dllm_trt", plugin_version="1",
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", t, ["n", H]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", E])],
        [helper.make_tensor_value_info("y", t, ["n", H])], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 23), helper.make_opsetid("dllm_trt", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _build(model: onnx.ModelProto, sm: tuple[int, int]) -> bytes:
    """The engine, built in a child process: a builder crash must not take the test run with it."""
    code = f"""
        import sys, onnx
        from dllm_trt.trt.trt_library import load_library
        from dllm_trt.trt.moe_plugin import register_moe_plugin
        lib = load_library("tensorrt-rtx"); trt = lib.trt
        register_moe_plugin(trt, arch={sm[0] * 10 + sm[1]})
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger); network = builder.create_network(0); parser = trt.OnnxParser(network, logger)
        assert parser.parse(open(sys.argv[1], "rb").read()), parser.get_error(0).desc()
        config = builder.create_builder_config(); lib.configure_target(config, {sm})
        profile = builder.create_optimization_profile()
        profile.set_shape("x", (1, {H}), (16, {H}), (64, {H}))
        profile.set_shape("logits", (1, {E}), (16, {E}), (64, {E}))
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            sys.exit(3)
        open(sys.argv[2], "wb").write(bytes(engine))
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/m.onnx")
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), f"{tmp}/m.onnx", f"{tmp}/e"],
                                capture_output=True, text=True, timeout=300,
                                env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
        if result.returncode == 3:
            return b""
        assert result.returncode == 0, result.stderr[-3000:]
        return open(f"{tmp}/e", "rb").read()


def stored_kernels(engine: bytes) -> dict:
    """The plugin's kernel field as the engine stores it (TensorRT keeps plugin fields verbatim)."""
    sets = kernels_in_engine(engine)
    assert sets and all(s == sets[0] for s in sets)
    return sets[0]


@needs_rtx
@pytest.mark.parametrize("dtype, sm", [("bf16", (12, 1)), ("fp32", (12, 1)), ("fp16", (8, 9))])
def test_the_engine_carries_the_plans_kernels_compiled_for_its_target(dtype, sm):
    import base64

    engine = _build(moe_graph(dtype), sm)
    assert engine, "the builder refused a DllmMoE graph"
    stored = stored_kernels(engine)
    arch = sm[0] * 10 + sm[1]
    assert stored["shape"] == dict(dtype=dtype, experts=E, hidden=H, width=I, top_k=K, weight_format="float")
    specs = kernel_specs(MoEShape(**stored["shape"]), stored["bm"])
    assert set(stored["kernels"]) == set(specs) == {"route", "bucket", "up", "down", "combine"}
    for stage, kernel in stored["kernels"].items():
        cubin = base64.b64decode(kernel["cubin"])
        assert cubin[:4] == b"\x7fELF" and kernel["name"].encode() in cubin  # a loadable image with its entry
        assert b"debug_line" not in cubin  # no line tables: the engine stores every cubin several times
        assert kernel["arch"] == arch
        own = tuple("ptr" if kind.startswith("*") else "i32" for _, kind in specs[stage].signature)
        assert tuple(kernel["params"][: len(own)]) == own  # the launcher's argument order is the plan's
        assert set(kernel["params"][len(own) :]) <= {"ptr"}  # only Triton's scratch pointers follow
    print(f"{dtype} sm_{arch}: engine {len(engine)} B, kernels {sorted(stored['kernels'])}, bm {stored['bm']}")


@needs_rtx
def test_weights_of_another_dtype_than_the_activations_are_refused_by_the_builder():
    """supports_format_combination takes the graph's own dtypes only, and they must agree."""
    assert _build(moe_graph("bf16", weight_dtype="fp32"), (12, 1)) == b""


def test_the_workspace_holds_every_intermediate_at_the_largest_token_count():
    shape = MoEShape("bf16", E, H, I, K)
    offsets, size = workspace_layout(shape, 64)
    assert list(offsets) == ["topk_ids", "topk_w", "sorted", "counts", "act", "part"]
    assert all(offset % 256 == 0 for offset in offsets.values())
    a = 64 * K
    assert size >= (a * 4 + a * 4 + E * 64 * 4 + E * 4 + a * I * 4 + a * H * 4)
    assert workspace_layout(shape, 1)[1] < size  # a smaller call fits inside


def _rtx_plugin_class():
    from dllm_trt.trt.moe_plugin import plugin_classes
    from dllm_trt.trt.trt_library import load_library

    trt = load_library(TENSORRT_RTX).trt
    return trt, plugin_classes(trt)[0]


@needs_rtx
def test_a_plugin_without_kernels_refuses_to_run_without_raising_into_tensorrt(capfd):
    _, plugin_class = _rtx_plugin_class()
    plugin = plugin_class(K, "gelu_tanh", arch=None, ptx_version=None)
    assert plugin.enqueue([], [], [], [], 0, 0) == 1  # a status TensorRT reports, not an exception it swallows
    assert "carries no compiled kernels" in capfd.readouterr().err
    with pytest.raises(ValueError, match="implements activation 'gelu_tanh'"):
        plugin_class(K, "silu", arch=None, ptx_version=None)


SHAPE = MoEShape("bf16", E, 48, 32, K)  # bf16 experts [E, 2I, H] = [6, 64, 48]
ARCH = 121


@pytest.fixture(scope="module")
def compiled_by_rows() -> dict:
    """The plan's kernels for SHAPE at every block size the plugin can pick (one compilation serves all)."""
    from dllm_trt.trt.moe_plugin import BLOCK_ROWS, kernels_for

    return {bm: kernels_for(SHAPE, bm, ARCH) for bm in BLOCK_ROWS}


def test_kernels_for_gives_each_stage_its_own_kernel_at_every_block_size(compiled_by_rows):
    """route, bucket and combine do not depend on the block rows, so the compiled set has fewer kernels than
    stages x block sizes: each stage must still get its own (a misaligned map once gave bm 32 and 64 the
    up kernel as `route` and no `combine` at all)."""
    for bm, kernels in compiled_by_rows.items():
        specs = kernel_specs(SHAPE, bm)
        assert {stage: k.name for stage, k in kernels.items()} == {s: spec.kernel for s, spec in specs.items()}
    assert compiled_by_rows[16]["route"].cubin == compiled_by_rows[64]["route"].cubin
    assert len({compiled_by_rows[bm]["up"].cubin for bm in compiled_by_rows}) == 3


def _descs(trt, opt_tokens: int) -> list:
    """configure_plugin's inputs for SHAPE's node, with the profile's opt token count (the block rows follow it)."""

    def desc(dims, dtype, rows=None):  # noqa: ANN001, ANN202
        d = trt.DynamicPluginTensorDesc()
        d.desc.dims, d.desc.type = trt.Dims(dims), dtype
        if rows is not None:
            d.min, d.opt, d.max = (trt.Dims([n, *dims[1:]]) for n in rows)
        return d

    e, h, i = SHAPE.experts, SHAPE.hidden, SHAPE.width
    return [desc([-1, h], trt.bfloat16, (1, opt_tokens, 256)), desc([-1, e], trt.float32, (1, opt_tokens, 256)),
            desc([e], trt.float32), desc([e, 2 * i, h], trt.bfloat16), desc([e, h, i], trt.bfloat16)]  # fmt: skip


@needs_rtx
def test_serialized_fields_carry_the_kernels_of_the_block_rows_they_name_in_every_order(compiled_by_rows):
    """configure, clone and serialize in every order, reconfigured to other block rows (opt 16 -> bm 16,
    96 -> 32, 192 -> 64): each serialized field set names the plugin's block rows and holds exactly the
    kernels compiled for them; a plugin made from stored fields (run time, no target) keeps them."""
    import base64

    from dllm_trt.trt.moe_plugin import unpack_kernels
    from dllm_trt.trt.plugin_fields import fields_of

    trt, plugin_class = _rtx_plugin_class()

    def new():  # noqa: ANN202
        return plugin_class(K, "gelu_tanh", arch=ARCH, ptx_version=None)

    def stored(plugin) -> bytes:  # noqa: ANN001
        return fields_of(trt, plugin.get_fields_to_serialize())["kernels"]

    def check(plugin, bm: int) -> bytes:  # noqa: ANN001
        blob = stored(plugin)
        kernels = unpack_kernels(blob)
        assert plugin.bm == kernels["bm"] == bm
        for stage, kernel in compiled_by_rows[bm].items():
            assert base64.b64decode(kernels["kernels"][stage]["cubin"]) == kernel.cubin, (stage, bm)
        return blob

    a = new()
    a.configure_plugin(_descs(trt, 16), [])
    check(a, 16)  # configure -> serialize
    b = a.clone()
    b.configure_plugin(_descs(trt, 96), [])
    check(b, 32)  # ... -> clone -> reconfigure -> serialize
    check(a, 16)  # the original is untouched
    c = new()
    c.configure_plugin(_descs(trt, 16), [])
    d = c.clone()
    check(d, 16)  # configure -> clone -> serialize
    d.configure_plugin(_descs(trt, 192), [])
    check(d, 64)  # ... -> reconfigure after serializing: the cached fields are not reused
    e = new()
    assert "kernels" not in fields_of(trt, e.get_fields_to_serialize())  # nothing configured: nothing to store
    f = e.clone()
    f.configure_plugin(_descs(trt, 96), [])
    check(f, 32)  # serialize -> clone -> configure -> serialize
    e.configure_plugin(_descs(trt, 192), [])
    check(e, 64)  # serialize -> configure -> serialize
    runtime = plugin_class(K, "gelu_tanh", arch=None, ptx_version=None, kernels=check(b, 32))
    assert check(runtime.clone(), 32) == check(runtime, 32)  # no target at run time: the stored kernels stay


def test_compiled_entries_declare_their_parameters():
    from dllm_trt.trt.triton_aot import entry_params

    ptx = ".visible .entry _k(\n .param .u64 .ptr .global .align 1 _k_param_0,\n .param .u32 _k_param_1\n)\n{"
    assert entry_params(ptx, "_k") == ("ptr", "i32")
    with pytest.raises(RuntimeError, match="no .entry _other"):
        entry_params(ptx, "_other")
    with pytest.raises(RuntimeError, match="not a pointer or an int32"):
        entry_params(".entry _k(\n .param .f64 _k_param_0\n)", "_k")
