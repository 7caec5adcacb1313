"""Write a graph's initializers to external-data shards, one tensor (and one chunk) at a time, resumably.

Tensors go to shard files in graph order, packed densely, a new shard when the next tensor would
pass `max_shard_bytes` (a tensor larger than that gets a shard of its own). Each shard is written
to `<file>.partial`, hashed while written, synced and renamed, then recorded in the journal: an
interrupted export finds its finished shards there and does not write them again. Lazy
checkpoint weights are read chunk by chunk, so memory holds one chunk, not one graph.

Initializers of at most `INLINE_MAX_BYTES` stay in the graph file, as the in-memory export keeps them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from dllm_trt.export.journal import Journal
from dllm_trt.export.weights import CheckpointWeight, tensor_bytes
from dllm_trt.progress import Progress

INLINE_MAX_BYTES = 256  # onnx_ir.save's threshold: the in-memory export inlines initializers up to this size
DEFAULT_SHARD_BYTES = 2 << 30


@dataclass
class Shard:
    file: str
    values: list[ir.Value] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class WrittenFile:
    file: str
    bytes: int
    sha256: str
    resumed: bool


def plan_shards(graph: ir.Graph, stem: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Shard]:
    """Which external initializer goes to which file at which offset; deterministic for a given graph."""
    shards: list[Shard] = []
    for value in graph.initializers.values():
        size = value.const_value.nbytes
        if size <= INLINE_MAX_BYTES or isinstance(value.const_value, ir.ExternalTensor):
            continue  # inline, or already on disk (a weight another graph of the export wrote)
        if not shards or (shards[-1].values and shards[-1].nbytes + size > max_shard_bytes):
            shards.append(Shard(file=""))
        shard = shards[-1]
        shard.values.append(value)
        shard.offsets.append(shard.nbytes)
        shard.nbytes += size
    for number, shard in enumerate(shards, start=1):
        shard.file = f"{stem}.onnx.data" if len(shards) == 1 else f"{stem}-{number:05d}-of-{len(shards):05d}.onnx.data"
    return shards


def plan_fingerprint(shards: list[Shard]) -> str:
    """sha256 over every external tensor's file, offset, name, dtype, shape and where its bytes come from."""
    digest = hashlib.sha256()
    for shard in shards:
        for value, offset in zip(shard.values, shard.offsets):
            tensor = value.const_value
            if isinstance(tensor, CheckpointWeight):
                origin = tensor.recipe.describe()
            else:  # small constants the optimizer made or read eagerly: hash their bytes
                origin = hashlib.sha256(tensor.tobytes()).hexdigest()
            digest.update(f"{shard.file}|{offset}|{value.name}|{tensor.dtype}|{tensor.shape}|{origin}\n".encode())
    return "sha256:" + digest.hexdigest()


def _pieces(tensor: ir.TensorProtocol) -> Iterator[memoryview | bytes]:
    if isinstance(tensor, CheckpointWeight):
        for chunk in tensor.recipe.chunks():
            yield tensor_bytes(chunk)
    else:
        yield tensor.tobytes()


def write_shards(
    graph: ir.Graph,
    name: str,
    shards: list[Shard],
    directory: Path,
    journal: Journal,
    progress: Progress,
) -> list[WrittenFile]:
    """Write (or find finished) every shard, then point each initializer at its bytes on disk."""
    journal.start_graph(name, plan_fingerprint(shards))
    todo = [s for s in shards if journal.finished(name, s.file, directory) is None]
    meter = (
        progress.bytes(sum(s.nbytes for s in todo), f"{name}: {len(todo)} of {len(shards)} file(s) to write")
        if todo
        else None
    )
    written = []
    for shard in shards:
        entry = journal.finished(name, shard.file, directory)
        if entry is None:
            entry = _write_shard(shard, directory, meter.advance)
            journal.finish(name, shard.file, entry["bytes"], entry["sha256"])
            written.append(WrittenFile(shard.file, entry["bytes"], entry["sha256"], resumed=False))
        else:
            written.append(WrittenFile(shard.file, entry["bytes"], entry["sha256"], resumed=True))
        for value, offset in zip(shard.values, shard.offsets):
            tensor = value.const_value
            value.const_value = ir.ExternalTensor(
                shard.file, offset, tensor.nbytes, tensor.dtype, shape=tensor.shape, name=value.name,
                base_dir=directory,
            )  # fmt: skip
    if meter is not None:
        meter.finish()
    return written


def _write_shard(shard: Shard, directory: Path, advance) -> dict:  # noqa: ANN001
    partial = directory / f"{shard.file}.partial"
    digest = hashlib.sha256()
    with partial.open("wb") as handle:
        for value, offset in zip(shard.values, shard.offsets):
            assert handle.tell() == offset, (value.name, handle.tell(), offset)
            for piece in _pieces(value.const_value):
                handle.write(piece)
                digest.update(piece)
                advance(len(piece))
        handle.flush()
        os.fsync(handle.fileno())  # the journal must never list a file whose bytes are still in flight
    os.replace(partial, directory / shard.file)
    return dict(bytes=shard.nbytes, sha256="sha256:" + digest.hexdigest())
