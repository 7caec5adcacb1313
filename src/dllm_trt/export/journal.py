"""A resumable output directory: finished external-data files survive an interrupted export.

The export writes into `.<out>.partial/` beside `out` and renames it to `out` only at the end, so
`out` is never half-written. Unlike a throw-away temporary directory, the partial directory is
kept when the export is interrupted: its journal lists every external-data file that was
completely written (name, size, sha256) under the fingerprint of the plan that produced it, and
the next run with the same checkpoint, options and dllm-trt version skips those files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dllm_trt.errors import DllmError

JOURNAL = "journal.json"


class Journal:
    """Which external-data files are done, per graph, for one plan fingerprint per graph."""

    def __init__(self, directory: Path, key: str) -> None:
        self.path = directory / JOURNAL
        self.key = key
        self.graphs: dict[str, dict] = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("key") == key:
                self.graphs = saved.get("graphs", {})

    def start_graph(self, graph: str, plan: str) -> None:
        """Forget the graph's files if they were written under another plan."""
        if self.graphs.get(graph, {}).get("plan") != plan:
            self.graphs[graph] = dict(plan=plan, files={})
            self._save()

    def finished(self, graph: str, file: str, directory: Path) -> dict | None:
        """The journal entry of `file` if it was completely written and is still there, whole."""
        entry = self.graphs.get(graph, {}).get("files", {}).get(file)
        if entry is None or not (directory / file).is_file() or (directory / file).stat().st_size != entry["bytes"]:
            return None
        return entry

    def finish(self, graph: str, file: str, nbytes: int, sha256: str) -> None:
        self.graphs[graph]["files"][file] = dict(bytes=nbytes, sha256=sha256)
        self._save()

    def finished_count(self) -> int:
        return sum(len(g.get("files", {})) for g in self.graphs.values())

    def _save(self) -> None:
        # Write-then-rename: a crash while saving leaves the previous journal, never half of one.
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(key=self.key, graphs=self.graphs), indent=1))
        os.replace(tmp, self.path)


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


@contextmanager
def resumable_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield `.<out>.partial/` (created or reused); rename it to `out` when the block succeeds.

    On failure the directory is kept if its journal holds finished files (the next run resumes)
    and removed otherwise, so that a run refused for bad input leaves nothing behind.
    """
    if out.exists() and not out.is_dir():
        raise DllmError(f"output {out} exists and is a file; pick another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DllmError(f"output directory {out} exists and is not empty; remove it, pick another -o, or pass --force")
    work = partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    except BaseException:
        journal = work / JOURNAL
        if journal.is_file() and any(g.get("files") for g in _journal_graphs(journal)):
            print(
                f"dllm-trt: finished files kept in {work}; run the same command again to resume the export",
                file=sys.stderr,
            )
        else:
            shutil.rmtree(work, ignore_errors=True)
        raise
    (work / JOURNAL).unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)


def _journal_graphs(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text()).get("graphs", {}).values())
    except (json.JSONDecodeError, OSError):
        return []
