"""The outbox on a disk that really fills up (a tmpfs): filled until SQLite itself says
"database or disk is full", it must still drain to empty, twice over."""

from __future__ import annotations

from pathlib import Path

from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import Outbox
from edged.errors import OutboxFull
from tests.support.outbox_items import meta, reading, take
from tests.support.tmpfs import needs_root, tmpfs

PAD = b"x" * 50  # an unknown field's worth of bytes: readings of ~60 bytes


def never_full(_: Path) -> int:
    """A free-disk probe that misses the filling (another writer, a wrong estimate):
    only SQLite's own ENOSPC stops the writes."""
    return 1 << 40


async def fill(box: Outbox, start: int) -> int:
    """Enqueue files of 100 readings until the disk refuses; how many went in."""
    n = start
    for f in range(2000):
        try:
            await box.enqueue_readings(
                meta(f"s{f % 3}"), [reading(n + i) + PAD for i in range(100)]
            )
        except OutboxFull:
            return n - start
        n += 100
    raise AssertionError("the tmpfs never filled up")


async def drain(box: Outbox) -> int:
    """Lease and ack until nothing is left; readings acked."""
    acked = 0
    for _ in range(10_000):
        item = await take(box)
        if item is None:
            return acked
        await box.ack(item)
        acked += item.count
    raise AssertionError("the outbox did not drain")


@needs_root
async def test_a_really_full_disk_still_drains_to_empty(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", 3 << 20) as mnt:
        box = await Outbox.open(
            mnt / "state", OutboxConfig(min_free_disk=256 << 10), free_disk=never_full
        )
        try:
            first = await fill(box, 0)
            assert first > 0
            assert await drain(box) == first  # before: every lease "database or disk is full"
            second = await fill(box, first)  # the reserve is spent now
            assert second > 0
            assert await drain(box) == second
            assert (await box.stats()).items == 0
        finally:
            await box.close()
