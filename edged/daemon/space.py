"""Disk policy of the outbox: size and free-disk limits, the on_full policy, the reserve
file, and the private spool for large payloads.

`make_room` runs inside the write transaction it guards (see `outbox.Outbox`), so a
write either fits (after dropping the oldest readings, with `on_full: drop_oldest`) or
raises OutboxFull and nothing of it lands. The totals it checks are kept in memory
(`held`) and booked only after the transaction commits.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosqlite

from edged.daemon.config import OutboxConfig
from edged.daemon.queue import bump, scalar
from edged.durable import fsync_dir
from edged.errors import OutboxFull

log = logging.getLogger("edged.outbox")
_T = TypeVar("_T")

WAL_LIMIT = 1 << 20
CHECKPOINT_PAGES = 256  # wal_autocheckpoint: the most WAL pages a checkpoint may copy
# Disk a checkpoint of a full WAL may need (the database grows by the pages it copies),
# plus room for the write that then runs: a full disk without it cannot checkpoint,
# so the WAL cannot restart and every write fails (the outbox wedges).
CHECKPOINT_ROOM = CHECKPOINT_PAGES * 4096 + (256 << 10)
WRITE_AMPLIFICATION = 3  # bytes on disk per payload byte (WAL, then table and index)


@dataclass
class Held:
    """What the outbox holds, kept in memory (the status and the limits read it often)."""

    stored_bytes: int = 0  # readings plus inline and spooled payloads
    readings: int = 0
    reading_bytes: int = 0

    def add_readings(self, count: int, size: int) -> None:
        self.readings += count
        self.reading_bytes += size
        self.stored_bytes += size

    def drop_readings(self, count: int, size: int) -> None:
        self.add_readings(-count, -size)


class Space:
    """Limits and disk space of one outbox directory."""

    def __init__(
        self, state_dir: Path, limits: OutboxConfig, free_disk: Callable[[Path], int]
    ) -> None:
        self.state_dir = state_dir
        self.spool_dir = state_dir / "spool"
        self.limits = limits
        self.held = Held()
        self.available = asyncio.Event()
        self._free_disk = free_disk
        self._page = 0
        self._spent = False

    # -- the reserve --------------------------------------------------------------------

    @property
    def reserve_bytes(self) -> int:
        return min(max(self.limits.min_free_disk // 4, CHECKPOINT_ROOM), 16 << 20)

    @property
    def reserve_spent(self) -> bool:
        """The reserve went to a full disk and is not back yet."""
        return self._spent

    def ensure_reserve(self) -> None:
        """Keep a small file of disk space aside: when the disk fills up anyway, deleting
        it lets uploads and acks (which also write) go on, and acks free space."""
        path = self.state_dir / "reserve"
        if path.exists():
            self._spent = False
            return
        if self._free_disk(self.state_dir) - self.reserve_bytes < self.limits.min_free_disk:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.reserve_bytes)
        except OSError:
            path.unlink(missing_ok=True)
        else:
            self._spent = False
        finally:
            os.close(fd)

    def _release_reserve(self) -> bool:
        path = self.state_dir / "reserve"
        if not path.exists():
            return False
        path.unlink()
        self._spent = True
        log.warning("disk full under %s: released the reserve so uploads can go on", self.state_dir)
        return True

    async def drain_path(
        self, op: Callable[[], Awaitable[_T]], checkpoint: Callable[[], Awaitable[None]]
    ) -> _T:
        """Run an upload-path write (these free space, so they must get through). On a
        full disk: truncate the WAL and try again; then spend the reserve on a checkpoint
        (which may have to grow the database) and try once more."""
        try:
            return await op()
        except OutboxFull:
            await checkpoint()
        try:
            return await op()
        except OutboxFull:
            if not self._release_reserve():
                raise
            await checkpoint()
        return await op()

    # -- limits -------------------------------------------------------------------------

    async def make_room(self, db: aiosqlite.Connection, need: int) -> tuple[int, int]:
        """Apply the size and free-disk limits before a write (inside its transaction);
        (readings, bytes) dropped to make room, to book once the transaction commits."""
        on_disk = need * WRITE_AMPLIFICATION
        if self._spent:
            on_disk += self.reserve_bytes  # keep its room free until it is back
        free = self._free_disk(self.state_dir)
        if free - on_disk < self.limits.min_free_disk:
            # Pages freed by acked items are reused before the file grows: count them.
            free += await scalar(db, "PRAGMA freelist_count") * await self._page_size(db)
        if free - on_disk < self.limits.min_free_disk:
            self.available.clear()
            raise OutboxFull(
                f"free disk under {self.state_dir} is {free} bytes, below"
                f" outbox.min_free_disk ({self.limits.min_free_disk})"
            )
        self.ensure_reserve()
        over = self.held.stored_bytes + need - self.limits.max_bytes
        if over <= 0:
            return 0, 0
        if self.limits.on_full != "drop_oldest":
            self.available.clear()
            raise OutboxFull(
                f"outbox holds {self.held.stored_bytes} bytes; {need} more would pass"
                f" outbox.max_bytes ({self.limits.max_bytes})"
            )
        return await self._drop_oldest(db, over)

    async def _drop_oldest(self, db: aiosqlite.Connection, need: int) -> tuple[int, int]:
        """Delete the oldest readings in no batch; (readings, bytes) dropped."""
        freed = 0
        async with db.execute(
            "SELECT r.id, r.size FROM readings r JOIN meta m ON m.id=r.meta_id"
            " WHERE r.id > m.batched_upto ORDER BY r.id LIMIT 100000"
        ) as cur:
            rows = await cur.fetchall()
        doomed: list[tuple[int]] = []
        for rid, size in rows:
            if freed >= need:
                break
            freed += size
            doomed.append((rid,))
        dropped = len(doomed)
        await db.executemany("DELETE FROM readings WHERE id=?", doomed)
        if freed < need:
            raise OutboxFull(
                f"outbox.max_bytes ({self.limits.max_bytes}) reached and nothing left to drop"
            )
        await bump(db, dropped_readings=dropped, dropped_bytes=freed)
        return dropped, freed

    async def _page_size(self, db: aiosqlite.Connection) -> int:
        if not self._page:
            self._page = await scalar(db, "PRAGMA page_size")
        return self._page

    # -- the spool ----------------------------------------------------------------------

    def spool(self, uid: str, payload: bytes) -> Path:
        """Write a large payload to a private file, fsync'd before its row commits.
        Blocking: run it in a thread. A full disk is OutboxFull (backpressure)."""
        path = self.spool_dir / uid
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            fsync_dir(self.spool_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutboxFull(f"spool directory {self.spool_dir} is full") from exc
            raise
        return path

    def sweep_spool(self, owned: set[str]) -> int:
        """Delete spool files no item owns (a crash between spool write and commit, or
        between ack and delete); how many went."""
        return sum(
            unlink_own(str(p)) for p in list(self.spool_dir.iterdir()) if str(p) not in owned
        )


def unlink_own(path: str) -> bool:
    """Delete one of our own spool files; False (logged) if the OS refuses."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot delete %s after upload: %s", path, exc.strerror)
        return False
    return True


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
