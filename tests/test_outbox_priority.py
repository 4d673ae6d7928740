"""Per-source priority, aging and holds in the outbox lease (real SQLite)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import (
    INLINE_MAX,
    KIND_BINARY,
    KIND_FILE,
    KIND_TABULAR,
    Claim,
    FileRef,
    Outbox,
)
from tests.support.outbox_items import meta, reading, take


async def test_higher_priority_source_leases_first_whatever_the_order(tmp_path: Path) -> None:
    now = [1000.0]
    box = await Outbox.open(tmp_path, clock=lambda: now[0])
    try:
        box.priorities = {"telemetry": 10}
        await box.enqueue_item(KIND_BINARY, meta("cam"), b"v" * 100, source="video")
        now[0] += 1
        await box.enqueue_readings(meta("imu"), [reading(1)], source="telemetry")
        first = await take(box)
        assert first is not None
        assert (first.kind, first.source, first.priority) == (KIND_TABULAR, "telemetry", 10)
        second = await take(box)
        assert second is not None and (second.source, second.priority) == ("video", 0)
    finally:
        await box.close()


async def test_aging_lets_a_long_waiting_low_priority_item_go_first(tmp_path: Path) -> None:
    now = [1000.0]
    box = await Outbox.open(tmp_path, OutboxConfig(priority_aging=60.0), clock=lambda: now[0])
    try:
        box.priorities = {"telemetry": 10}
        await box.enqueue_item(KIND_BINARY, meta("cam"), b"v" * 100, source="video")
        now[0] += 11 * 60  # video has aged 11 steps: above a fresh priority 10
        await box.enqueue_readings(meta("imu"), [reading(1)], source="telemetry")
        first = await take(box)
        assert first is not None and first.source == "video"
    finally:
        await box.close()


async def test_a_held_source_waits_and_the_others_go(tmp_path: Path) -> None:
    box = await Outbox.open(tmp_path)
    try:
        await box.enqueue_item(KIND_BINARY, meta("cam"), b"v", source="video")
        await box.enqueue_readings(meta("cam"), [reading(1)], source="video")
        box.held = frozenset({"video"})
        assert await take(box) is None
        assert await box.next_due_in() is None  # idle workers sleep, they do not spin
        await box.enqueue_readings(meta("imu"), [reading(2)], source="telemetry")
        other = await take(box)
        assert other is not None and other.source == "telemetry"
        assert await take(box) is None
        box.held = frozenset()
        assert await box.next_due_in() == 0.0
        got = {(i.kind, i.source) for i in [await take(box), await take(box)] if i}
        assert got == {(KIND_BINARY, "video"), (KIND_TABULAR, "video")}
    finally:
        await box.close()


async def test_two_sources_sharing_metadata_batch_apart(tmp_path: Path) -> None:
    """Same component and method from two sources: each batch is one source's, so a
    hold or priority of one never carries the other's readings along."""
    box = await Outbox.open(tmp_path)
    try:
        await box.enqueue_readings(meta("s"), [reading(1), reading(2)], source="a")
        await box.enqueue_readings(meta("s"), [reading(3)], source="b")
        box.held = frozenset({"a"})
        item = await take(box)
        assert item is not None and (item.source, item.count) == ("b", 1)
    finally:
        await box.close()


async def test_an_outbox_from_before_sources_opens_and_drains(tmp_path: Path) -> None:
    """Rows written before sources were recorded have none (""): always allowed,
    priority 0; new rows of the same metadata batch apart from them."""
    box = await Outbox.open(tmp_path)
    await box.enqueue_readings(meta("s"), [reading(1)])
    await box.close()
    db = sqlite3.connect(tmp_path / "outbox.sqlite3")
    db.execute("DROP INDEX items_source_due")
    db.execute("ALTER TABLE items DROP COLUMN source")
    db.execute("ALTER TABLE meta DROP COLUMN source")
    db.commit()
    db.close()
    box = await Outbox.open(tmp_path)
    try:
        box.held = frozenset({"new"})
        await box.enqueue_readings(meta("s"), [reading(2)], source="new")
        old = await take(box)
        assert old is not None and (old.source, old.count) == ("", 1)
        assert await take(box) is None
    finally:
        await box.close()


async def test_max_age_drops_exactly_what_is_too_old_and_counts_it(tmp_path: Path) -> None:
    """Readings (batched or not), inline, spooled and in-place items older than their
    source's max age go, counted exactly per source; younger data, other sources and
    leased items stay; the robot file of a dropped item is retired by the ledger."""
    now = [1000.0]
    box = await Outbox.open(tmp_path / "state", clock=lambda: now[0])
    try:
        robot = tmp_path / "robot.bin"
        robot.write_bytes(b"r" * 50)
        st = robot.stat()
        await box.enqueue_readings(meta("a"), [reading(i) for i in range(7)], source="old")
        leased = await take(box)  # these 7 readings are in flight
        assert leased is not None and leased.count == 7
        await box.enqueue_readings(meta("b"), [reading(i) for i in range(3)], source="old")
        await box.enqueue_item(KIND_BINARY, meta("c"), b"i" * 10, source="old")
        await box.enqueue_item(KIND_BINARY, meta("c"), b"s" * (INLINE_MAX + 1), source="old")
        await box.enqueue_item(
            KIND_FILE,
            meta("f"),
            FileRef(str(robot), 0, 50),
            claim=Claim(str(robot), 50, st.st_mtime_ns, delete_after=True),
            source="old",
        )
        await box.enqueue_readings(meta("k"), [reading(0)], source="kept")
        now[0] += 40
        await box.enqueue_readings(meta("a"), [reading(9)], source="old")  # young
        now[0] += 15  # the rest is 55 s old; the lease (60 s) still holds
        gone = await box.expire({"old": 50.0, "kept": 1000.0})
        assert sorted((g.readings, g.item is not None) for g in gone) == [
            (1, True),
            (1, True),
            (1, True),
            (3, False),
        ]
        assert all(g.age_s == 55.0 and g.source == "old" for g in gone)
        stats = await box.stats()
        c = stats.counters
        assert (c["expired_items"], c["expired_readings"]) == (3, 6)
        assert (c["expired_items:old"], c["expired_readings:old"]) == (3, 6)
        assert "expired_items:kept" not in c
        assert not robot.exists()  # retired through the ledger, as after an ack
        assert not any((tmp_path / "state" / "spool").iterdir())
        assert stats.readings == 7 + 1 + 1  # in flight, young, another source's
        assert stats.stored_bytes == stats.per_kind[KIND_TABULAR].bytes  # no item left
        await box.ack(leased)  # the in-flight batch was not expired: its ack books it
        assert await box.expire({"old": 50.0}) == []
    finally:
        await box.close()
