"""What dllm-trt's IPluginV3 plugins share: reading their fields, keeping their Python objects alive, and
the kernel sets they store in an engine.

A plugin's compiled kernels are one plugin field: a marker naming the plugin, the length of what follows
(8 bytes, little-endian), then the zlib-compressed JSON of the kernels and what they were compiled for.
TensorRT stores plugin fields verbatim, twice per layer and profile, so the compression is paid back many
times (an MoE cubin set: 371 KB as JSON, about a quarter compressed); the marker lets a reader find every
stored set in an engine.
"""

from __future__ import annotations

import ctypes
import json
import zlib

import numpy as np


def pack_kernels(stored: dict, magic: bytes) -> bytes:
    data = zlib.compress(json.dumps(stored).encode(), 9)
    return magic + len(data).to_bytes(8, "little") + data


def unpack_kernels(blob: bytes, magic: bytes, offset: int = 0) -> dict:
    """The kernel set packed at `offset` of `blob` (a field, or a whole engine)."""
    if blob[offset : offset + len(magic)] != magic:
        plugin = magic.split(b".kernels")[0].removeprefix(b"dllm_trt.").decode()
        raise ValueError(f"not a {plugin} kernel set (rebuild the engine with this dllm-trt)")
    start = offset + len(magic) + 8
    size = int.from_bytes(blob[start - 8 : start], "little")
    return json.loads(zlib.decompress(blob[start : start + size]))


def kernels_in_engine(engine: bytes, magic: bytes) -> list[dict]:
    """Every kernel set with this marker an engine stores (one per plugin layer and copy TensorRT keeps)."""
    sets, offset = [], engine.find(magic)
    while offset >= 0:
        sets.append(unpack_kernels(engine, magic, offset))
        offset = engine.find(magic, offset + 1)
    return sets


def fields_of(trt, collection) -> dict:  # noqa: ANN001
    """A PluginFieldCollection as name -> str (CHAR), bytes (UNKNOWN), float (FLOAT32) or int."""
    fields = {}
    for field in collection:
        data = np.asarray(field.data)
        if field.type == trt.PluginFieldType.CHAR:
            fields[field.name] = bytes(data.astype(np.uint8)).rstrip(b"\0").decode()
        elif field.type == trt.PluginFieldType.UNKNOWN:
            fields[field.name] = bytes(data.astype(np.uint8))
        elif field.type == trt.PluginFieldType.FLOAT32:
            fields[field.name] = float(data.reshape(-1)[0])
        else:
            fields[field.name] = int(data.reshape(-1)[0])
    return fields


def immortal(plugin: object) -> object:
    """One reference more than Python will ever release: TensorRT for RTX 1.7.1.116's bindings let the
    Python object of a cloned plugin go while the builder still uses it (seen when the plugin's output
    feeds a Shape op: freed at once, then heap corruption), and a reference Python holds itself is
    freed a second time at exit. A plugin object is small; its kernels are shared between clones."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(plugin))
    return plugin


def char_field(text: str) -> np.ndarray:
    """A CHAR plugin field's array: the text, NUL-terminated."""
    return np.frombuffer(text.encode() + b"\0", np.int8).copy()
