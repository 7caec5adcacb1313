"""TensorRT itself: parse one prepared ONNX graph into a strongly typed network and build a serialized engine.

Thin on purpose: network creation and parsing with the `tensorrt` API (the ONNX bytes come from
engines.rewrite, the external weights are found next to the original file through `path`), the
builder config and the build through polygraphy (profiles, timing cache load/save, optimization
level). No precision flags: TensorRT 11 removed them (and polygraphy 0.53.6's fp16=/bf16= would
set them); the graph's dtypes and Q/DQ nodes are the precision. Everything here needs `tensorrt`.
"""

from __future__ import annotations

from pathlib import Path

from dllm_trt.errors import DllmError

NO_TENSORRT = (
    "TensorRT is not installed: 'dllm-trt build' needs the `tensorrt` Python package (pip install "
    "'dllm-trt[trt]' where NVIDIA's package index is reachable); --dry-run checks the plan without it"
)


def import_tensorrt():  # noqa: ANN201
    try:
        import tensorrt as trt
    except ImportError:
        raise DllmError(NO_TENSORRT) from None
    return trt


def support_key(trt_version: str) -> str:
    """The lint-trt support-table version for an installed TensorRT version string."""
    parts = trt_version.split(".")
    major, minor = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    if major >= 11:
        return "11.x"
    if (major, minor) >= (10, 15):
        return "10.15"
    if (major, minor) == (10, 14):
        return "10.14"
    raise DllmError(f"TensorRT {trt_version} cannot parse opset-23 Attention (added in 10.14); install 10.14 or newer")


def parse_network(model_bytes: bytes, model_path: Path):  # noqa: ANN201
    """(builder, network, parser) with the graph parsed; one line naming the node when the parser refuses."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import util as trt_util

    logger = trt_util.get_trt_logger()
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # the default (only) mode in 11
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes, str(model_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f"node '{first.node_name()}' ({first.node_operator()}): " if first is not None else ""
        detail = first.desc() if first is not None else "no error recorded"
        raise DllmError(f"TensorRT's ONNX parser rejected {model_path.name}: {where}{detail} "
                        f"({len(errors)} error(s); run 'dllm-trt lint-trt' for the whole list)")  # fmt: skip
    return builder, network, parser


def build_serialized(
    network_tuple: tuple,
    shapes: dict[str, tuple[list[int], list[int], list[int]]],
    timing_cache: Path,
    opt_level: int,
) -> bytes:
    """Build one engine with one optimization profile; the timing cache is loaded first and saved after."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.exception import PolygraphyException

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        profiles=[profile],
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
        builder_optimization_level=opt_level,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # layer names in the engine inspector
    )
    try:
        return EngineBytesFromNetwork(network_tuple, config=config, save_timing_cache=str(timing_cache))()
    except PolygraphyException as exc:
        raise DllmError(f"TensorRT failed to build the engine: {exc}") from None


def layer_report(serialized: bytes) -> str:
    """The engine inspector's JSON (which kernels TensorRT chose), for the engine directory."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import util as trt_util

    engine = trt.Runtime(trt_util.get_trt_logger()).deserialize_cuda_engine(serialized)
    inspector = engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)
