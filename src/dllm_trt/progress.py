"""Stage-by-stage progress on stderr: what is running, then how long it took and what it produced.

Long byte-bound work inside a stage (writing or hashing tens of GB) adds a byte line: bytes done,
rate and ETA, redrawn in place on a terminal and printed every few seconds otherwise.
"""

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
        self._line_open = False  # the current stage's title line still waits for its result

    @contextmanager
    def stage(self, title: str) -> Iterator[list[str]]:
        """Yields a list the caller may append a short result note to."""
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {title} ...", end="", file=sys.stderr, flush=True)
            self._line_open = True
        notes: list[str] = []
        start = time.perf_counter()
        try:
            yield notes
        except BaseException:
            if not self.quiet:
                print(" failed" if self._line_open else "      failed", file=sys.stderr, flush=True)
                self._line_open = False
            raise
        elapsed = time.perf_counter() - start
        self.timings[title] = round(elapsed, 3)
        if not self.quiet:
            note = f"  {'; '.join(notes)}" if notes else ""
            lead = " " if self._line_open else "      done in "
            print(f"{lead}{elapsed:.1f} s{note}", file=sys.stderr, flush=True)
            self._line_open = False

    def note(self, text: str) -> None:
        if not self.quiet:
            if self._line_open:
                print(file=sys.stderr)
                self._line_open = False
            print(f"      {text}", file=sys.stderr, flush=True)

    def bytes(self, total: int, label: str = "") -> ByteProgress:
        """A byte counter for work inside the current stage; its lines go below the stage title."""
        if not self.quiet and self._line_open:
            print(file=sys.stderr, flush=True)
            self._line_open = False
        return ByteProgress(total, label, quiet=self.quiet)


class ByteProgress:
    """`      label  1.2 GB / 8.0 GB (15%)  120 MB/s  ETA 56 s` on stderr while bytes are processed."""

    def __init__(self, total: int, label: str = "", quiet: bool = False, interval: float | None = None) -> None:
        self.total = total
        self.done = 0
        self.label = label
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.start = time.perf_counter()
        self._last = self.start

    def advance(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if not self.quiet and now - self._last >= self.interval:
            self._last = now
            self._print(end="\r" if self.tty else "\n")

    def finish(self) -> None:
        if not self.quiet:
            self._print(end="\n")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f"  ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 and self.done < self.total else ""
        label = f"{self.label}  " if self.label else ""
        return f"{label}{human_bytes(self.done)} / {human_bytes(self.total)}{percent}  {human_bytes(rate)}/s{eta}"

    def _print(self, end: str) -> None:
        clear = "\033[K" if self.tty else ""  # erase what a longer previous line left on a terminal
        print(f"      {self.line()}{clear}", end=end, file=sys.stderr, flush=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"
