"""Real child processes: the `edged` command, `edged ingest` on an ephemeral loopback
port, bounded reads of a child's output, peak RSS. Benches use the same ones."""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

_LISTEN = re.compile(rb"listening on [^ ]+:(\d+)")


def edged_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edged", *args]


def read_line(proc: subprocess.Popen[bytes], deadline_s: float) -> bytes:
    """One stdout line from `proc`, or fail after `deadline_s` (never blocks forever)."""
    assert proc.stdout is not None
    end = time.monotonic() + deadline_s
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no line from {proc.args!r} within {deadline_s}s (got {buf!r})")
            chunk = os.read(proc.stdout.fileno(), 1)  # one byte: the rest stays for the caller
            if not chunk:
                raise RuntimeError(
                    f"{proc.args!r} exited with {proc.wait()} before a line: {buf!r}"
                )
            buf += chunk
    return buf


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL: a child never outlives its test."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def ingest_process(
    data: Path | str,
    extra: Sequence[str] = (),
    *,
    cwd: Path | None = None,
    log: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`edged ingest` on 127.0.0.1:0; yields (process, port); SIGTERM + wait on exit.

    Its stderr (one access line per call) goes to the file `log` or a temporary file,
    never to an unread pipe, which would stall the server once 64 KiB of lines wait."""
    with ExitStack() as stack:
        sink: IO[bytes] = log.open("ab") if log is not None else tempfile.TemporaryFile()  # noqa: SIM115
        err = stack.enter_context(sink)
        proc = subprocess.Popen(
            edged_cmd("ingest", "--listen", "127.0.0.1:0", "--data", str(data), *extra),
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=cwd,
        )
        try:
            line = read_line(proc, 30)
            match = _LISTEN.search(line)
            if not match:
                raise RuntimeError(f"unexpected first line from edged ingest: {line!r}")
            yield proc, int(match[1])
        finally:
            stop_process(proc)
            if proc.stdout:
                proc.stdout.close()


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the high-water mark of resident memory of a live process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def free_port() -> int:
    """A loopback port nothing listens on now (for a server that comes up later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
