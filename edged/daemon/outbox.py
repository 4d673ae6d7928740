"""The durable outbox: every reading and file edged has taken responsibility for.

All SQL of the daemon lives here. One aiosqlite connection (single writer, WAL,
`synchronous=FULL` by default); each public write is one transaction under a lock.

What is stored where:
- tabular readings: one row each in `readings`, already encoded as SensorData bytes,
  tied to an encoded UploadMetadata in `meta`. They are grouped into upload batches
  only when leased: a batch is an id range [lo, hi] of one metadata, recorded once
  (no per-reading rewrite) and moving the metadata's `batched_upto` watermark. A
  batch keeps its id across retries and restarts, so the ingest side can de-duplicate
  a batch that was sent twice. Reading ids only grow (AUTOINCREMENT), so a range never
  takes in a reading enqueued later.
- binary readings and files: one row each in `items`, the bytes inline (small), in a
  private spool file, or left in the source file (path, offset, length) until acked.
- `claims`: source files the outbox knows (committed and deletable, waiting for an
  upload, or uploaded and kept), so a restart neither loses nor re-reads them.
- `offsets`: how far a tailed file has been committed, written in the same
  transaction as its readings.
- `dead_letters`: items the server rejected for good, with status and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

from edged.daemon.config import OutboxConfig
from edged.daemon.policy import batch_take
from edged.daemon.safefs import Identity, Swapped, locate, stat_under, unlink_under
from edged.durable import fsync_dir
from edged.errors import OutboxFull

log = logging.getLogger("edged.outbox")
_T = TypeVar("_T")

KIND_TABULAR = "tabular"
KIND_BINARY = "binary"
KIND_FILE = "file"
KINDS = (KIND_TABULAR, KIND_BINARY, KIND_FILE)

CLAIM_COMMITTED = "committed"  # readings copied in; the source file may be deleted
CLAIM_COMMITTING = "committing"  # the source is still queuing readings of this file
CLAIM_PENDING = "pending"  # fully queued; items still reference the file
CLAIM_DONE = "done"  # uploaded and kept on disk: never send again

INLINE_MAX = 256 * 1024  # larger payloads handed over as bytes go to a spool file
WAL_LIMIT = 1 << 20
WRITE_AMPLIFICATION = 3  # bytes on disk per payload byte (WAL, then table and index)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    digest BLOB NOT NULL UNIQUE,
    metadata BLOB NOT NULL,
    batched_upto INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS readings(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    meta_id INTEGER NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_meta ON readings(meta_id, id);
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    meta_id INTEGER NOT NULL,
    sensor BLOB,
    inline BLOB,
    path TEXT,
    offset INTEGER NOT NULL DEFAULT 0,
    length INTEGER NOT NULL DEFAULT 0,
    stored INTEGER NOT NULL DEFAULT 0,
    lo INTEGER,
    hi INTEGER,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS items_due ON items(next_attempt_at, id);
CREATE INDEX IF NOT EXISTS items_path ON items(path) WHERE path IS NOT NULL;
CREATE TABLE IF NOT EXISTS dead_letters(
    item_id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    dead_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claims(
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    state TEXT NOT NULL,
    delete_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS offsets(
    source TEXT NOT NULL,
    path TEXT NOT NULL,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    line INTEGER NOT NULL,
    PRIMARY KEY(source, path)
);
CREATE TABLE IF NOT EXISTS counters(
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

# Added after the first release: old outbox files get them when opened, and their rows
# keep NULL there (a reference without root or identity; see `safefs.locate`).
ADDED_COLUMNS = (
    ("items", "root", "TEXT"),
    ("items", "dev", "INTEGER"),
    ("items", "ino", "INTEGER"),
    ("claims", "root", "TEXT"),
    ("claims", "dev", "INTEGER"),
    ("claims", "ino", "INTEGER"),
)

_ITEM_COLS = (
    "i.id, i.uid, i.kind, m.metadata, i.sensor, i.inline, i.path, i.offset, i.length,"
    " i.stored, i.count, i.bytes, i.enqueued_at, i.attempts, i.root, i.dev, i.ino"
)


@dataclass(frozen=True)
class Claim:
    """A source file handed to the outbox, identified by what it looked like then.
    `root`: the source's directory, below which no symlink is followed when the file is
    deleted; `ident`: the file's (device, inode) when it was queued."""

    path: str
    size: int
    mtime_ns: int
    delete_after: bool = True
    root: str | None = None
    ident: Identity | None = None


@dataclass(frozen=True)
class Progress:
    """A tailed file's committed position, stored with the readings it covers."""

    source: str
    path: str
    inode: int
    offset: int
    line: int


