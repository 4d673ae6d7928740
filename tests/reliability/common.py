"""Shared pieces of the reliability suite: cycle counts, result records, the writer, the
faulty server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.credentials import KeyFile
from tests.support.paths import REPO
from tests.support.processes import read_line, stop_process

_LISTEN = re.compile(rb"listening on [^ ]+:(\d+)")

TORTURE = os.environ.get("EDGED_TORTURE") == "1"  # `make torture`: the full profile


def cycles(quick: int, full: int) -> int:
    return full if TORTURE else quick


def record(scenario: str, **figures: Any) -> None:
    """Print the scenario's figures; with EDGED_RELIABILITY_OUT also append them as JSON
    (`make torture` collects them into docs/reliability.md)."""
    line = {
        "scenario": scenario,
        "profile": "full" if TORTURE else "quick",
        **figures,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"\n[reliability] {json.dumps(line)}")
    out = os.environ.get("EDGED_RELIABILITY_OUT")
    if out:
        with Path(out).open("a") as f:
            f.write(json.dumps(line) + "\n")


WRITER = """
import sys, time
from pathlib import Path
from edged.capture import CaptureWriter
from tests.support.capture_files import tabular_metadata, tabular_reading

capture, uploads = Path(sys.argv[1]), Path(sys.argv[2])
files, per_file, plain = map(int, sys.argv[3:6])
uploads.mkdir(parents=True, exist_ok=True)
seq = 0
for n in range(files):
    with CaptureWriter(capture, tabular_metadata(component_name=f"s{n % 3}")) as w:
        for _ in range(per_file):
            w.write(tabular_reading(seq))
            seq += 1
    if n < plain:
        tmp = uploads / f".file-{n}.tmp"
        tmp.write_bytes(n.to_bytes(4, "big") * 5000)
        tmp.rename(uploads / f"file-{n}.bin")
    time.sleep(0.02)
print("done", seq, flush=True)
"""


@dataclass
class Faulty:
    proc: subprocess.Popen[bytes]
    port: int
    counts_file: Path
    counts: dict[str, int] = field(default_factory=dict)


@contextmanager
def faulty_ingest(data: Path, key: KeyFile, args: Sequence[str] = ()) -> Iterator[Faulty]:
    """faulty_ingest.py as a subprocess; on exit SIGTERM, wait, and read its call counts."""
    counts = data.with_name(data.name + "-counts.json")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.reliability.faulty_ingest",
            "--data",
            str(data),
            *key.ingest_args(),
            "--counts",
            str(counts),
            *args,
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        match = _LISTEN.search(read_line(proc, 30))
        assert match, "faulty_ingest printed no listening line"
        server = Faulty(proc, int(match[1]), counts)
        yield server
    finally:
        stop_process(proc)
        assert proc.stdout is not None
        proc.stdout.close()
    server.counts = json.loads(counts.read_text())


def start_writer(tmp: Path, files: int, per_file: int, plain: int) -> subprocess.Popen[bytes]:
    """WRITER as a child: capture files under tmp/capture, plain files under tmp/uploads."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(tmp / "capture"),
            str(tmp / "uploads"),
            str(files),
            str(per_file),
            str(plain),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def finish_writer(writer: subprocess.Popen[bytes]) -> int:
    """How many readings `start_writer`'s child wrote, once it is done; it is reaped
    whatever happens."""
    try:
        written = int(read_line(writer, 120).split()[1])
        assert writer.wait(30) == 0
        return written
    finally:
        stop_writer(writer)


def stop_writer(writer: subprocess.Popen[bytes]) -> None:
    """Kill `start_writer`'s child if it still runs, reap it, close its pipe."""
    if writer.poll() is None:
        writer.kill()
        writer.wait()
    assert writer.stdout is not None
    writer.stdout.close()
