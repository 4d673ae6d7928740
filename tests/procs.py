"""Real subprocesses for tests: `edged ingest` on an ephemeral port, peak RSS readers."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.common import read_line

__all__ = ["edged_cmd", "ingest_process", "peak_rss_bytes", "read_line"]

_LISTEN = re.compile(rb"listening on [^ ]+:(\d+)")


def edged_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edged", *args]


@contextmanager
def ingest_process(
    data: Path | str,
    extra: Sequence[str] = (),
    *,
    cwd: Path | None = None,
    log: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`edged ingest` on 127.0.0.1:0; yields (process, port); SIGTERM + wait on exit.

    Its stderr (one access line per call) goes to `log` or a temporary file, never to
    an unread pipe, which would block the server once 64 KiB of lines are waiting."""
    err = open(log, "ab") if log is not None else tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(
        edged_cmd("ingest", "--listen", "127.0.0.1:0", "--data", str(data), *extra),
        stdout=subprocess.PIPE,
        stderr=err,
        cwd=cwd,
    )
    try:
        line = read_line(proc, 30)
        match = _LISTEN.search(line)
        assert match, line
        yield proc, int(match[1])
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        err.close()


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the high-water mark of resident memory of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")
