"""The package's parts import one way (DESIGN.md, "Shape of the package"), every import counted,
lazy ones inside functions too: cli -> demo -> stages -> leaves. A stage imports no other stage: what two
stages share lives in a leaf (the loop and its Steps, parity, the TensorRT plumbing)."""

from __future__ import annotations

import ast
from pathlib import Path

import dllm_trt

ROOT = Path(dllm_trt.__file__).parent
STAGES = {"export", "optimize", "engines", "runtime", "validate", "serve"}
LEAVES = {"contract", "errors", "manifest", "progress", "models", "kernels", "generation", "parity", "trt", "assets"}
TOP = {"cli", "demo"}


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py")


def _module(path: Path) -> list[str]:
    parts = ["dllm_trt", *path.relative_to(ROOT).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def import_edges() -> dict[str, set[str]]:
    """part -> the other parts it imports, from every import statement of every module."""
    parts = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        part, module = _part(path), _module(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module if path.name == "__init__.py" else module[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                bits = name.split(".")
                if bits[0] == "dllm_trt" and len(bits) > 1 and bits[1] in parts and bits[1] != part:
                    edges.setdefault(part, set()).add(bits[1])
    return edges


def test_no_part_of_the_package_imports_one_that_imports_it_back():
    edges = import_edges()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(part for part in edges if part in reachable(part))
    assert not cycles, f"parts in an import cycle: {cycles}; edges: {edges}"


def test_imports_point_down_the_layers():
    edges = import_edges()
    assert not edges.get("contract"), f"contract must import nothing of dllm_trt, imports {edges['contract']}"
    for leaf in LEAVES:
        above = edges.get(leaf, set()) & (STAGES | TOP)
        assert not above, f"{leaf} is a leaf but imports {sorted(above)}"
    for stage in STAGES:
        above = edges.get(stage, set()) & TOP
        assert not above, f"the {stage} stage imports {sorted(above)}"
        beside = edges.get(stage, set()) & STAGES
        assert not beside, f"the {stage} stage imports the stage(s) {sorted(beside)}: move what they share into a leaf"
    assert "demo" not in set().union(*edges.values()) - edges.get("cli", set()) or all(
        "demo" not in targets for part, targets in edges.items() if part != "cli"
    )
    # the import graph is not trivially empty: the check would pass vacuously otherwise
    assert {"export", "optimize", "runtime", "validate", "engines", "serve"} <= edges["cli"]


def test_every_part_is_a_stage_a_leaf_or_the_top():
    parts = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert parts - {"__init__"} <= STAGES | LEAVES | TOP, f"unclassified parts: {parts - STAGES - LEAVES - TOP}"


def test_package_file_maps_match_their_folders():
    """Each package's docstring names its modules, one a line (`name.py  what it holds`): every module is
    named, and every named module exists."""
    import re

    for init in sorted(ROOT.glob("*/__init__.py")):
        folder = init.parent
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        named = set(re.findall(r"(?<![/\w])([a-z_]+\.py)\b", doc))
        present = {p.name for p in folder.glob("*.py")} - {"__init__.py"}
        gone, missed = sorted(named - present), sorted(present - named)
        assert named == present, f"{folder.name}/__init__.py names {gone} (not there) and misses {missed}"
