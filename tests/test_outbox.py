"""The outbox on real SQLite files: durability, leases, batches, dead letters, limits."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import (
    INLINE_MAX,
    KIND_BINARY,
    KIND_FILE,
    KIND_TABULAR,
    Claim,
    ClaimRecord,
    ClaimState,
    FileRef,
    Outbox,
    Progress,
    Tidy,
)
from edged.errors import OutboxFull
from tests.support.outbox_items import meta, reading, take
from tests.support.processes import read_line


def seqs(blobs: list[bytes]) -> list[int]:
    return [int(pb.SensorData.FromString(b).struct.fields["seq"].number_value) for b in blobs]


async def test_readings_round_trip_in_order_and_ack_removes_them(box: Outbox) -> None:
    await box.enqueue_readings(meta(), [reading(i) for i in range(10)])
    await box.enqueue_readings(meta(), [reading(i) for i in range(10, 15)])
    item = await take(box)
    assert item is not None and item.kind == KIND_TABULAR and item.count == 15
    assert seqs(await box.readings_of(item)) == list(range(15))
    assert await take(box) is None  # leased: not handed out twice
    await box.ack(item)
    stats = await box.stats()
    assert (stats.items, stats.readings, stats.bytes, stats.stored_bytes) == (0, 0, 0, 0)
    assert stats.counters["uploaded_readings"] == 15


async def test_a_lease_says_whether_more_is_due(box: Outbox) -> None:
    """Only then is another idle worker woken (one lease of nothing saved per batch)."""
    await box.enqueue_readings(meta("a"), [reading(i) for i in range(15)])
    await box.enqueue_item(KIND_BINARY, meta("b"), b"x")
    got = []
    while (item := await box.lease(lease_s=86400, max_readings=10, max_bytes=1 << 20)) is not None:
        got.append((item.count, item.more_due))
    assert got == [(10, True), (5, True), (1, False)]  # oldest first
    await box.enqueue_readings(meta("a"), [reading(0)], source="a")
    await box.enqueue_item(KIND_BINARY, meta("b"), b"x", source="b")
    box.held = frozenset({"b"})  # its window is closed: not due for anyone
    item = await take(box)
    assert item is not None and item.source == "a" and not item.more_due


async def test_batches_respect_limits_and_group_by_metadata(box: Outbox) -> None:
    await box.enqueue_readings(meta("a"), [reading(i) for i in range(25)])
    await box.enqueue_readings(meta("b"), [reading(i) for i in range(5)])
    got = []
    while (item := await box.lease(lease_s=86400, max_readings=10, max_bytes=1 << 20)) is not None:
        got.append((pb.UploadMetadata.FromString(item.metadata).component_name, item.count))
    assert got == [("a", 10), ("a", 10), ("a", 5), ("b", 5)]


async def test_batch_keeps_its_id_and_readings_across_a_crash(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path)
    await ob.enqueue_readings(meta(), [reading(i) for i in range(5)])
    first = await take(ob)
    assert first is not None
    await ob.enqueue_readings(meta(), [reading(i) for i in range(5, 8)])
    await ob.close()  # "crash": never acked
    ob = await Outbox.open(tmp_path)
    assert (await ob.recover())["leases_released"] == 1
    again = await take(ob)
    assert again is not None
    assert (again.uid, again.count) == (first.uid, 5)  # same de-duplication id
    assert seqs(await ob.readings_of(again)) == list(range(5))
    rest = await take(ob)
    assert rest is not None and seqs(await ob.readings_of(rest)) == [5, 6, 7]
    await ob.close()


async def test_retry_later_hides_item_until_due(tmp_path: Path) -> None:
    now = [1000.0]
    ob = await Outbox.open(tmp_path, clock=lambda: now[0])
    await ob.enqueue_readings(meta(), [reading(1)])
    item = await take(ob)
    assert item is not None
    await ob.retry_later(item, 5.0, "UNAVAILABLE: down")
    assert await take(ob) is None
    assert await ob.next_due_in() == pytest.approx(5.0)
    now[0] += 5.0
    again = await take(ob)
    assert again is not None and again.attempts == 1 and again.uid == item.uid
    await ob.close()


async def test_expired_lease_comes_back(tmp_path: Path) -> None:
    now = [1000.0]
    ob = await Outbox.open(tmp_path, clock=lambda: now[0])
    await ob.enqueue_readings(meta(), [reading(1)])
    item = await ob.lease(lease_s=30, max_readings=10, max_bytes=1 << 20)
    assert item is not None
    now[0] += 31
    again = await take(ob)
    assert again is not None and again.uid == item.uid
    await ob.close()


async def test_dead_letters_never_block_and_can_be_retried(box: Outbox) -> None:
    await box.enqueue_readings(meta("bad"), [reading(1)])
    await box.enqueue_readings(meta("good"), [reading(2)])
    bad = await take(box)
    assert bad is not None
    await box.dead_letter(bad, "INVALID_ARGUMENT", "component bad is unknown")
    good = await take(box)
    assert good is not None and good.uid != bad.uid
    await box.ack(good)
    assert await take(box) is None
    [dead] = await box.dead_letters()
    assert (dead.uid, dead.status, dead.message) == (
        bad.uid,
        "INVALID_ARGUMENT",
        "component bad is unknown",
    )
    assert (await box.stats()).dead_letters == 1
    assert await box.next_due_in() is None  # dead letters are not "waiting"
    assert await box.retry_dead() == 1
    back = await take(box)
    assert back is not None and back.uid == bad.uid and back.attempts == 0
    assert await box.dead_letters() == []


async def test_binary_payloads_inline_spooled_or_referenced(box: Outbox, tmp_path: Path) -> None:
    bmeta = pb.UploadMetadata(part_id="p", type=pb.DATA_TYPE_BINARY_SENSOR).SerializeToString()
    sensor = pb.SensorMetadata(mime_type=pb.MIME_TYPE_IMAGE_JPEG).SerializeToString()
    small, large = b"s" * 100, os.urandom(INLINE_MAX + 1)
    source = tmp_path / "video.mp4"
    source.write_bytes(b"x" * 5000)
    await box.enqueue_item(KIND_BINARY, bmeta, small, sensor=sensor)
    await box.enqueue_item(KIND_BINARY, bmeta, large, sensor=sensor)
    await box.enqueue_item(
        KIND_FILE,
        bmeta,
        FileRef(str(source), 0, 5000),
        claim=Claim(str(source), 5000, source.stat().st_mtime_ns, delete_after=True),
    )
    items = [await take(box) for _ in range(3)]
    inline, spooled, ref = (i for i in items if i is not None)
    assert inline.inline == small and inline.sensor == sensor
    assert spooled.inline is None and spooled.path is not None
    assert Path(spooled.path).read_bytes() == large
    assert oct(Path(spooled.path).stat().st_mode & 0o777) == "0o600"
    assert ref.path == str(source) and not ref.stored
    stats = await box.stats()
    assert stats.per_kind[KIND_BINARY].items == 2 and stats.per_kind[KIND_FILE].bytes == 5000
    assert stats.stored_bytes == len(small) + len(large)  # referenced files are not copied
    for item in (inline, spooled, ref):
        await box.ack(item)
    assert not Path(spooled.path).exists()
    assert not source.exists()  # delete_after_upload
    assert await box.claim_of(str(source)) is None


async def test_kept_file_is_remembered_after_upload(box: Outbox, tmp_path: Path) -> None:
    source = tmp_path / "keep.bag"
    source.write_bytes(b"k" * 10)
    st = source.stat()
    await box.enqueue_item(
        KIND_FILE,
        meta(),
        FileRef(str(source), 0, 10),
        claim=Claim(str(source), 10, st.st_mtime_ns, delete_after=False),
    )
    item = await take(box)
    assert item is not None
    await box.ack(item)
    assert source.exists()
    assert await box.claim_of(str(source)) == ClaimRecord(
        str(source), ClaimState.DONE, 10, st.st_mtime_ns
    )


async def test_claim_and_progress_commit_with_the_readings(box: Outbox) -> None:
    claim = Claim("/cap/a.capture", 123, 456)
    prog = Progress("jsonl:/x", "/x/imu.jsonl", 99, 4096, 12)
    await box.enqueue_readings(meta(), [reading(1)], claim=claim, progress=prog)
    assert await box.claim_of("/cap/a.capture") == ClaimRecord(
        "/cap/a.capture", ClaimState.COMMITTED, 123, 456
    )
    assert await box.progress_of("jsonl:/x", "/x/imu.jsonl") == prog
    await box.forget_claim("/cap/a.capture")
    assert await box.claim_of("/cap/a.capture") is None


async def test_an_enqueue_is_two_hops_to_the_sqlite_thread(
    box: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readings, claim, offset, counters and the tidy-up of a retired file: BEGIN (with
    the tidy-up) is one call on aiosqlite's thread, every write plus COMMIT another. Each
    call is a round trip through a queue and a future; one per statement was ten."""
    await box.enqueue_readings(meta(), [reading(0)])  # the metadata row exists and is cached
    box._tidy["/cap/old.capture"] = Tidy(None, "capture:/cap", committed_only=True)
    calls = 0
    real: Callable[..., Awaitable[Any]] = box._db._execute

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(box._db, "_execute", counted)
    claim = Claim("/cap/a.capture", 123, 456)
    prog = Progress("capture:/cap", "/cap/a.capture", 99, 4096, 0)
    await box.enqueue_readings(
        meta(), [reading(i) for i in range(1, 1001)], claim=claim, progress=prog
    )
    assert calls == 2
    monkeypatch.undo()
    item = await box.lease(lease_s=60.0, max_readings=2000, max_bytes=1 << 24)
    assert item is not None
    assert seqs(await box.readings_of(item)) == list(range(1001))
    assert await box.claim_of("/cap/a.capture") == ClaimRecord(
        "/cap/a.capture", ClaimState.COMMITTED, 123, 456
    )
    assert await box.progress_of("capture:/cap", "/cap/a.capture") == prog
    assert not box._tidy
    assert (await box.stats()).counters["enqueued_readings"] == 1001