@dataclass(frozen=True)
class FileRef:
    """Payload bytes left in a source file until the upload is acknowledged; `root` and
    `ident` as in Claim: the uploader reads only that file, reached without links."""

    path: str
    offset: int
    length: int
    root: str | None = None
    ident: Identity | None = None


@dataclass(frozen=True)
class Item:
    """One upload call's worth of work, leased by one worker."""

    id: int
    uid: str
    kind: str
    metadata: bytes
    sensor: bytes | None
    inline: bytes | None
    path: str | None
    offset: int
    length: int
    stored: bool
    count: int
    bytes: int
    enqueued_at: float
    attempts: int
    root: str | None = None
    ident: Identity | None = None


@dataclass(frozen=True)
class DeadLetter:
    id: int
    uid: str
    kind: str
    count: int
    bytes: int
    status: str
    message: str
    dead_at: float
    path: str | None


@dataclass(frozen=True)
class KindStats:
    items: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class OutboxStats:
    items: int
    readings: int
    bytes: int
    stored_bytes: int
    oldest_age_s: float | None
    per_kind: dict[str, KindStats]
    dead_letters: int
    counters: dict[str, int] = field(default_factory=dict)


def _digest(metadata: bytes) -> bytes:
    return hashlib.blake2b(metadata, digest_size=16).digest()


_P = ParamSpec("_P")


