"""Compare two exported graphs: same nodes, same inputs/outputs/value_info, byte-identical initializers.

Initializer order, external-data layout and node metadata (stack traces) may differ; nothing else.
Initializer bytes are compared by sha256, read from external data one tensor at a time, so this
also runs on full-width graphs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx


def initializer_digests(path: Path) -> dict[str, tuple[tuple[int, ...], int, str]]:
    """name -> (dims, data_type, sha256 of the raw bytes), reading external data tensor by tensor."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in init.external_data}
            with (path.parent / info["location"]).open("rb") as handle:
                handle.seek(int(info.get("offset", 0)))
                data = handle.read(int(info["length"]))
        else:
            data = onnx.numpy_helper.to_array(init).tobytes() if not init.raw_data else init.raw_data
        out[init.name] = (tuple(init.dims), init.data_type, hashlib.sha256(data).hexdigest())
    return out


def _structure(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    return dict(
        nodes=[n.SerializeToString() for n in model.graph.node],
        inputs=[v.SerializeToString() for v in model.graph.input],
        outputs=[v.SerializeToString() for v in model.graph.output],
        value_info=sorted(v.SerializeToString() for v in model.graph.value_info),
        opsets=sorted((o.domain, o.version) for o in model.opset_import),
    )


def graph_differences(a: Path, b: Path) -> list[str]:
    """Empty when `a` and `b` hold the same graph and the same weights."""
    problems = []
    sa, sb = _structure(a), _structure(b)
    for key in sa:
        if sa[key] != sb[key]:
            problems.append(f"{a.name}: {key} differ")
    da, db = initializer_digests(a), initializer_digests(b)
    if set(da) != set(db):
        problems.append(f"{a.name}: initializers only in one: {sorted(set(da) ^ set(db))[:5]}")
    problems += [f"{a.name}: initializer {name} differs" for name in sorted(set(da) & set(db)) if da[name] != db[name]]
    return problems
