"""One progress display for every long CLI command (`edged upload`, `edged query
export-binaries`): a redrawn bar (`\\r`) only on a terminal; elsewhere (logs, pipes,
CI) plain lines, at most one per item, so a file never fills with carriage returns."""

from __future__ import annotations

import sys
from typing import TextIO

WIDTH = 30


def bar(done: int, total: int, nbytes: int) -> str:
    """`[#####-----] 3/10  1.2 MiB` (pure, for tests)."""
    filled = WIDTH * done // total if total else WIDTH
    return f"[{'#' * filled}{'-' * (WIDTH - filled)}] {done}/{total}  {nbytes / 1048576:.1f} MiB"


class Progress:
    """`update()` after each item; `line()` for a message that must not be overdrawn;
    `close()` ends the bar's line."""

    def __init__(self, total: int, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.total = total
        self._drawn = False

    def update(self, done: int, nbytes: int, what: str = "") -> None:
        if self.tty:
            print(f"\r{bar(done, max(self.total, done), nbytes)}", end="", file=self.out)
            self._drawn = True
        elif what:
            print(f"[{done}/{max(self.total, done)}] {what}", file=self.out, flush=True)

    def line(self, text: str) -> None:
        if self._drawn:
            print(file=self.out)
            self._drawn = False
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self._drawn:
            print(file=self.out, flush=True)
            self._drawn = False
