"""`dllm-trt inspect ARTIFACTS`: verify every checksum the manifest lists and summarize the graphs.

Works on any stage directory whose manifest lists graphs (export, optimize). Checksums are
recomputed from the files (streamed, with byte progress); a mismatch or a missing file is a
failure that names the file.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dllm_trt.manifest import read_manifest
from dllm_trt.progress import ByteProgress, human_bytes


@dataclass
class Inspection:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one per bad file, naming it

    @property
    def ok(self) -> bool:
        return not self.problems


def _listed_files(manifest: dict) -> list[dict]:
    """Every file the graphs list, once (graphs share external data files)."""
    files: dict[str, dict] = {}
    for graph in manifest.get("graphs", {}).values():
        files.setdefault(graph["file"], dict(file=graph["file"], bytes=graph.get("bytes"), sha256=graph.get("sha256")))
        for entry in graph.get("external_data", []):
            files.setdefault(entry["file"], entry)
    return list(files.values())


def verify_checksums(directory: Path, manifest: dict, quiet: bool = False) -> list[str]:
    """Problems, one line per listed file that is missing, of the wrong size or of another sha256."""
    listed = _listed_files(manifest)
    present = [e for e in listed if (directory / e["file"]).is_file()]
    meter = ByteProgress(sum((directory / e["file"]).stat().st_size for e in present), "verifying", quiet=quiet)
    problems = []
    for entry in listed:
        path = directory / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
            continue
        size = path.stat().st_size
        if entry.get("bytes") is not None and size != entry["bytes"]:
            problems.append(f"{entry['file']}: {size} bytes, the manifest lists {entry['bytes']}")
            meter.advance(size)
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
                meter.advance(len(chunk))
        found = "sha256:" + digest.hexdigest()
        if entry.get("sha256") and found != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 {found[:23]}…, the manifest lists {entry['sha256'][:23]}…")
    if listed:
        meter.finish()
    return problems


def _shape(value: dict) -> str:
    return "[" + ", ".join(str(d) for d in value["shape"]) + "]"


def summarize(directory: Path, manifest: dict) -> list[str]:
    checkpoint = manifest.get("checkpoint", {})
    model = manifest.get("model", {})
    lines = [
        f"{directory}: {manifest.get('stage', '?')} stage, opset {manifest.get('opset', '?')}, "
        f"dtype {model.get('dtype', '?')}",
        f"checkpoint {checkpoint.get('hash', '?')}"
        + (f" ({checkpoint['dtype']})" if checkpoint.get("dtype") else "")
        + (f"  {checkpoint['path']}" if checkpoint.get("path") else ""),
    ]
    for name, graph in manifest.get("graphs", {}).items():
        external = graph.get("external_data", [])
        lines.append(
            f"{graph['file']} ({name}): {graph.get('nodes', '?')} nodes, graph {human_bytes(graph.get('bytes', 0))}, "
            f"external data {human_bytes(sum(e['bytes'] for e in external))} in {len(external)} file(s)"
        )
        for kind in ("inputs", "outputs"):
            for value in graph.get(kind, []):
                dynamic = value.get("dynamic_axes") or {}
                axes = f"  dynamic {', '.join(f'{k}: {v}' for k, v in dynamic.items())}" if dynamic else ""
                lines.append(f"    {kind[:-1]:<6} {value['name']:<22} {value['dtype']:<8} {_shape(value)}{axes}")
        path = directory / graph["file"]
        if path.is_file() and path.suffix == ".onnx":  # an engine directory lists its engines here
            ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
            lines.append("    ops    " + ", ".join(f"{op} {count}" for op, count in ops.most_common()))
    parity = manifest.get("parity")
    if parity and parity.get("mode") == "per-layer":
        verdict = "passed" if parity.get("passed") else "FAILED"
        first = parity.get("first_divergent_layer")
        where = (
            "every layer within its bound"
            if first is None
            else (f"first divergent layer {first} ({parity.get('first_divergent_block')})")
        )
        lines.append(f"parity {verdict}, layer by layer ({parity.get('dtype', '?')}): {where}")
        lines += [f"    {failure}" for failure in parity.get("failures", [])]
    elif parity:
        comparisons = parity.get("comparisons", [])
        passed = sum(c["passed"] for c in comparisons)
        verdict = "passed" if parity.get("passed") else "FAILED"
        lines.append(
            f"parity {verdict}: {passed}/{len(comparisons)} within tolerance ({parity.get('dtype', '?')}, "
            f"context {parity.get('context', '?')}, seed {parity.get('seed', '?')})"
        )
        if parity.get("note"):
            lines.append(f"    {parity['note']}")
        for c in comparisons:
            argmax = "" if c.get("argmax_agreement") is None else f"  argmax {100 * c['argmax_agreement']:.2f}%"
            mark = "ok  " if c["passed"] else "FAIL"
            lines.append(f"    {mark} {c['name']:<38} max rel {c['max_rel']:.2e}{argmax}")
    elif manifest.get("parity_skipped"):
        lines.append(manifest["parity_skipped"])
    else:
        lines.append("parity not measured")
    return lines


def inspect_artifacts(directory: Path, quiet: bool = False) -> Inspection:
    manifest = read_manifest(directory)
    result = Inspection(lines=summarize(directory, manifest))
    result.problems = verify_checksums(directory, manifest, quiet=quiet)
    count = len(_listed_files(manifest))
    result.lines.append(
        f"checksums: {count - len(result.problems)}/{count} file(s) verified"
        + ("" if result.ok else f"; MISMATCH: {'; '.join(result.problems)}")
    )
    return result


def print_inspection(result: Inspection) -> None:
    print("\n".join(result.lines))
    for problem in result.problems:
        print(f"dllm-trt: checksum mismatch: {problem}", file=sys.stderr)