async def test_backpressure_when_full_then_space_returns(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path, OutboxConfig(max_bytes=1000, min_free_disk=0))
    await ob.enqueue_readings(meta(), [b"x" * 600])
    with pytest.raises(OutboxFull, match=r"outbox.max_bytes \(1000\)"):
        await ob.enqueue_readings(meta(), [b"y" * 600])
    assert (await ob.stats()).readings == 1  # the refused batch left no trace
    item = await take(ob)
    assert item is not None
    await ob.ack(item)
    await ob.enqueue_readings(meta(), [b"y" * 600])
    await ob.close()


async def test_drop_oldest_counts_what_it_dropped(tmp_path: Path) -> None:
    ob = await Outbox.open(
        tmp_path, OutboxConfig(max_bytes=1000, on_full="drop_oldest", min_free_disk=0)
    )
    for i in range(5):
        await ob.enqueue_readings(meta(), [reading(i), b"z" * 300])
    stats = await ob.stats()
    assert stats.stored_bytes <= 1000
    assert stats.counters["dropped_readings"] > 0
    item = await take(ob)
    assert item is not None
    kept = await ob.readings_of(item)
    assert kept[-1] == b"z" * 300  # the newest survive
    await ob.close()


async def test_min_free_disk_is_backpressure(tmp_path: Path) -> None:
    free = [10_000]
    ob = await Outbox.open(tmp_path, OutboxConfig(min_free_disk=5000), free_disk=lambda _: free[0])
    await ob.enqueue_readings(meta(), [b"a" * 100])
    free[0] = 5050
    with pytest.raises(OutboxFull, match="min_free_disk"):
        await ob.enqueue_readings(meta(), [b"a" * 100])
    free[0] = 1 << 30
    await ob.enqueue_readings(meta(), [b"a" * 100])
    await ob.close()


