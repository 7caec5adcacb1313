"""Stage-by-stage progress on stderr: what is running, then how long it took and what it produced."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total = total
        self.done = 0
        self.quiet = quiet
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, title: str) -> Iterator[list[str]]:
        """Yields a list the caller may append a short result note to."""
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {title} ...", end="", file=sys.stderr, flush=True)
        notes: list[str] = []
        start = time.perf_counter()
        try:
            yield notes
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr, flush=True)
            raise
        elapsed = time.perf_counter() - start
        self.timings[title] = round(elapsed, 3)
        if not self.quiet:
            note = f"  {'; '.join(notes)}" if notes else ""
            print(f" {elapsed:.1f} s{note}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"      {text}", file=sys.stderr, flush=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"
