"""The durable outbox: every reading and file edged has taken responsibility for.

All SQL of the daemon lives in this module and the three it composes, each owning one
seam; they share one aiosqlite connection (single writer, WAL, `synchronous=FULL` by
default) and each public write below is one transaction under a lock, so what they
write together commits together:
- `queue`: readings and items in, leases out, acks and dead letters;
- `ledger`: claims on source files and offsets of tailed files, a typed state machine;
  the only code that deletes a robot file;
- `space`: size and free-disk limits, the on_full policy, the reserve file, the spool.

Order that makes it safe: a robot file is deleted only after what it held is committed
(readings) or acknowledged (items reading from it), and its claim is forgotten only
after the delete, so a crash in between is finished by `recover()`. That tidy-up after
a delete is not written on its own: it rides in the next transaction (`Tidy`), so a
file costs one commit, not two; until then reads already see it (`claim_of`,
`progress_of`), and `close()` writes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

from edged.daemon.config import OutboxConfig
from edged.daemon.ledger import (
    Claim,
    ClaimRecord,
    ClaimState,
    Ledger,
    Progress,
    Retired,
    claim_after_retire,
    claim_on_enqueue,
    is_gone,
    retire_file,
)
from edged.daemon.queue import (
    INLINE_MAX,
    KIND_BINARY,
    KIND_FILE,
    KIND_TABULAR,
    KINDS,
    DeadLetter,
    Expired,
    FileRef,
    Item,
    KindStats,
    NewItem,
    OutboxStats,
    Queue,
    scalar,
)
from edged.daemon.safefs import Identity
from edged.daemon.script import Script, on_thread, run_script
from edged.daemon.space import CHECKPOINT_PAGES, WAL_LIMIT, Space, disk_free, unlink_own
from edged.errors import OutboxFull

__all__ = [
    "ADDED_COLUMNS",
    "ADDED_INDEXES",
    "INLINE_MAX",
    "KINDS",
    "KIND_BINARY",
    "KIND_FILE",
    "KIND_TABULAR",
    "Claim",
    "ClaimRecord",
    "ClaimState",
    "DeadLetter",
    "Expired",
    "FileRef",
    "Item",
    "KindStats",
    "Outbox",
    "OutboxStats",
    "Progress",
]

_T = TypeVar("_T")
log = logging.getLogger("edged.outbox")

TIDY_MAX = 1024  # tidy-ups waiting for a transaction; at this many they get their own


@dataclass(frozen=True)
class Tidy:
    """The ledger write due after a robot file was retired; it waits for the next
    transaction. `committed_only`: forget the claim only if still committed, and only
    `source`'s offsets (a source retired the file); else store `state` (None: forget
    the claim and every offset of the path), as the last ack decided."""

    state: ClaimState | None
    source: str | None = None
    committed_only: bool = False

    def claim(self, record: ClaimRecord | None) -> ClaimRecord | None:
        """`record` as it reads once this is written."""
        if record is None:
            return None
        if self.committed_only:
            return None if record.state is ClaimState.COMMITTED else record
        return None if self.state is None else replace(record, state=self.state)

    def hides_progress(self, source: str) -> bool:
        if self.committed_only:
            return self.source == source
        return self.state is None


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
    ("meta", "source", "TEXT"),
    ("items", "source", "TEXT"),
)
# Indexes over ADDED_COLUMNS, made once the columns exist.
ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS items_source_due ON items(source, next_attempt_at, id)",
)

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
        self.space = Space(state_dir, limits, free_disk)
        self.queue = Queue(db)
        self.ledger = Ledger(db)
        self._clock = clock
        self._lock = asyncio.Lock()
        self._writes: set[asyncio.Future[Any]] = set()
        self._tidy: dict[str, Tidy] = {}  # by path; written by the next transaction
        self.work_available = asyncio.Event()
        self.space_available = self.space.available
        self.on_enqueue: Callable[[str, int, int], None] = lambda kind, n, nbytes: None  # metrics
        self.held: frozenset[str] = frozenset()
        """Sources that may not upload now (window closed, condition false, paused):
        set by the daemon from `schedule.gate`; leases skip their items."""
        self.priorities: dict[str, int] = {}
        """Each source's configured priority (absent: 0)."""

    @property
    def spool_dir(self) -> Path:
        return self.space.spool_dir

    @property
    def limits(self) -> OutboxConfig:
        return self.space.limits

    @limits.setter
    def limits(self, limits: OutboxConfig) -> None:
        """Applied on reload (SIGHUP); checked by the next write."""
        self.space.limits = limits

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
            # Before any table exists (a no-op on older outboxes): acks' freed pages can
            # then go back to the file system, to put a spent disk reserve back.
            await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={limits.synchronous}")
            # Keep the WAL small: on a nearly full disk it must not balloon before a
            # checkpoint, and it shrinks back after one.
            await db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            await db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            await db.execute("PRAGMA foreign_keys=OFF")
            await db.executescript(SCHEMA)
            await _add_columns(db)
        except BaseException:
            await db.close()
            raise
        box = cls(db, state_dir, limits, clock, free_disk or disk_free)
        box.space.ensure_reserve()
        async with db.execute("SELECT count(*), coalesce(sum(size),0) FROM readings") as cur:
            row = await cur.fetchone()
        assert row is not None
        box.space.held.add_readings(int(row[0]), int(row[1]))
        box.space.held.stored_bytes += await scalar(
            db, "SELECT coalesce(sum(bytes),0) FROM items WHERE stored=1"
        )
        return box

    async def close(self) -> None:
        """Let shielded writes finish (a cancelled caller does not wait for them), write
        the tidy-up still waiting, then close."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        if self._tidy:
            try:
                await self.tidy()
            except (OutboxFull, sqlite3.Error) as exc:  # recover() finishes it next time
                log.warning("outbox closed with its tidy-up unwritten: %s", exc)
        await self._db.close()

    async def settled(self) -> None:
        """Wait for writes whose callers were cancelled (they always run to the end)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _write_done(self, task: asyncio.Future[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the caller may be gone (it was cancelled)

    @contextlib.asynccontextmanager
    async def _tx(self, script: Script | None = None) -> Any:
        """One write transaction; ENOSPC and friends become OutboxFull (backpressure).

        BEGIN and the waiting tidy-up are one hop to the SQLite thread; `script` (the
        writes whose results nobody reads) runs with the COMMIT in one more, after the
        body's own statements. Only ever entered from an `_atomic` method, so no
        cancellation lands between BEGIN and COMMIT: aiosqlite would still run a queued
        COMMIT on its thread while the awaiting task unwinds as if it had failed."""
        async with self._writing():
            begin = Script()
            begin.execute("BEGIN IMMEDIATE")
            tidied = self._write_tidy(begin)
            await run_script(self._db, begin)
            yield self._db
            end = script or Script()
            end.execute("COMMIT")
            await run_script(self._db, end)
            self._tidied(tidied)

    async def _tx_on(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """`_tx` whose statements are all `fn`'s (a function of the connection): BEGIN,
        the waiting tidy-up, `fn` and COMMIT run on the SQLite thread in one hop. For the
        upload path's lease and ack, which run once per batch. aiosqlite's thread holds
        the previous call's result until this one returns: a statement returning rows
        must be read to the end or its cursor closed, or its statement is still in
        progress at this COMMIT ("cannot commit transaction")."""
        async with self._writing():
            begin = Script()
            begin.execute("BEGIN IMMEDIATE")
            tidied = self._write_tidy(begin)

            def whole(conn: sqlite3.Connection) -> _T:
                begin.run(conn)
                out = fn(conn)
                conn.execute("COMMIT")
                return out

            out = await on_thread(self._db, whole)
            self._tidied(tidied)
            return out

    @contextlib.asynccontextmanager
    async def _writing(self) -> Any:
        """The write lock; a transaction that failed is rolled back (whatever hop it
        failed in) and a full disk becomes OutboxFull."""
        async with self._lock:
            try:
                yield
            except BaseException as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        await self._db.execute("ROLLBACK")
                self.queue.forget_cached()  # ids cached by the rolled-back transaction
                if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
                    raise OutboxFull(f"outbox database cannot grow: {exc}") from exc
                raise

    def _tidied(self, tidied: dict[str, Tidy]) -> None:
        """Drop the tidy-ups a committed transaction wrote (unless replaced since)."""
        for path, tidy in tidied.items():
            if self._tidy.get(path) is tidy:
                del self._tidy[path]

    def _write_tidy(self, script: Script) -> dict[str, Tidy]:
        """Write every waiting tidy-up first in this transaction (so a write of the same
        path after it wins); what was written, to drop once it commits."""
        tidied = dict(self._tidy)
        for path, tidy in tidied.items():
            if tidy.committed_only:
                self.ledger.forget_committed(script, [path], tidy.source)
            else:
                self.ledger.set_state(script, path, tidy.state)
        return tidied

    @_atomic
    async def tidy(self) -> None:
        """Write the waiting tidy-up now (in its own transaction)."""
        if self._tidy:
            async with self._tx():
                pass

    # -- space -------------------------------------------------------------------------

    @property
    def reserve_bytes(self) -> int:
        return self.space.reserve_bytes

    def ensure_reserve(self) -> None:
        self.space.ensure_reserve()

    # -- enqueue -----------------------------------------------------------------------

    @_atomic
    async def enqueue_readings(
        self,
        metadata: bytes,
        readings: Sequence[bytes],
        *,
        claim: Claim | None = None,
        progress: Progress | None = None,
        source: str = "",
    ) -> None:
        """Commit tabular readings (encoded SensorData) durably, with the source's
        claim or offset in the same transaction. Raises OutboxFull to push back.
        `source` names the source they came from (its priority, windows, max_age)."""
        need = sum(len(r) for r in readings)
        now = self._clock()
        script = Script()
        async with self._tx(script) as db:
            dropped = await self.space.make_room(db, need)
            self.queue.add_readings(script, metadata, readings, now, source)
            state = claim_on_enqueue(by_reference=False, more=False)
            self.ledger.put_claim(script, claim, state)
            self.ledger.put_progress(script, progress)
        self.space.held.drop_readings(*dropped)
        self.space.held.add_readings(len(readings), need)
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
        source: str = "",
    ) -> str:
        """Commit one binary reading or file. Small byte payloads are stored inline, large
        ones in a spool file (fsync'd before the row commits); a FileRef stays in place.

        `more=True`: the source will queue further readings of the claimed file, so an
        ack must not delete it yet; `finish_claim` ends that."""
        assert kind in (KIND_BINARY, KIND_FILE)
        uid = uuid.uuid4().hex
        if isinstance(payload, FileRef):
            new = NewItem(
                uid,
                kind,
                sensor,
                None,
                payload.path,
                payload.offset,
                payload.length,
                False,
                payload.root,
                payload.ident,
            )
        elif len(payload) <= INLINE_MAX:
            new = NewItem(uid, kind, sensor, payload, None, 0, len(payload), True)
        else:
            spooled = await asyncio.to_thread(self.space.spool, uid, payload)
            new = NewItem(uid, kind, sensor, None, str(spooled), 0, len(payload), True)
        need = new.length if new.stored else 0
        now = self._clock()
        script = Script()
        try:
            async with self._tx(script) as db:
                dropped = await self.space.make_room(db, need)
                self.queue.add_item(script, metadata, new, now, source)
                state = claim_on_enqueue(by_reference=True, more=more)
                self.ledger.put_claim(script, claim, state)
                self.ledger.put_progress(script, progress)
        except BaseException:
            if new.stored and new.path:
                Path(new.path).unlink(missing_ok=True)
            raise
        self.space.held.drop_readings(*dropped)
        self.space.held.stored_bytes += need
        self.on_enqueue(kind, 1, new.length)
        self.work_available.set()
        return uid

    # -- claims and offsets (sources ask these) ----------------------------------------

    async def claim_of(self, path: str) -> ClaimRecord | None:
        """The ledger's claim on a source file, or None if it knows none."""
        record = await self.ledger.claim_of(path)
        tidy = self._tidy.get(path)
        return record if tidy is None else tidy.claim(record)

    @_atomic
    async def finish_claim(self, path: str) -> None:
        """The source queued every reading of `path`: from now on the last ack deletes it
        (at once if every item was already acknowledged)."""
        script = Script()
        self.ledger.finish(script, path)
        async with self._tx(script) as db:
            still = await self.queue.refs_to(db, path)
        if not still:
            await self._settle_file(path)

    @_atomic
    async def forget_claim(self, path: str, source: str | None = None) -> None:
        """Forget a committed claim (the file changed since: its source reads the rest),
        and with `source` also that source's offset of it."""
        script = Script()
        self.ledger.forget_committed(script, [path], source)
        async with self._tx(script):
            pass

    @_atomic
    async def retire_committed(
        self,
        path: str,
        root: str,
        ident: Identity,
        *,
        source: str,
        also: Sequence[str] = (),
    ) -> Retired:
        """Every reading of `path` is committed: delete the file (if it is still the one
        read, reached below `root` without links), then forget its claim and `source`'s
        offsets of it and of the `also` keys (e.g. the `.prog` name it was written under)
        with the next transaction."""
        outcome = await asyncio.to_thread(retire_file, path, root, ident)
        for key in (path, *also):
            self._tidy[key] = Tidy(None, source, committed_only=True)
        await self._bound_tidy()
        return outcome

    async def progress_of(self, source: str, path: str) -> Progress | None:
        tidy = self._tidy.get(path)
        if tidy is not None and tidy.hides_progress(source):
            return None
        return await self.ledger.progress_of(source, path)

    @_atomic
    async def save_progress(self, progress: Progress) -> None:
        script = Script()
        self.ledger.put_progress(script, progress)
        async with self._tx(script):
            pass

    # -- leasing and outcomes ----------------------------------------------------------

    @_atomic
    async def recover(self) -> dict[str, int]:
        """Start-up: a previous process's leases mean nothing now; finish acks that were
        cut between their commit and the file delete; drop spool files no item owns."""
        async with self._tx() as db:
            released = await self.queue.release_all(db)
        orphans = await self.ledger.orphans()
        for path in orphans:
            await self._settle_file(path)
        # Committed claims of files that are gone: retired, and the tidy-up was lost.
        committed = await self.ledger.committed()
        gone = [p for p, root in committed if await asyncio.to_thread(is_gone, p, root)]
        if gone:
            script = Script()
            for path in gone:
                self.ledger.set_state(script, path, None)
            async with self._tx(script):
                pass
        owned = await self.queue.spooled()
        swept = await asyncio.to_thread(self.space.sweep_spool, owned)
        self.work_available.set()
        return {
            "leases_released": released,
            "claims_settled": len(orphans),
            "claims_swept": len(gone),
            "spool_swept": swept,
        }

    @_atomic
    async def lease(
        self,
        *,
        lease_s: float,
        max_readings: int,
        max_bytes: int,
        floor: int | None = None,
    ) -> Item | None:
        """The next due item, leased for `lease_s`; forms a new tabular batch if none is
        waiting. None if nothing is due. Highest effective priority first (aged by
        `outbox.priority_aging`); sources in `held` are skipped, and with `floor` those
        of a lower priority."""
        return await self.space.drain_path(
            lambda: self._lease(lease_s, max_readings, max_bytes, floor), self._checkpoint
        )

    async def _lease(
        self, lease_s: float, max_readings: int, max_bytes: int, floor: int | None = None
    ) -> Item | None:
        now = self._clock()
        held, priorities, aging_s = self.held, dict(self.priorities), self.limits.priority_aging
        return await self._tx_on(
            lambda conn: self.queue.lease(
                conn,
                now,
                lease_s,
                max_readings,
                max_bytes,
                held=held,
                priorities=priorities,
                aging_s=aging_s,
                floor=floor,
            )
        )

    @_atomic
    async def extend_lease(self, item: Item, seconds: float) -> None:
        """Hold `item` for `seconds` more: a big stream may outlast the default lease, and
        an expired lease would hand the same item to a second worker mid-upload."""
        async with self._tx() as db:
            await self.queue.extend_lease(db, item, self._clock() + seconds)

    async def readings_of(self, item: Item) -> list[bytes]:
        return await self.queue.readings_of(item)

    @_atomic
    async def ack(self, item: Item) -> None:
        """The server acknowledged `item`: delete it (and its readings) in one transaction;
        then delete a source or spool file no other item needs."""
        await self.space.drain_path(lambda: self._ack(item), self._checkpoint)
        if self.space.reserve_spent:
            await self._regain_reserve()

    async def _ack(self, item: Item) -> None:
        def write(conn: sqlite3.Connection) -> tuple[bool, bool]:
            if not self.queue.ack(conn, item):
                return False, False
            return True, item.path is not None and not self.queue.refs_to_on(conn, item.path)

        acked, last_ref = await self._tx_on(write)
        if not acked:
            return  # acknowledged already (a late duplicate): nothing to book twice
        if item.kind == KIND_TABULAR:
            self.space.held.drop_readings(item.count, item.bytes)
        elif item.stored:
            self.space.held.stored_bytes -= item.bytes
        if item.stored or item.kind == KIND_TABULAR:
            self.space.available.set()
        if item.path is not None and item.stored:
            unlink_own(item.path)  # our own spool file; a crash here is swept by recover()
        elif item.path is not None and last_ref:
            await self._settle_file(item.path)

    @_atomic
    async def expire(self, max_age: dict[str, float], limit: int = 1000) -> list[Expired]:
        """Drop what waited longer than its source's `max_age` (source -> seconds),
        counted in the same transaction; robot files no item needs any more are then
        retired through the ledger as after an ack, spool files deleted."""
        if not max_age:
            return []
        now = self._clock()
        async with self._tx() as db:
            gone = await self.queue.expire(db, now, max_age, limit)
            paths = {g.item.path for g in gone if g.item and g.item.path and not g.item.stored}
            unreferenced = [p for p in paths if not await self.queue.refs_to(db, p)]
        for g in gone:
            if g.item is None or g.item.kind == KIND_TABULAR:
                self.space.held.drop_readings(g.readings, g.bytes)
            elif g.item.stored:
                self.space.held.stored_bytes -= g.bytes
                if g.item.path is not None:
                    unlink_own(g.item.path)
        if gone:
            self.space.available.set()
        for path in unreferenced:
            await self._settle_file(path)
        return gone

    async def _settle_file(self, path: str) -> None:
        """No item reads `path` any more: retire it as its claim says, then store the
        claim's next state. The claim outlives the unlink, so a crash in between is
        finished by `recover()` instead of leaving the file to be sent again."""
        found = await self.ledger.stored_claim(path)
        if found is None or found[0] is not ClaimState.PENDING:
            return  # unknown, or the source is still queuing readings of it
        if (tidy := self._tidy.get(path)) is not None and not tidy.committed_only:
            return  # settled already; its new state waits for the next transaction
        claim = found[1]
        outcome = await asyncio.to_thread(
            retire_file,
            path,
            claim.root,
            claim.ident,
            size=claim.size,
            mtime_ns=claim.mtime_ns,
            delete=claim.delete_after,
        )
        self._tidy[path] = Tidy(claim_after_retire(outcome))
        await self._bound_tidy()

    async def _bound_tidy(self) -> None:
        """Memory stays bounded even when no other write comes along."""
        if len(self._tidy) >= TIDY_MAX:
            await self.tidy()

    @_atomic
    async def retry_later(self, item: Item, delay_s: float, error: str) -> None:
        async def write() -> None:
            async with self._tx() as db:
                await self.queue.retry_later(db, item, self._clock() + delay_s, error)

        await self.space.drain_path(write, self._checkpoint)

    @_atomic
    async def release(self, item: Item) -> None:
        """Give a leased item back untouched (pause, shutdown, auth stop)."""

        async def write() -> None:
            async with self._tx() as db:
                await self.queue.release(db, item)

        await self.space.drain_path(write, self._checkpoint)

    @_atomic
    async def dead_letter(self, item: Item, status: str, message: str) -> None:
        async def write() -> None:
            async with self._tx() as db:
                await self.queue.dead_letter(db, item, status, message, self._clock())

        await self.space.drain_path(write, self._checkpoint)

    async def _regain_reserve(self) -> None:
        """After a full disk spent the reserve: once acks have freed as many pages, give
        them back to the file system and put the reserve back, so that the next full
        disk is survived too (without it, a WAL that must grow the database at its
        checkpoint wedges every write)."""
        page = await scalar(self._db, "PRAGMA page_size")
        freed = await scalar(self._db, "PRAGMA freelist_count") * page
        wal = self.space.state_dir / "outbox.sqlite3-wal"
        with contextlib.suppress(OSError):
            freed += wal.stat().st_size  # a truncating checkpoint gives it all back
        if freed < self.space.reserve_bytes:
            return
        async with self._lock:
            try:
                async with self._db.execute("PRAGMA incremental_vacuum") as cur:
                    await cur.fetchall()
                await self._wal_checkpoint()
            except sqlite3.Error as exc:
                log.warning("outbox could not give freed pages back: %s", exc)
                return
        self.space.ensure_reserve()

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it: on a full disk this gives back
        the WAL file's space (a WAL that cannot be checkpointed can never restart)."""
        async with self._lock:
            try:
                await self._wal_checkpoint()
            except sqlite3.Error as exc:
                log.warning("outbox checkpoint on a full disk failed: %s", exc)

    async def _wal_checkpoint(self) -> None:
        """Its result row read to the end: a cursor left open would keep the statement in
        progress into the next hop, whose COMMIT it then fails (see `_tx_on`)."""
        await on_thread(
            self._db, lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        )

    async def dead_letters(self) -> list[DeadLetter]:
        return await self.queue.dead_letters()

    async def waiting(self, limit: int = 20) -> list[tuple[str, str | None, int, int, str | None]]:
        """What stayed queued, oldest first (readings not yet batched are in `stats()`
        only): for `edged run --until-empty` to say what it leaves behind."""
        return await self.queue.waiting(limit)

    @_atomic
    async def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """Put dead letters back in the queue (all of them when `ids` is None)."""
        async with self._tx() as db:
            n = await self.queue.retry_dead(db, ids)
        if n:
            self.work_available.set()
        return n

    @_atomic
    async def make_all_due(self) -> None:
        """`sync-now`: forget every item's backoff."""
        async with self._tx() as db:
            await self.queue.make_all_due(db)
        self.work_available.set()

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest waiting item is due (None: nothing waiting). Items
        leased right now are not waiting: counting them made idle workers spin."""
        now, held = self._clock(), self.held
        return await on_thread(self._db, lambda conn: self.queue.next_due_in(conn, now, held))

    # -- status ------------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        """Backlog per kind; for tabular data `items` counts readings, batched or not.
        Cheap at any backlog: reading totals are kept in memory, the rest is indexed."""
        held = self.space.held
        return await self.queue.stats(
            held.readings, held.reading_bytes, held.stored_bytes, self._clock()
        )


async def _add_columns(db: aiosqlite.Connection) -> None:
    """Bring an outbox file written by an older edged up to ADDED_COLUMNS."""
    for table in dict.fromkeys(t for t, _, _ in ADDED_COLUMNS):
        async with db.execute(f"PRAGMA table_info({table})") as cur:
            have = {str(r[1]) for r in await cur.fetchall()}
        for t, column, kind in ADDED_COLUMNS:
            if t == table and column not in have:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for sql in ADDED_INDEXES:
        await db.execute(sql)