async def test_recover_settles_an_ack_cut_before_the_file_delete(tmp_path: Path) -> None:
    ob = await Outbox.open(tmp_path / "s")
    src = tmp_path / "f.bin"
    src.write_bytes(b"1234")
    await ob.enqueue_item(
        KIND_FILE, meta(), FileRef(str(src), 0, 4), claim=Claim(str(src), 4, 0, True)
    )
    # Simulate a crash between the ack transaction and the unlink.
    item = await take(ob)
    assert item is not None
    db = sqlite3.connect(tmp_path / "s" / "outbox.sqlite3")
    db.execute("DELETE FROM items")
    db.commit()
    db.close()
    await ob.close()
    ob = await Outbox.open(tmp_path / "s")
    assert (await ob.recover())["claims_settled"] == 1
    assert not src.exists()
    await ob.close()


async def test_state_files_are_private(box: Outbox) -> None:
    assert box.state_dir.stat().st_mode & 0o777 == 0o700
    assert (box.state_dir / "outbox.sqlite3").stat().st_mode & 0o777 == 0o600
    assert box.spool_dir.stat().st_mode & 0o777 == 0o700


KILL_CHILD = """
import asyncio, sys
from pathlib import Path
from edged.daemon.outbox import Outbox
from tests.support.outbox_items import meta, reading

async def main() -> None:
    box = await Outbox.open(Path(sys.argv[1]))
    n = int(sys.argv[2])
    for batch in range(100_000):
        await box.enqueue_readings(meta(f"c{batch % 3}"), [reading(n + i) for i in range(100)])
        n += 100
        print(n, flush=True)

asyncio.run(main())
"""


