"""The manifest every stage writes beside its artifacts, and the checks a later stage makes on it.

A stage directory is self-describing: which checkpoint (content hash), which model config, which
tools, and every graph input/output with dtype, shape and which axes are dynamic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import onnx
import onnx_ir as ir

from dllm_trt.contract import MANIFEST, MANIFEST_FORMAT
from dllm_trt.errors import DllmError

FORMAT = MANIFEST_FORMAT
_TOOLS = ("dllm-trt", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "polygraphy")


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def describe_value(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape, dynamic = [], {}
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(dim.dim_param or "?")
            dynamic[str(axis)] = dim.dim_param or "?"
    return dict(
        name=value.name,
        dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        if tensor.elem_type != onnx.TensorProto.BFLOAT16
        else "bfloat16",
        shape=shape,
        dynamic_axes=dynamic,
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def external_data_entries(files: list[Path]) -> list[dict]:
    return [dict(file=f.name, bytes=f.stat().st_size, sha256=file_sha256(f)) for f in files]


def describe_graph(path: Path, external_data: list[dict]) -> dict:
    """The manifest entry of one graph; `external_data` as external_data_entries() gives it."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(
        file=path.name,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
        external_data=external_data,
        inputs=[describe_value(v) for v in graph.input],
        outputs=[describe_value(v) for v in graph.output],
        nodes=len(graph.node),
    )


def check_external_data(path: Path) -> list[Path]:
    """External data must sit beside the graph under a relative path, and the checker must accept it."""
    model = onnx.load(str(path), load_external_data=False)
    files = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in init.external_data if e.key == "location")
            if Path(location).is_absolute() or ".." in Path(location).parts:
                raise DllmError(f"{path.name} points at external data outside its directory: {location}")
            files.add(path.parent / location)
    for file in files:
        if not file.is_file():
            raise DllmError(f"{path.name} refers to missing external data {file.name}")
    onnx.checker.check_model(str(path), full_check=False)
    return sorted(files)


def save_graphs(graphs: dict[str, ir.Model], directory: Path, files: dict[str, str]) -> dict[str, dict]:
    """Write each graph as `files[name]` with its external data beside it; returns their manifest entries."""
    described = {}
    for name, model in graphs.items():
        path = directory / files[name]
        for old in directory.glob(f"{path.name}*"):
            old.unlink()
        ir.save(model, str(path), external_data=f"{path.name}.data")
        described[name] = describe_graph(path, external_data_entries(check_external_data(path)))
    return described


def write_manifest(directory: Path, manifest: dict) -> None:
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: Path, stage: str | None = None) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise DllmError(f"{directory} does not exist; pass a directory written by 'dllm-trt export'")
    if not path.is_file():
        raise DllmError(f"{directory} has no {MANIFEST}; pass a directory written by 'dllm-trt export' or 'optimize'")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DllmError(f"{path} is not valid JSON ({exc}); re-run the stage that wrote it") from None
    if manifest.get("format") != FORMAT:
        raise DllmError(f"{path} has format {manifest.get('format')!r}, this dllm-trt reads {FORMAT!r}; re-run export")
    if stage is not None and manifest.get("stage") != stage:
        raise DllmError(f"{directory} was written by '{manifest.get('stage')}', this step needs the '{stage}' output")
    return manifest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_abandoned_siblings(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` that killed runs left (their process is gone), saying so.

    A run killed with SIGKILL cannot clean up, and its sibling holds everything written so far (tens of GB
    at the released size); a sibling whose process still runs belongs to a concurrent run and stays."""
    removed = []
    for path in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            print(f"dllm-trt: removed {path.name}, left by a run that was killed (process {pid} is gone)",
                  file=sys.stderr)  # fmt: skip
    return removed


@contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `out` only when the stage succeeded.

    Nothing half-written is ever left at `out`: on any failure the temporary directory goes away.
    """
    if out.exists() and not out.is_dir():
        raise DllmError(f"output {out} exists and is a file; pick another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DllmError(f"output directory {out} exists and is not empty; remove it, pick another -o, or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_siblings(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
