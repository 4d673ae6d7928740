"""The capture source retires a file only once everything it held is committed: not while
a writer still has it open, and not before a crash between two of its readings is
recovered (each reading then committed exactly once)."""

from __future__ import annotations

import base64
import contextlib
import os
import time
from pathlib import Path

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter, frame
from edged.daemon.outbox import Item, Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.capture import CaptureConfig, CaptureSource
from tests.support.capture_files import tabular_metadata, tabular_reading
from tests.support.crashes import scan_killed_after_first_enqueue


async def drain(box: Outbox) -> list[Item]:
    items = []
    while (
        item := await box.lease(lease_s=86400, max_readings=10_000, max_bytes=1 << 30)
    ) is not None:
        items.append(item)
        await box.ack(item)
    return items


async def test_prog_with_a_live_writer_is_committed_but_not_deleted(tmp_path: Path) -> None:
    cap, state = tmp_path / "capture", tmp_path / "state"
    box = await Outbox.open(state)
    writer = CaptureWriter(cap, tabular_metadata())
    try:
        for seq in range(60):
            writer.write(tabular_reading(seq))
        writer.flush()  # a slow sensor: the file is past its grace, the writer still has it
        prog = writer.path
        assert prog is not None
        # "Booted" after the file was last written: what a robot without a real-time
        # clock sees once NTP steps its clock. The lease probe must still win.
        booted = time.time()
        os.utime(prog, (booted - 3600, booted - 3600))
        source = CaptureSource(
            CaptureConfig(path=cap, prog_grace=0.0),
            SourceContext("p", box, state),
            booted_at=booted,
        )
        await source.scan_once()
        assert prog.exists(), "deleted while its writer still had it open"
        first = sum(i.count for i in await drain(box))
        for seq in range(60, 100):
            writer.write(tabular_reading(seq))
        final = writer.close()  # renames .prog -> .capture
        assert final is not None
        await source.scan_once()
        rest = await drain(box)
        assert first + sum(i.count for i in rest) == 100  # every reading once, no repeats
        assert not final.exists()
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        await box.close()


async def test_legacy_images_survive_a_crash_between_images(tmp_path: Path) -> None:
    cap, state = tmp_path / "capture", tmp_path / "state"
    header = pb.DataCaptureMetadata(
        component_type="rdk:component:camera",
        component_name="cam",
        method_name="GetImages",
        type=pb.DATA_TYPE_BINARY_SENSOR,
    )
    reading = pb.SensorData()
    reading.struct.update(
        {
            "images": [
                {
                    "image": base64.b64encode(f"img-{i}".encode() * 50).decode(),
                    "mime_type": "image/jpeg",
                }
                for i in range(3)
            ]
        }
    )
    # Old robot software wrote this shape; our writer refuses it, so frame it by hand.
    legacy = (
        cap / "rdk_component_camera" / "cam" / "GetImages" / "2020-01-01T00_00_00.000000Z.capture"
    )
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(frame(header.SerializeToString()) + frame(reading.SerializeToString()))
    box = await scan_killed_after_first_enqueue(cap, state)
    payloads = {item.inline for item in await drain(box)}
    assert payloads == {f"img-{i}".encode() * 50 for i in range(3)}  # none lost
    assert list(cap.rglob("*.capture")) == []  # and the file was retired
    await box.close()