def test_sigkill_mid_transaction_loses_nothing_committed(tmp_path: Path) -> None:
    """A writer killed at a random instant, three times over one database: every batch
    it reported committed is there, whole, and no batch is there in part."""
    state = tmp_path / "state"
    repo = Path(__file__).resolve().parents[1]
    acked: list[int] = []
    bases = [0, 10_000_000, 20_000_000]
    for round_no, base in enumerate(bases):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(state), str(base)],
            stdout=subprocess.PIPE,
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        last = base
        for _ in range(5 + round_no * 7):  # kill after a varying number of commits
            last = int(read_line(proc, 30))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        acked.append(last - base)
    db = sqlite3.connect(state / "outbox.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    got = sorted(seqs([row[0] for row in db.execute("SELECT data FROM readings")]))
    db.close()
    for base, reported in zip(bases, acked, strict=True):
        mine = [s - base for s in got if base <= s < base + 10_000_000]
        assert len(mine) % 100 == 0, "a batch was committed in part"
        assert mine == list(range(len(mine))), "a committed reading is missing"
        assert len(mine) >= reported, "a batch reported committed was lost"


async def test_file_rewritten_after_queueing_is_kept_and_forgotten(
    box: Outbox, tmp_path: Path
) -> None:
    source = tmp_path / "log.bin"
    source.write_bytes(b"v1" * 10)
    st = source.stat()
    await box.enqueue_item(
        KIND_FILE,
        meta(),
        FileRef(str(source), 0, 20),
        claim=Claim(str(source), 20, st.st_mtime_ns, delete_after=True),
    )
    item = await take(box)
    assert item is not None
    source.write_bytes(b"v2" * 30)  # the writer was not done after all
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    await box.ack(item)
    assert source.read_bytes() == b"v2" * 30  # new bytes not deleted
    assert await box.claim_of(str(source)) is None  # so the source sends the new version