def _atomic(
    method: Callable[Concatenate[Outbox, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Outbox, _P], Coroutine[Any, Any, _T]]:
    """Run a write to completion even if its caller is cancelled (SIGTERM, reload):
    the transaction and the bookkeeping after it then always agree with the file."""

    async def run(self: Outbox, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        task = asyncio.ensure_future(method(self, *args, **kwargs))
        self._writes.add(task)
        task.add_done_callback(self._write_done)
        return await asyncio.shield(task)

    run.__name__, run.__qualname__, run.__doc__ = (
        method.__name__,
        method.__qualname__,
        method.__doc__,
    )
    return run


class Outbox:
    """Single-writer store; construct with `await Outbox.open(state_dir)`."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        state_dir: Path,
        limits: OutboxConfig,
        clock: Callable[[], float],
        free_disk: Callable[[Path], int],
    ) -> None:
        self._db = db
        self.state_dir = state_dir
        self.spool_dir = state_dir / "spool"
        self.limits = limits
        self._clock = clock
        self._free_disk = free_disk
        self._lock = asyncio.Lock()
        self._writes: set[asyncio.Future[Any]] = set()
        self._meta_ids: dict[bytes, int] = {}
        self._stored_bytes = 0
        self._readings = 0
        self._reading_bytes = 0
        self._page = 0
        self.work_available = asyncio.Event()
        self.space_available = asyncio.Event()
        self.on_enqueue: Callable[[str, int, int], None] = lambda kind, n, nbytes: None  # metrics

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        limits: OutboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        free_disk: Callable[[Path], int] | None = None,
    ) -> Outbox:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (state_dir / "spool").mkdir(exist_ok=True, mode=0o700)
        path = state_dir / "outbox.sqlite3"
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            os.chmod(path, 0o600)
            limits = limits or OutboxConfig()
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={limits.synchronous}")
            # Keep the WAL small: on a nearly full disk it must not balloon before a
            # checkpoint, and it shrinks back after one.
            await db.execute("PRAGMA wal_autocheckpoint=256")
            await db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            await db.execute("PRAGMA foreign_keys=OFF")
            await db.executescript(SCHEMA)
            await _add_columns(db)
        except BaseException:
            await db.close()
            raise
        box = cls(db, state_dir, limits, clock, free_disk or _disk_free)
        box.ensure_reserve()
        async with db.execute("SELECT count(*), coalesce(sum(size),0) FROM readings") as cur:
            row = await cur.fetchone()
        assert row is not None
        box._readings, box._reading_bytes = int(row[0]), int(row[1])
        box._stored_bytes = box._reading_bytes + await box._scalar(
            "SELECT coalesce(sum(bytes),0) FROM items WHERE stored=1"
        )
        return box

    async def close(self) -> None:
        """Let shielded writes finish (a cancelled caller does not wait for them), then close."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self._db.close()

    async def settled(self) -> None:
        """Wait for writes whose callers were cancelled (they always run to the end)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _write_done(self, task: asyncio.Future[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may be gone (it was cancelled)

    # -- helpers -----------------------------------------------------------------------

    async def _scalar(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self._db.execute(sql, args) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    @contextlib.asynccontextmanager
    async def _tx(self) -> Any:
        """One write transaction; ENOSPC and friends become OutboxFull (backpressure).

        Only ever entered from an `_atomic` method, so no cancellation lands between
        BEGIN and COMMIT: aiosqlite would still run a queued COMMIT on its thread while
        the awaiting task unwinds as if it had failed."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.execute("ROLLBACK")
                self._meta_ids.clear()  # ids cached by the rolled-back transaction
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                    raise OutboxFull(f"outbox database cannot grow: {exc}") from exc
                raise

    @property
    def reserve_bytes(self) -> int:
        return min(max(self.limits.min_free_disk // 4, 256 * 1024), 16 << 20)

    def ensure_reserve(self) -> None:
        """Keep a small file of disk space aside: when the disk fills up anyway, deleting
        it lets uploads and acks (which also write) go on, and acks free space."""
        path = self.state_dir / "reserve"
        if path.exists():
            return
        if self._free_disk(self.state_dir) - self.reserve_bytes < self.limits.min_free_disk:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.reserve_bytes)
        except OSError:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _release_reserve(self) -> bool:
        path = self.state_dir / "reserve"
        if not path.exists():
            return False
        path.unlink()
        log.warning("disk full under %s: released the reserve so uploads can go on", self.state_dir)
        return True

    async def _drain_path(self, op: Callable[[], Awaitable[_T]]) -> _T:
        """Run an upload-path write; on a full disk spend the reserve and try once more."""
        try:
            return await op()
        except OutboxFull:
            if not self._release_reserve():
                raise
            return await op()

    async def _page_size(self) -> int:
        if not self._page:
            self._page = await self._scalar("PRAGMA page_size")
        return self._page

    async def _meta_id(self, db: aiosqlite.Connection, metadata: bytes) -> int:
        digest = _digest(metadata)
        cached = self._meta_ids.get(digest)
        if cached is not None:
            return cached
        await db.execute(
            "INSERT INTO meta(digest, metadata) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (digest, metadata),
        )
        meta_id = await self._scalar("SELECT id FROM meta WHERE digest=?", (digest,))
        self._meta_ids[digest] = meta_id
        return meta_id

    async def _make_room(self, db: aiosqlite.Connection, need: int) -> tuple[int, int]:
        """Apply the size and free-disk limits before a write (inside its transaction)."""
        on_disk = need * WRITE_AMPLIFICATION
        free = self._free_disk(self.state_dir)
        if free - on_disk < self.limits.min_free_disk:
            # Pages freed by acked items are reused before the file grows: count them.
            free += await self._scalar("PRAGMA freelist_count") * await self._page_size()
        if free - on_disk < self.limits.min_free_disk:
            self.space_available.clear()
            raise OutboxFull(
                f"free disk under {self.state_dir} is {free} bytes, below"
                f" outbox.min_free_disk ({self.limits.min_free_disk})"
            )
        self.ensure_reserve()
        over = self._stored_bytes + need - self.limits.max_bytes
        if over <= 0:
            return 0, 0
        if self.limits.on_full != "drop_oldest":
            self.space_available.clear()
            raise OutboxFull(
                f"outbox holds {self._stored_bytes} bytes; {need} more would pass"
                f" outbox.max_bytes ({self.limits.max_bytes})"
            )
        return await self._drop_oldest(db, over)

    async def _drop_oldest(self, db: aiosqlite.Connection, need: int) -> tuple[int, int]:
        """Delete the oldest readings in no batch; (readings, bytes) dropped, which the
        caller books once its transaction commits."""
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
        await self._bump(db, dropped_readings=dropped, dropped_bytes=freed)
        return dropped, freed

    def _book_drop(self, dropped: int, freed: int) -> None:
        self._stored_bytes -= freed
        self._readings -= dropped
        self._reading_bytes -= freed

    async def _bump(self, db: aiosqlite.Connection, **deltas: int) -> None:
        await db.executemany(
            "INSERT INTO counters(name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in deltas.items() if v],
        )

    async def _put_claim(self, db: aiosqlite.Connection, claim: Claim | None, state: str) -> None:
        if claim is not None:
            await db.execute(
                "INSERT INTO claims(path, size, mtime_ns, state, delete_after, root, dev, ino)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET size=excluded.size,"
                " mtime_ns=excluded.mtime_ns, state=excluded.state,"
                " delete_after=excluded.delete_after, root=excluded.root, dev=excluded.dev,"
                " ino=excluded.ino",
                (
                    _db_path(claim.path),
                    claim.size,
                    claim.mtime_ns,
                    state,
                    int(claim.delete_after),
                    *_location(claim.root, claim.ident),
                ),
            )

    async def _put_progress(self, db: aiosqlite.Connection, progress: Progress | None) -> None:
        if progress is not None:
            await db.execute(
                "INSERT INTO offsets(source, path, inode, offset, line) VALUES (?,?,?,?,?)"
                " ON CONFLICT(source, path) DO UPDATE SET inode=excluded.inode,"
                " offset=excluded.offset, line=excluded.line",
                (
                    progress.source,
                    _db_path(progress.path),
                    progress.inode,
                    progress.offset,
                    progress.line,
                ),
            )

    # -- enqueue -----------------------------------------------------------------------

    @_atomic
    async def enqueue_readings(
        self,
        metadata: bytes,
        readings: Sequence[bytes],
        *,
        claim: Claim | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Commit tabular readings (encoded SensorData) durably, with the source's
        claim or offset in the same transaction. Raises OutboxFull to push back."""
        need = sum(len(r) for r in readings)
        now = self._clock()
        async with self._tx() as db:
            dropped = await self._make_room(db, need)
            if readings:
                meta_id = await self._meta_id(db, metadata)
                await db.executemany(
                    "INSERT INTO readings(meta_id, data, size, enqueued_at) VALUES (?,?,?,?)",
                    [(meta_id, r, len(r), now) for r in readings],
                )
            await self._put_claim(db, claim, CLAIM_COMMITTED)
            await self._put_progress(db, progress)
            await self._bump(db, enqueued_readings=len(readings))
        self._book_drop(*dropped)
        self._stored_bytes += need
        self._readings += len(readings)
        self._reading_bytes += need
        self.on_enqueue(KIND_TABULAR, len(readings), need)
        if readings:
            self.work_available.set()

    @_atomic
    async def enqueue_item(
        self,
        kind: str,
        metadata: bytes,
        payload: bytes | FileRef,
        *,
        sensor: bytes | None = None,
        claim: Claim | None = None,
        progress: Progress | None = None,
        more: bool = False,
    ) -> str:
        """Commit one binary reading or file. Small byte payloads are stored inline, large
        ones in a spool file (fsync'd before the row commits); a FileRef stays in place.

        `more=True`: the source will queue further readings of the claimed file, so an
        ack must not delete it yet; `finish_claim` ends that."""
        assert kind in (KIND_BINARY, KIND_FILE)
        uid = uuid.uuid4().hex
        inline: bytes | None = None
        path: str | None = None
        offset, stored = 0, False
        where = _location(None, None)
        if isinstance(payload, FileRef):
            path, offset, length = payload.path, payload.offset, payload.length
            where = _location(payload.root, payload.ident)
        elif len(payload) <= INLINE_MAX:
            inline, length, stored = payload, len(payload), True
        else:
            length, stored = len(payload), True
            try:
                path = str(await asyncio.to_thread(self._spool, uid, payload))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OutboxFull(f"spool directory {self.spool_dir} is full") from exc
                raise
        need = length if stored else 0
        now = self._clock()
        try:
            async with self._tx() as db:
                dropped = await self._make_room(db, need)
                meta_id = await self._meta_id(db, metadata)
                await db.execute(
                    "INSERT INTO items(uid, kind, meta_id, sensor, inline, path, offset, length,"
                    " stored, count, bytes, enqueued_at, root, dev, ino)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        uid,
                        kind,
                        meta_id,
                        sensor,
                        inline,
                        None if path is None else _db_path(path),
                        offset,
                        length,
                        int(stored),
                        1,
                        length,
                        now,
                        *where,
                    ),
                )
                await self._put_claim(db, claim, CLAIM_COMMITTING if more else CLAIM_PENDING)
                await self._put_progress(db, progress)
                await self._bump(db, enqueued_items=1)
        except BaseException:
            if stored and path:
                Path(path).unlink(missing_ok=True)
            raise
        self._book_drop(*dropped)
        self._stored_bytes += need
        self.on_enqueue(kind, 1, length)
        self.work_available.set()
        return uid

    def _spool(self, uid: str, payload: bytes) -> Path:
        path = self.spool_dir / uid
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
        return path

    # -- claims and offsets (sources ask these) ----------------------------------------

    async def claim_of(self, path: str) -> tuple[str, int, int] | None:
        """(state, size, mtime_ns) of a claimed source file, or None if unknown."""
        async with self._db.execute(
            "SELECT state, size, mtime_ns FROM claims WHERE path=?", (_db_path(path),)
        ) as cur:
            row = await cur.fetchone()
        return (str(row[0]), int(row[1]), int(row[2])) if row else None

    @_atomic
    async def finish_claim(self, path: str) -> None:
        """The source queued every reading of `path`: from now on the last ack deletes it
        (at once if every item was already acknowledged)."""
        key = _db_path(path)
        async with self._tx() as db:
            await db.execute(
                "UPDATE claims SET state=? WHERE path=? AND state=?",
                (CLAIM_PENDING, key, CLAIM_COMMITTING),
            )
            still = await self._scalar("SELECT count(*) FROM items WHERE path=?", (key,))
        if not still:
            await self._settle_file(path)

    @_atomic
    async def forget_claim(self, path: str, source: str | None = None) -> None:
        """The source deleted a committed file: nothing left to remember (nor its offset)."""
        async with self._tx() as db:
            key = _db_path(path)
            await db.execute("DELETE FROM claims WHERE path=? AND state=?", (key, CLAIM_COMMITTED))
            if source is not None:
                await db.execute("DELETE FROM offsets WHERE source=? AND path=?", (source, key))

    async def progress_of(self, source: str, path: str) -> Progress | None:
        async with self._db.execute(
            "SELECT inode, offset, line FROM offsets WHERE source=? AND path=?",
            (source, _db_path(path)),
        ) as cur:
            row = await cur.fetchone()
        return Progress(source, path, row[0], row[1], row[2]) if row else None

    @_atomic
    async def save_progress(self, progress: Progress) -> None:
        async with self._tx() as db:
            await self._put_progress(db, progress)

    # -- leasing and outcomes ----------------------------------------------------------

    @_atomic
    async def recover(self) -> dict[str, int]:
        """Start-up: a previous process's leases mean nothing now; finish acks that were
        cut between their commit and the file delete; drop spool files no item owns."""
        async with self._tx() as db:
            cur = await db.execute(
                "UPDATE items SET lease_until=NULL WHERE lease_until IS NOT NULL"
            )
            released = cur.rowcount
        async with self._db.execute(
            "SELECT path FROM claims c WHERE state=? AND NOT EXISTS"
            " (SELECT 1 FROM items i WHERE i.path=c.path)",
            (CLAIM_PENDING,),
        ) as q:
            orphans = [_fs_path(r[0]) for r in await q.fetchall()]
        for path in orphans:
            await self._settle_file(path)
        async with self._db.execute(
            "SELECT path FROM items WHERE stored=1 AND path IS NOT NULL"
        ) as q:
            owned = {_fs_path(r[0]) for r in await q.fetchall()}
        swept = 0
        for spool in list(self.spool_dir.iterdir()):
            if str(spool) not in owned:
                swept += _unlink(str(spool))
        self.work_available.set()
        return {"leases_released": released, "claims_settled": len(orphans), "spool_swept": swept}

    @_atomic
    async def lease(
        self,
        *,
        lease_s: float,
        max_readings: int,
        max_bytes: int,
    ) -> Item | None:
        """The next due item, leased for `lease_s`; forms a new tabular batch if none is
        waiting. None if nothing is due."""
        return await self._drain_path(lambda: self._lease(lease_s, max_readings, max_bytes))

    async def _lease(self, lease_s: float, max_readings: int, max_bytes: int) -> Item | None:
        now = self._clock()
        async with self._tx() as db:
            async with db.execute(
                f"SELECT {_ITEM_COLS} FROM items i JOIN meta m ON m.id=i.meta_id"
                " WHERE i.next_attempt_at <= ? AND (i.lease_until IS NULL OR i.lease_until < ?)"
                " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id)"
                " ORDER BY i.next_attempt_at, i.id LIMIT 1",
                (now, now),
            ) as cur:
                row = await cur.fetchone()
            free = await self._oldest_unbatched(db)
            if free is not None and (row is None or free[1] < row[12]):
                row = await self._new_batch(db, free[0], max_readings, max_bytes)
            if row is None:
                return None
            await db.execute("UPDATE items SET lease_until=? WHERE id=?", (now + lease_s, row[0]))
        return Item(
            id=row[0],
            uid=row[1],
            kind=row[2],
            metadata=row[3],
            sensor=row[4],
            inline=row[5],
            path=None if row[6] is None else _fs_path(row[6]),
            offset=row[7],
            length=row[8],
            stored=bool(row[9]),
            count=row[10],
            bytes=row[11],
            enqueued_at=row[12],
            attempts=row[13],
            root=None if row[14] is None else _fs_path(row[14]),
            ident=_identity(row[15], row[16]),
        )

    async def _oldest_unbatched(self, db: aiosqlite.Connection) -> tuple[int, float] | None:
        """(meta_id, enqueued_at) of the oldest reading in no batch; one index probe per
        metadata (there are few: one per component and method)."""
        async with db.execute(
            "SELECT m.id, (SELECT r.id FROM readings r WHERE r.meta_id=m.id"
            " AND r.id > m.batched_upto ORDER BY r.id LIMIT 1) AS first FROM meta m"
        ) as cur:
            firsts = [(int(mid), int(first)) for mid, first in await cur.fetchall() if first]
        if not firsts:
            return None
        meta_id, first = min(firsts, key=lambda f: f[1])
        async with db.execute("SELECT enqueued_at FROM readings WHERE id=?", (first,)) as cur:
            row = await cur.fetchone()
        assert row is not None
        return meta_id, float(row[0])

    async def _new_batch(
        self, db: aiosqlite.Connection, meta_id: int, max_readings: int, max_bytes: int
    ) -> Any:
        """Bind the oldest unbatched readings of one metadata to a new item, for good."""
        async with db.execute(
            "SELECT r.id, r.size, r.enqueued_at FROM readings r JOIN meta m ON m.id=r.meta_id"
            " WHERE r.meta_id=? AND r.id > m.batched_upto ORDER BY r.id LIMIT ?",
            (meta_id, max_readings),
        ) as cur:
            rows = list(await cur.fetchall())
        n = batch_take([r[1] for r in rows], max_readings, max_bytes)
        rows = rows[:n]
        size = sum(r[1] for r in rows)
        uid = uuid.uuid4().hex
        cur2 = await db.execute(
            "INSERT INTO items(uid, kind, meta_id, stored, lo, hi, count, bytes, enqueued_at)"
            " VALUES (?,?,?,0,?,?,?,?,?)",
            (uid, KIND_TABULAR, meta_id, rows[0][0], rows[-1][0], n, size, rows[0][2]),
        )
        batch_id = cur2.lastrowid
        await db.execute("UPDATE meta SET batched_upto=? WHERE id=?", (rows[-1][0], meta_id))
        async with db.execute(
            f"SELECT {_ITEM_COLS} FROM items i JOIN meta m ON m.id=i.meta_id WHERE i.id=?",
            (batch_id,),
        ) as cur:
            return await cur.fetchone()

    @_atomic
    async def extend_lease(self, item: Item, seconds: float) -> None:
        """Hold `item` for `seconds` more: a big stream may outlast the default lease, and
        an expired lease would hand the same item to a second worker mid-upload."""
        async with self._tx() as db:
            await db.execute(
                "UPDATE items SET lease_until=? WHERE id=?", (self._clock() + seconds, item.id)
            )

    async def readings_of(self, item: Item) -> list[bytes]:
        async with self._db.execute(
            "SELECT r.data FROM items i JOIN readings r ON r.meta_id=i.meta_id"
            " AND r.id BETWEEN i.lo AND i.hi WHERE i.id=? ORDER BY r.id",
            (item.id,),
        ) as cur:
            return [bytes(r[0]) for r in await cur.fetchall()]

    @_atomic
    async def ack(self, item: Item) -> None:
        """The server acknowledged `item`: delete it (and its readings) in one transaction;
        then delete a source or spool file no other item needs."""
        await self._drain_path(lambda: self._ack(item))

    async def _ack(self, item: Item) -> None:
        async with self._tx() as db:
            if item.kind == KIND_TABULAR:
                await db.execute(
                    "DELETE FROM readings WHERE id IN (SELECT r.id FROM items i JOIN readings r"
                    " ON r.meta_id=i.meta_id AND r.id BETWEEN i.lo AND i.hi WHERE i.id=?)",
                    (item.id,),
                )
            cur = await db.execute("DELETE FROM items WHERE id=?", (item.id,))
            if cur.rowcount == 0:
                return  # acknowledged already (a late duplicate): nothing to book twice
            await db.execute("DELETE FROM dead_letters WHERE item_id=?", (item.id,))
            await self._bump(
                db, uploaded_items=1, uploaded_readings=item.count, uploaded_bytes=item.bytes
            )
            last_ref = item.path is not None and not await self._scalar(
                "SELECT count(*) FROM items WHERE path=?", (_db_path(item.path),)
            )
        if item.kind == KIND_TABULAR:
            self._readings -= item.count
            self._reading_bytes -= item.bytes
        if item.stored or item.kind == KIND_TABULAR:
            self._stored_bytes -= item.bytes
            self.space_available.set()
        if item.path is not None and item.stored:
            _unlink(item.path)  # our own spool file; a crash here is swept by recover()
        elif item.path is not None and last_ref:
            await self._settle_file(item.path)

    async def _settle_file(self, path: str) -> None:
        """No item reads `path` any more: delete it if its claim says so, then forget the
        claim and offsets. The claim outlives the unlink, so a crash in between is
        finished by `recover()` instead of leaving the file to be sent again."""
        key = _db_path(path)
        async with self._db.execute(
            "SELECT state, delete_after, size, mtime_ns, root, dev, ino FROM claims WHERE path=?",
            (key,),
        ) as cur:
            row = await cur.fetchone()
        if row is None or row[0] != CLAIM_PENDING:
            return  # unknown, or the source is still queuing readings of it
        root = None if row[4] is None else _fs_path(row[4])
        forget = await asyncio.to_thread(
            _retire_file, path, root, _identity(row[5], row[6]), row[2], row[3], bool(row[1])
        )
        async with self._tx() as db:
            if forget:
                await db.execute("DELETE FROM claims WHERE path=?", (key,))
                await db.execute("DELETE FROM offsets WHERE path=?", (key,))
            else:
                await db.execute("UPDATE claims SET state=? WHERE path=?", (CLAIM_DONE, key))

    @_atomic
    async def retry_later(self, item: Item, delay_s: float, error: str) -> None:
        async with self._tx() as db:
            await db.execute(
                "UPDATE items SET attempts=attempts+1, next_attempt_at=?, lease_until=NULL,"
                " last_error=? WHERE id=?",
                (self._clock() + delay_s, _text(error), item.id),
            )
            await self._bump(db, retries=1)

    @_atomic
    async def release(self, item: Item) -> None:
        """Give a leased item back untouched (pause, shutdown, auth stop)."""
        async with self._tx() as db:
            await db.execute("UPDATE items SET lease_until=NULL WHERE id=?", (item.id,))

    @_atomic
    async def dead_letter(self, item: Item, status: str, message: str) -> None:
        message = _text(message)
        async with self._tx() as db:
            await db.execute(
                "INSERT OR REPLACE INTO dead_letters(item_id, status, message, dead_at)"
                " VALUES (?,?,?,?)",
                (item.id, status, message, self._clock()),
            )
            await db.execute(
                "UPDATE items SET attempts=attempts+1, lease_until=NULL, last_error=? WHERE id=?",
                (f"{status}: {message}", item.id),
            )
            await self._bump(db, dead_lettered=1)

    async def dead_letters(self) -> list[DeadLetter]:
        async with self._db.execute(
            "SELECT i.id, i.uid, i.kind, i.count, i.bytes, d.status, d.message, d.dead_at,"
            " i.path FROM dead_letters d JOIN items i ON i.id=d.item_id ORDER BY d.dead_at"
        ) as cur:
            rows = await cur.fetchall()
        return [
            DeadLetter(
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], _fs_path(r[8]) if r[8] else None
            )
            for r in rows
        ]

    async def waiting(self, limit: int = 20) -> list[tuple[str, str | None, int, int, str | None]]:
        """(kind, path, readings, bytes, last error) of the oldest `limit` items still to
        send (dead letters excepted); readings not yet batched are in `stats()` only. For
        `edged run --until-empty` to say what stayed queued."""
        async with self._db.execute(
            "SELECT kind, path, count, bytes, last_error FROM items i WHERE NOT EXISTS"
            " (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id) ORDER BY id LIMIT ?",
            (limit,),
        ) as cur:
            rows = await cur.fetchall()
        return [(r[0], _fs_path(r[1]) if r[1] else None, r[2], r[3], r[4]) for r in rows]

    @_atomic
    async def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters back in the queue (all of them when `ids` is None)."""
        async with self._tx() as db:
            if ids is None:
                cur = await db.execute(
                    "UPDATE items SET attempts=0, next_attempt_at=0 WHERE id IN"
                    " (SELECT item_id FROM dead_letters)"
                )
                n = cur.rowcount
                await db.execute("DELETE FROM dead_letters")
            else:
                marks = ",".join("?" * len(ids))
                cur = await db.execute(
                    f"UPDATE items SET attempts=0, next_attempt_at=0 WHERE id IN ({marks})"
                    f" AND id IN (SELECT item_id FROM dead_letters)",
                    list(ids),
                )
                n = cur.rowcount
                await db.execute(f"DELETE FROM dead_letters WHERE item_id IN ({marks})", list(ids))
        if n:
            self.work_available.set()
        return int(n)

    @_atomic
    async def make_all_due(self) -> None:
        """`sync-now`: forget every item's backoff."""
        async with self._tx() as db:
            await db.execute("UPDATE items SET next_attempt_at=0 WHERE next_attempt_at > 0")
        self.work_available.set()

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest waiting item is due (None: nothing waiting). Items
        leased right now are not waiting: counting them made idle workers spin."""
        if await self._oldest_unbatched(self._db) is not None:
            return 0.0
        now = self._clock()
        async with self._db.execute(
            "SELECT min(next_attempt_at) FROM items i WHERE (lease_until IS NULL OR"
            " lease_until < ?) AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id)",
            (now,),
        ) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return None
        return max(0.0, float(row[0]) - now)

    # -- status ------------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        """Backlog per kind; for tabular data `items` counts readings, batched or not.
        Cheap at any backlog: reading totals are kept in memory, the rest is indexed."""
        async with self._db.execute(
            "SELECT kind, count(*), coalesce(sum(bytes),0), min(enqueued_at) FROM items"
            " WHERE kind != ? GROUP BY kind",
            (KIND_TABULAR,),
        ) as cur:
            kinds = await cur.fetchall()
        async with self._db.execute("SELECT enqueued_at FROM readings ORDER BY id LIMIT 1") as cur:
            first = await cur.fetchone()
        oldest = float(first[0]) if first else None
        per_kind: dict[str, KindStats] = {k: KindStats() for k in KINDS}
        per_kind[KIND_TABULAR] = KindStats(self._readings, self._reading_bytes)
        for kind, n, size, enq in kinds:
            per_kind[kind] = KindStats(n, size)
            if enq is not None and (oldest is None or enq < oldest):
                oldest = enq
        readings = self._readings
        async with self._db.execute("SELECT name, value FROM counters") as cur:
            counters = {str(k): int(v) for k, v in await cur.fetchall()}
        return OutboxStats(
            items=sum(k.items for k in per_kind.values()),
            readings=readings,
            bytes=sum(k.bytes for k in per_kind.values()),
            stored_bytes=self._stored_bytes,
            oldest_age_s=None if oldest is None else max(0.0, self._clock() - oldest),
            per_kind=per_kind,
            dead_letters=await self._scalar("SELECT count(*) FROM dead_letters"),
            counters=counters,
        )


def _db_path(path: str) -> str | bytes:
    """A path as the outbox stores it: text, or, for a name that is not valid UTF-8
    (Linux names are bytes; SQLite text must be UTF-8), its raw bytes as a BLOB. The same
    path always maps to the same value, so lookups and joins match."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def _fs_path(value: str | bytes) -> str:
    """Inverse of `_db_path`."""
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def _text(message: str) -> str:
    """Free text (errors naming odd paths) made storable as SQLite text."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _unlink(path: str) -> bool:
    """Delete one of our own spool files; False (logged) if the OS refuses."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot delete %s after upload: %s", path, exc.strerror)
        return False
    return True


def _retire_file(
    path: str,
    root: str | None,
    ident: Identity | None,
    size: int,
    mtime_ns: int,
    delete_after: bool,
) -> bool:
    """Delete an uploaded source file if its claim says so; True: forget the claim.

    Reached only below `root` without links, and deleted only if it is still the file
    that was queued. Rewritten since (other size, mtime or inode): kept, and forgetting
    the claim lets its source queue the new version. A link or a non-file in its place:
    nothing is deleted, and the claim is kept as done so the path is not sent again."""
    try:
        base, rel = locate(path, root)
        st = stat_under(base, rel)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise Swapped(f"{path} is no longer a regular file (a symlink now?)")
    except FileNotFoundError:
        return True
    except Swapped as exc:
        log.warning("%s; not deleting anything after its upload", exc)
        return False
    except (OSError, ValueError) as exc:
        log.warning("cannot check %s after upload: %s", path, exc)
        return False
    if (ident is not None and Identity.of(st) != ident) or (
        mtime_ns and (st.st_size, st.st_mtime_ns) != (size, mtime_ns)
    ):
        log.warning("%s changed after it was queued; keeping it", path)
        return True
    if not delete_after:
        return False  # kept on purpose: remember it, never resend
    try:
        unlink_under(base, rel, Identity.of(st))
    except Swapped as exc:
        log.warning("%s; not deleting anything after its upload", exc)
        return False
    except OSError as exc:
        log.warning("cannot delete %s after upload: %s", path, exc.strerror or exc)
        return False
    return True


_I64 = 1 << 63


def _location(
    root: str | None, ident: Identity | None
) -> tuple[str | bytes | None, int | None, int | None]:
    """(root, dev, ino) as stored; device and inode numbers are unsigned 64-bit, SQLite
    integers signed, so the upper half is stored as negative numbers."""
    if ident is None:
        return (None if root is None else _db_path(root), None, None)
    dev, ino = (v - 2 * _I64 if v >= _I64 else v for v in ident)
    return (None if root is None else _db_path(root), dev, ino)


def _identity(dev: int | None, ino: int | None) -> Identity | None:
    if dev is None or ino is None:
        return None
    return Identity(dev + 2 * _I64 if dev < 0 else dev, ino + 2 * _I64 if ino < 0 else ino)


async def _add_columns(db: aiosqlite.Connection) -> None:
    """Bring an outbox file written by an older edged up to ADDED_COLUMNS."""
    for table in dict.fromkeys(t for t, _, _ in ADDED_COLUMNS):
        async with db.execute(f"PRAGMA table_info({table})") as cur:
            have = {str(r[1]) for r in await cur.fetchall()}
        for t, column, kind in ADDED_COLUMNS:
            if t == table and column not in have:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free
