"""The outbox interrupted between two steps, by a crash or a cancellation: each test
simulates that instant and checks nothing is lost or wedged."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter
from edged.daemon.outbox import INLINE_MAX, KIND_BINARY, KIND_FILE, Claim, FileRef, Outbox
from edged.daemon.queue import scalar
from edged.errors import OutboxFull
from edged.ingest.storage import IngestStore
from tests.support.crashes import Killed, scan_killed_after_first_enqueue
from tests.support.outbox_items import meta, take

CAMERA = pb.DataCaptureMetadata(
    component_type="rdk:component:camera",
    component_name="cam",
    method_name="ReadImage",
    type=pb.DATA_TYPE_BINARY_SENSOR,
    file_extension=".jpg",
)


def three_frame_file(cap: Path) -> Path:
    w = CaptureWriter(cap, CAMERA, max_file_readings=3)
    for i in range(3):
        w.write_binary(f"frame-{i}".encode() * 100)
    path = w.close()
    assert path is not None
    return path


async def test_binary_file_is_not_deleted_while_its_readings_are_still_being_queued(
    box: Outbox, tmp_path: Path
) -> None:
    src = tmp_path / "multi.capture"
    src.write_bytes(b"x" * 300)
    claim = Claim(str(src), 300, src.stat().st_mtime_ns, delete_after=True)
    await box.enqueue_item(
        KIND_BINARY, meta("c"), FileRef(str(src), 0, 100), claim=claim, more=True
    )
    first = await take(box)
    assert first is not None
    await box.ack(first)  # uploaded before the source queued the rest
    assert src.exists(), "deleted while two readings were not queued yet"
    for off in (100, 200):
        await box.enqueue_item(
            KIND_BINARY, meta("c"), FileRef(str(src), off, 100), claim=claim, more=True
        )
    await box.finish_claim(str(src))
    for _ in range(2):
        item = await take(box)
        assert item is not None
        await box.ack(item)
    assert not src.exists()
    assert await box.claim_of(str(src)) is None


async def test_crash_after_first_binary_reading_resumes_the_rest(tmp_path: Path) -> None:
    cap, state = tmp_path / "capture", tmp_path / "state"
    path = three_frame_file(cap)
    box = await scan_killed_after_first_enqueue(cap, state)
    offsets = []
    while (item := await take(box)) is not None:
        offsets.append(item.offset)
        await box.ack(item)
    assert len(offsets) == 3 and len(set(offsets)) == 3  # every frame once
    assert not path.exists()
    await box.close()


async def test_cancelled_spooled_enqueue_keeps_row_and_file_consistent(
    box: Outbox, tmp_path: Path
) -> None:
    for delay in range(6):
        task = asyncio.create_task(
            box.enqueue_item(KIND_BINARY, meta("c"), os.urandom(INLINE_MAX + 1))
        )
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await box.close()
    box2 = await Outbox.open(box.state_dir)
    await box2.recover()
    db = sqlite3.connect(box.state_dir / "outbox.sqlite3")
    paths = [r[0] for r in db.execute("SELECT path FROM items WHERE stored=1")]
    db.close()
    assert all(Path(p).exists() for p in paths), "a committed item lost its spool file"
    assert sorted(p.name for p in box2.spool_dir.iterdir()) == sorted(Path(p).name for p in paths)
    stats = await box2.stats()
    assert stats.stored_bytes == len(paths) * (INLINE_MAX + 1)
    await box2.close()
    box.close = box2.close  # type: ignore[method-assign]  # fixture closes it again: no-op


async def test_rolled_back_metadata_id_is_not_reused_for_other_readings(tmp_path: Path) -> None:
    box = await Outbox.open(tmp_path, free_disk=lambda _: 1 << 40)
    await box.enqueue_readings(meta("A"), [b"a-reading"])
    db = box._db
    pages = await scalar(db, "PRAGMA page_count")
    await db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full now
    with pytest.raises(OutboxFull):
        await box.enqueue_readings(meta("B"), [b"b" * 50_000])
    await db.execute("PRAGMA max_page_count=1073741823")
    await box.enqueue_readings(meta("C"), [b"c-reading"])
    await box.enqueue_readings(meta("B"), [b"b-reading"])
    seen = {}
    while (item := await take(box)) is not None:
        name = pb.UploadMetadata.FromString(item.metadata).component_name
        seen[name] = await box.readings_of(item)
        await box.ack(item)
    assert seen == {"A": [b"a-reading"], "B": [b"b-reading"], "C": [b"c-reading"]}
    await box.close()


async def test_cancellation_at_any_await_never_wedges_the_connection(box: Outbox) -> None:
    for delay in range(8):
        task = asyncio.create_task(box.enqueue_readings(meta("s"), [b"r"] * 10))
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await box.enqueue_readings(meta("s"), [b"last"])  # no "transaction within a transaction"
    total = 0
    while (item := await take(box)) is not None:
        total += item.count
        await box.ack(item)
    stats = await box.stats()
    assert stats.readings == 0 and stats.stored_bytes == 0  # memory agrees with the file
    assert total >= 1


async def test_a_late_second_ack_books_nothing(box: Outbox, tmp_path: Path) -> None:
    await box.enqueue_item(KIND_BINARY, meta("c"), b"x" * 1000)
    item = await take(box)
    assert item is not None
    await box.ack(item)
    await box.ack(item)  # a second worker whose lease had expired
    stats = await box.stats()
    assert stats.stored_bytes == 0
    assert stats.counters["uploaded_items"] == 1


async def test_leased_items_are_not_waiting(box: Outbox) -> None:
    await box.enqueue_item(KIND_BINARY, meta("c"), b"x")
    item = await take(box)
    assert item is not None
    assert await box.next_due_in() is None  # idle workers must not spin on it
    await box.release(item)
    assert await box.next_due_in() == 0.0


async def test_crash_between_ack_commit_and_file_delete_is_finished_by_recover(
    tmp_path: Path,
) -> None:
    box = await Outbox.open(tmp_path / "state")
    src = tmp_path / "video.mp4"
    src.write_bytes(b"v" * 10)
    claim = Claim(str(src), 10, src.stat().st_mtime_ns, delete_after=True)
    await box.enqueue_item(KIND_FILE, meta("f"), FileRef(str(src), 0, 10), claim=claim)
    item = await take(box)
    assert item is not None

    async def die(path: str) -> None:
        raise Killed

    box._settle_file = die  # type: ignore[method-assign]  # dies right after the ack commit
    with pytest.raises(Killed):
        await box.ack(item)
    await box.close()
    assert src.exists()
    box = await Outbox.open(tmp_path / "state")
    assert (await box.recover())["claims_settled"] == 1
    assert not src.exists()
    assert await box.claim_of(str(src)) is None
    await box.close()


async def test_ingest_upload_cancelled_midway_never_wedges_the_store(tmp_path: Path) -> None:
    store = await IngestStore.open(tmp_path / "ingest")
    m = pb.UploadMetadata(part_id="p", component_name="s", type=pb.DATA_TYPE_TABULAR_SENSOR)
    r = pb.SensorData()
    r.struct.update({"a": 1})
    for delay in range(6):
        task = asyncio.create_task(store.store_tabular("", f"cancelled-{delay}", m, [r]))
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ids = await store.store_tabular("", "after", m, [r])
    assert ids.file_id
    await store.close()  # waits for the lock: shielded writes of cancelled callers finish
    db = sqlite3.connect(tmp_path / "ingest" / "ingest.sqlite3")
    uploads = db.execute("SELECT count(*) FROM uploads").fetchone()[0]
    readings = db.execute("SELECT count(*) FROM readings").fetchone()[0]
    db.close()
    assert uploads == readings >= 1  # each stored upload is whole
