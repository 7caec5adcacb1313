"""Copies of artifact directories with one weight scaled: the silent corruptions parity checks must catch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from dllm_trt.manifest import read_manifest, save_graphs, write_manifest


def scaled_copy(source: Path, out: Path, weight: str, factor: float, index: int | None = None) -> Path:
    """`source` copied to `out` with every initializer named `weight` (under any pass's suffixes) times `factor`
    (only its entry `index` along axis 0 when given: one expert's), saved as a stage saves (manifest rewritten)."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data", "manifest.json"))
    manifest = read_manifest(source)
    files = {name: entry["file"] for name, entry in manifest["graphs"].items()}
    graphs = {name: ir.load(str(source / file)) for name, file in files.items()}
    touched = 0
    for model in graphs.values():
        for value in model.graph.initializers.values():
            if value.name == weight or value.name.startswith(weight + "."):
                array = value.const_value.numpy()
                scaled = array.astype(np.float32)
                if index is None:
                    scaled *= factor
                else:
                    scaled[index] *= factor
                value.const_value = ir.tensor(scaled.astype(array.dtype), name=value.name)
                touched += 1
    assert touched, f"no initializer named {weight}"
    manifest["graphs"] = save_graphs(graphs, out, files)
    write_manifest(out, manifest)
    return out
