"""Stock `polygraphy` as a subprocess, with dllm-trt's entry points as an installed dllm-trt declares them.

The tests run from a source tree whose editable install may predate the entry point: the environment built
here carries a distribution's metadata (`*.dist-info/entry_points.txt`) written from pyproject.toml's own
`[project.entry-points]`, on PYTHONPATH beside the source, which is where importlib.metadata (and so
Polygraphy) finds installed entry points. CI runs the same commands on a real `pip install -e`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
POLYGRAPHY = Path(sys.executable).with_name("polygraphy")


def polygraphy_env(directory: Path, rtx: bool = False) -> dict[str, str]:
    """An environment in which `polygraphy` sees dllm-trt (this tree's source) and its entry points."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = directory / "dllm_trt_entry_points-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dllm-trt-entry-points\nVersion: 0\n")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(directory), str(ROOT / "src")]))
    env.pop("TRITON_INTERPRET", None)  # a build compiles the plugin's kernels: never under the interpreter
    if rtx:
        env["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    return env


def polygraphy(
    args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """`polygraphy ARGS` in `cwd`, its output captured (stdout and stderr together)."""
    return subprocess.run(
        [str(POLYGRAPHY), *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )  # fmt: skip
