"""Capture files as a robot writes them: one tabular sensor, numbered readings."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter


def tabular_metadata(**kw: Any) -> pb.DataCaptureMetadata:
    """A sensor's capture header; `kw` overrides any field."""
    base: dict[str, Any] = {
        "component_type": "rdk:component:sensor",
        "component_name": "temp1",
        "method_name": "Readings",
        "type": pb.DATA_TYPE_TABULAR_SENSOR,
        "file_extension": ".dat",
        "tags": ["t1"],
    }
    base.update(kw)
    return pb.DataCaptureMetadata(**base)


def tabular_reading(seq: int, pad: int = 0) -> pb.SensorData:
    """Reading number `seq` (its number survives upload, so tests can count losses)."""
    reading = pb.SensorData()
    reading.struct.update({"seq": seq, "pad": "x" * pad})
    reading.metadata.time_requested.FromDatetime(datetime(2026, 1, 1, tzinfo=UTC))
    reading.metadata.time_received.FromDatetime(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    return reading


def write_capture(root: Path, start: int, n: int, per_file: int = 500) -> None:
    """Readings `start` .. `start + n - 1`, `per_file` to a closed capture file."""
    for first in range(start, start + n, per_file):
        with CaptureWriter(root, tabular_metadata()) as w:
            for seq in range(first, min(first + per_file, start + n)):
                w.write(tabular_reading(seq))


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the read-only fixture tree as writable files."""
    for item in src.rglob("*"):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item, target)
