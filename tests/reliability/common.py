"""Shared pieces of the reliability suite: cycle counts, result records, the writer."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

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
from tests.test_capture import tabular_metadata, tabular_reading

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
