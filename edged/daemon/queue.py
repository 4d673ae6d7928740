"""The upload queue of the outbox: readings and items in, leases out, acks and dead letters.

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
- `dead_letters`: items the server rejected for good, with status and message.

Every write here takes the connection of a transaction the outbox has open
(`outbox.Outbox`), so it commits together with the claim or offset it belongs to.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiosqlite

from edged.daemon.ledger import db_path, fs_path, identity, location
from edged.daemon.policy import batch_take
from edged.daemon.safefs import Identity
from edged.daemon.schedule import pick
from edged.daemon.script import Script, on_thread
from edged.rows import SharedInsert

# A file's readings share their metadata and enqueue time: one statement per chunk.
_INSERT = SharedInsert(
    "readings", ("meta_id", "data", "size", "enqueued_at"), shared=("meta_id", "enqueued_at")
)

KIND_TABULAR = "tabular"
KIND_BINARY = "binary"
KIND_FILE = "file"
KINDS = (KIND_TABULAR, KIND_BINARY, KIND_FILE)

INLINE_MAX = 256 * 1024  # larger payloads handed over as bytes go to a spool file

_ITEM_COLS = (
    "i.id, i.uid, i.kind, m.metadata, i.sensor, i.inline, i.path, i.offset, i.length,"
    " i.stored, i.count, i.bytes, i.enqueued_at, i.attempts, i.root, i.dev, i.ino,"
    " coalesce(i.source, '')"
)
_DUE = (
    "i.next_attempt_at <= ? AND (i.lease_until IS NULL OR i.lease_until < ?)"
    " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id)"
)


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
class NewItem:
    """An item row about to be inserted (what `Outbox.enqueue_item` worked out)."""

    uid: str
    kind: str
    sensor: bytes | None
    inline: bytes | None
    path: str | None
    offset: int
    length: int
    stored: bool
    root: str | None = None
    ident: Identity | None = None


@dataclass(frozen=True, kw_only=True)
class Item(NewItem):
    """One upload call's worth of work, leased by one worker: an item row as stored,
    with what the queue adds (id, metadata, counts, age, attempts)."""

    id: int
    metadata: bytes
    count: int
    bytes: int
    enqueued_at: float
    attempts: int
    source: str = ""
    """The source that queued it ("" for items queued before sources were recorded)."""
    priority: int = 0
    """Its source's configured priority (higher = sooner) when it was leased."""
    more_due: bool = field(default=False, compare=False)
    """Something else was due when it was leased: worth waking another idle worker."""


@dataclass(frozen=True)
class Expired:
    """What a `max_age` sweep dropped of one source: an item (`item` set), or readings
    not yet in a batch of one metadata (`item` None); `age_s` of the oldest."""

    source: str
    readings: int
    bytes: int
    age_s: float
    item: Item | None = None


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


async def scalar(db: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> int:
    async with db.execute(sql, args) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


_BUMP = (
    "INSERT INTO counters(name, value) VALUES (?, ?)"
    " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)


def _bumps(deltas: Mapping[str, int]) -> list[tuple[str, int]]:
    return [(k, v) for k, v in deltas.items() if v]


async def bump(db: aiosqlite.Connection, **deltas: int) -> None:
    """Add to the outbox's lifetime counters (in the caller's transaction)."""
    await db.executemany(_BUMP, _bumps(deltas))


def bump_on(conn: sqlite3.Connection, **deltas: int) -> None:
    """`bump`, on the SQLite thread."""
    conn.executemany(_BUMP, _bumps(deltas))


def bump_in(script: Script, **deltas: int) -> None:
    """`bump`, as part of a script."""
    rows = _bumps(deltas)
    if rows:
        script.executemany(_BUMP, rows)


def text(message: str) -> str:
    """Free text (errors naming odd paths) made storable as SQLite text."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def _digest(metadata: bytes, source: str) -> bytes:
    """Readings batch per (source, metadata): two sources may share a metadata, and each
    source's priority, window, pause and max_age apply to its own readings only."""
    h = hashlib.blake2b(metadata, digest_size=16)
    if source:  # "" keeps the digest of outboxes written before sources were recorded
        h.update(b"\0source\0" + source.encode("utf-8", "surrogateescape"))
    return h.digest()


def _item(row: Any, priority: int = 0) -> Item:
    return Item(
        id=row[0],
        uid=row[1],
        kind=row[2],
        metadata=row[3],
        sensor=row[4],
        inline=row[5],
        path=None if row[6] is None else fs_path(row[6]),
        offset=row[7],
        length=row[8],
        stored=bool(row[9]),
        count=row[10],
        bytes=row[11],
        enqueued_at=row[12],
        attempts=row[13],
        root=None if row[14] is None else fs_path(row[14]),
        ident=identity(row[15], row[16]),
        source=row[17],
        priority=priority,
    )


class Queue:
    """The items, readings and dead-letter SQL."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._meta_ids: dict[bytes, int] = {}
        self._sources: set[str] | None = None  # every source with items, read once

    def forget_cached(self) -> None:
        """A transaction rolled back: metadata ids it cached may not exist."""
        self._meta_ids.clear()

    def _meta_id(self, conn: sqlite3.Connection, metadata: bytes, source: str) -> int:
        """The id of `metadata`'s row, added if new. Runs on the SQLite thread (in a
        script); the cache is only touched there or after the script's hop returned."""
        digest = _digest(metadata, source)
        cached = self._meta_ids.get(digest)
        if cached is not None:
            return cached
        conn.execute(
            "INSERT INTO meta(digest, metadata, source) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (digest, metadata, source or None),
        )
        meta_id = int(conn.execute("SELECT id FROM meta WHERE digest=?", (digest,)).fetchone()[0])
        self._meta_ids[digest] = meta_id
        return meta_id

    # -- in (as part of the transaction's script: one hop with its commit) -------------

    def add_readings(
        self,
        script: Script,
        metadata: bytes,
        readings: Sequence[bytes],
        now: float,
        source: str = "",
    ) -> None:
        if readings:

            def insert(conn: sqlite3.Connection) -> None:
                meta_id = self._meta_id(conn, metadata, source)
                _INSERT.run(conn, (meta_id, now), [(r, len(r)) for r in readings])

            script.call(insert)
        bump_in(script, enqueued_readings=len(readings))

    def add_item(
        self, script: Script, metadata: bytes, new: NewItem, now: float, source: str = ""
    ) -> None:
        script.call(lambda conn: self._insert_item(conn, metadata, new, now, source))
        bump_in(script, enqueued_items=1)

    def _insert_item(
        self, conn: sqlite3.Connection, metadata: bytes, new: NewItem, now: float, source: str
    ) -> None:
        conn.execute(
            "INSERT INTO items(uid, kind, meta_id, sensor, inline, path, offset, length,"
            " stored, count, bytes, enqueued_at, root, dev, ino, source)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                new.uid,
                new.kind,
                self._meta_id(conn, metadata, source),
                new.sensor,
                new.inline,
                None if new.path is None else db_path(new.path),
                new.offset,
                new.length,
                int(new.stored),
                1,
                new.length,
                now,
                *location(new.root, new.ident),
                source or None,
            ),
        )
        if self._sources is not None:
            self._sources.add(source)

    # -- out (each runs whole on the SQLite thread: one hop; see `script.on_thread`) ----

    def lease(
        self,
        conn: sqlite3.Connection,
        now: float,
        lease_s: float,
        max_readings: int,
        max_bytes: int,
        *,
        held: Collection[str] = (),
        priorities: Mapping[str, int] | None = None,
        aging_s: float = 0.0,
        floor: int | None = None,
    ) -> Item | None:
        """The due item of highest effective priority (`schedule.pick`: the source's
        priority, aged by the wait) from sources not `held` (window closed, condition
        false, paused), leased until `now + lease_s`; forms a new tabular batch when
        unbatched readings win; with `floor`, only sources of at least that priority
        (`schedule.lease_floor`). One index probe per source with items. The item says
        whether something else is due now (`more_due`): only then is another idle
        worker worth waking."""
        priorities = priorities or {}
        rows = self._due_heads(conn, now, held)
        free = self._unbatched_heads(conn, held)
        candidates = [(str(r[17]), float(r[12])) for r in rows] + [
            (src, enq) for src, _, enq in free
        ]
        allowed = [
            i
            for i, (src, _) in enumerate(candidates)
            if floor is None or priorities.get(src, 0) >= floor
        ]
        chosen = pick([candidates[i] for i in allowed], priorities, now, aging_s)
        if chosen is None:
            return None
        chosen = allowed[chosen]
        if chosen < len(rows):
            row = rows[chosen]
        else:
            source, meta_id, _ = free[chosen - len(rows)]
            row = self._new_batch(conn, meta_id, max_readings, max_bytes)
            self._item_sources(conn).add(source)
        conn.execute("UPDATE items SET lease_until=? WHERE id=?", (now + lease_s, row[0]))
        item = _item(row, priorities.get(str(row[17]), 0))
        # Per-source index probes, as above (`next_due_in`'s min() walks the items of
        # held sources too).
        more = bool(self._unbatched_heads(conn, held) or self._due_heads(conn, now, held))
        return replace(item, more_due=more)

    def _item_sources(self, conn: sqlite3.Connection) -> set[str]:
        if self._sources is None:
            rows = conn.execute("SELECT DISTINCT coalesce(source, '') FROM items").fetchall()
            self._sources = {str(r[0]) for r in rows}
        return self._sources

    def _due_heads(self, conn: sqlite3.Connection, now: float, held: Collection[str]) -> list[Any]:
        """The first due item (by next_attempt_at, id) of each source not held."""
        heads = []
        for source in sorted(self._item_sources(conn)):
            if source in held:
                continue
            row = conn.execute(
                f"SELECT {_ITEM_COLS} FROM items i JOIN meta m ON m.id=i.meta_id"
                f" WHERE {'i.source IS NULL' if not source else 'i.source=?'} AND {_DUE}"
                " ORDER BY i.next_attempt_at, i.id LIMIT 1",
                ((source,) if source else ()) + (now, now),
            ).fetchone()
            if row is not None:
                heads.append(row)
        return heads

    def _unbatched_heads(
        self, conn: sqlite3.Connection, held: Collection[str] = ()
    ) -> list[tuple[str, int, float]]:
        """(source, meta_id, enqueued_at) of the oldest reading in no batch, per source
        not held; one index probe per metadata (there are few: one per source,
        component and method)."""
        firsts: dict[str, tuple[int, int]] = {}
        for src, mid, first in conn.execute(
            "SELECT coalesce(m.source, ''), m.id, (SELECT r.id FROM readings r"
            " WHERE r.meta_id=m.id AND r.id > m.batched_upto ORDER BY r.id LIMIT 1) AS first"
            " FROM meta m"
        ).fetchall():
            if first and src not in held and (src not in firsts or first < firsts[src][1]):
                firsts[src] = (int(mid), int(first))
        heads = []
        for src, (meta_id, first) in firsts.items():
            row = conn.execute("SELECT enqueued_at FROM readings WHERE id=?", (first,)).fetchone()
            assert row is not None
            heads.append((src, meta_id, float(row[0])))
        return heads

    def _new_batch(
        self,
        conn: sqlite3.Connection,
        meta_id: int,
        max_readings: int,
        max_bytes: int,
    ) -> Any:
        """Bind the oldest unbatched readings of one metadata to a new item, for good."""
        rows = conn.execute(
            "SELECT r.id, r.size, r.enqueued_at FROM readings r JOIN meta m ON m.id=r.meta_id"
            " WHERE r.meta_id=? AND r.id > m.batched_upto ORDER BY r.id LIMIT ?",
            (meta_id, max_readings),
        ).fetchall()
        n = batch_take([r[1] for r in rows], max_readings, max_bytes)
        rows = rows[:n]
        size = sum(r[1] for r in rows)
        uid = uuid.uuid4().hex
        batch_id = conn.execute(
            "INSERT INTO items(uid, kind, meta_id, stored, lo, hi, count, bytes, enqueued_at,"
            " source) VALUES (?,?,?,0,?,?,?,?,?,(SELECT source FROM meta WHERE id=?))",
            (uid, KIND_TABULAR, meta_id, rows[0][0], rows[-1][0], n, size, rows[0][2], meta_id),
        ).lastrowid
        conn.execute("UPDATE meta SET batched_upto=? WHERE id=?", (rows[-1][0], meta_id))
        return conn.execute(
            f"SELECT {_ITEM_COLS} FROM items i JOIN meta m ON m.id=i.meta_id WHERE i.id=?",
            (batch_id,),
        ).fetchone()

    async def expire(
        self, db: aiosqlite.Connection, now: float, max_age: Mapping[str, float], limit: int
    ) -> list[Expired]:
        """Delete what waited longer than its source's max age: items not leased (in
        flight) nor dead-lettered (kept for the operator), and readings in no batch; at
        most `limit` rows of each a call. A tabular batch goes whole, judged by its
        oldest reading. Counted per source in `counters` (expired_*[:source])."""
        gone: list[Expired] = []
        for source, age in sorted(max_age.items()):
            cutoff = now - age
            where = "m.source IS NULL" if not source else "m.source=?"
            args: tuple[Any, ...] = (source,) if source else ()
            async with db.execute(
                f"SELECT {_ITEM_COLS} FROM items i JOIN meta m ON m.id=i.meta_id"
                f" WHERE {where.replace('m.', 'i.')} AND i.enqueued_at < ?"
                " AND (i.lease_until IS NULL OR i.lease_until < ?) AND NOT EXISTS"
                " (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id) ORDER BY i.id LIMIT ?",
                (*args, cutoff, now, limit),
            ) as cur:
                items = [_item(r) for r in await cur.fetchall()]
            for item in items:
                await self._delete(db, item)
                gone.append(Expired(source, item.count, item.bytes, now - item.enqueued_at, item))
            async with db.execute(
                "SELECT m.id, r.id, r.size, r.enqueued_at FROM meta m JOIN readings r"
                f" ON r.meta_id=m.id AND r.id > m.batched_upto WHERE {where}"
                " AND r.enqueued_at < ? ORDER BY r.id LIMIT ?",
                (*args, cutoff, limit),
            ) as cur:
                rows = list(await cur.fetchall())
            await db.executemany("DELETE FROM readings WHERE id=?", [(r[1],) for r in rows])
            groups: dict[int, list[Any]] = {}
            for row in rows:
                groups.setdefault(int(row[0]), []).append(row)
            for group in groups.values():
                size = sum(int(r[2]) for r in group)
                gone.append(Expired(source, len(group), size, now - float(group[0][3])))
        for source in {g.source for g in gone}:
            mine = [g for g in gone if g.source == source]
            n_items = sum(1 for g in mine if g.item is not None)
            n_readings = sum(g.readings for g in mine)
            size = sum(g.bytes for g in mine)
            await bump(db, expired_items=n_items, expired_readings=n_readings, expired_bytes=size)
            per_source = {f"expired_items:{source}": n_items}
            per_source[f"expired_readings:{source}"] = n_readings
            await bump(db, **per_source)
        return gone

    async def _delete(self, db: aiosqlite.Connection, item: Item) -> None:
        if item.kind == KIND_TABULAR:
            await db.execute(
                "DELETE FROM readings WHERE id IN (SELECT r.id FROM items i JOIN readings r"
                " ON r.meta_id=i.meta_id AND r.id BETWEEN i.lo AND i.hi WHERE i.id=?)",
                (item.id,),
            )
        await db.execute("DELETE FROM items WHERE id=?", (item.id,))

    async def extend_lease(self, db: aiosqlite.Connection, item: Item, until: float) -> None:
        await db.execute("UPDATE items SET lease_until=? WHERE id=?", (until, item.id))

    async def release_all(self, db: aiosqlite.Connection) -> int:
        """A previous process's leases mean nothing now."""
        cur = await db.execute("UPDATE items SET lease_until=NULL WHERE lease_until IS NOT NULL")
        return int(cur.rowcount)

    async def readings_of(self, item: Item) -> list[bytes]:
        def read(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT r.data FROM items i JOIN readings r ON r.meta_id=i.meta_id"
                " AND r.id BETWEEN i.lo AND i.hi WHERE i.id=? ORDER BY r.id",
                (item.id,),
            ).fetchall()
            return [bytes(r[0]) for r in rows]

        return await on_thread(self._db, read)

    # -- outcomes -----------------------------------------------------------------------

    def ack(self, conn: sqlite3.Connection, item: Item) -> bool:
        """Delete an acknowledged item and its readings; False if it was gone already
        (a late duplicate ack: nothing to book twice). On the SQLite thread."""
        if item.kind == KIND_TABULAR:
            conn.execute(
                "DELETE FROM readings WHERE id IN (SELECT r.id FROM items i JOIN readings r"
                " ON r.meta_id=i.meta_id AND r.id BETWEEN i.lo AND i.hi WHERE i.id=?)",
                (item.id,),
            )
        if conn.execute("DELETE FROM items WHERE id=?", (item.id,)).rowcount == 0:
            return False
        conn.execute("DELETE FROM dead_letters WHERE item_id=?", (item.id,))
        bump_on(conn, uploaded_items=1, uploaded_readings=item.count, uploaded_bytes=item.bytes)
        return True

    async def refs_to(self, db: aiosqlite.Connection, path: str) -> int:
        """How many items still read from `path`."""
        return await scalar(db, "SELECT count(*) FROM items WHERE path=?", (db_path(path),))

    def refs_to_on(self, conn: sqlite3.Connection, path: str) -> int:
        """`refs_to` on the SQLite thread."""
        return int(
            conn.execute("SELECT count(*) FROM items WHERE path=?", (db_path(path),)).fetchone()[0]
        )

    async def retry_later(
        self, db: aiosqlite.Connection, item: Item, at: float, error: str
    ) -> None:
        await db.execute(
            "UPDATE items SET attempts=attempts+1, next_attempt_at=?, lease_until=NULL,"
            " last_error=? WHERE id=?",
            (at, text(error), item.id),
        )
        await bump(db, retries=1)

    async def release(self, db: aiosqlite.Connection, item: Item) -> None:
        await db.execute("UPDATE items SET lease_until=NULL WHERE id=?", (item.id,))

    async def dead_letter(
        self, db: aiosqlite.Connection, item: Item, status: str, message: str, now: float
    ) -> None:
        message = text(message)
        await db.execute(
            "INSERT OR REPLACE INTO dead_letters(item_id, status, message, dead_at)"
            " VALUES (?,?,?,?)",
            (item.id, status, message, now),
        )
        await db.execute(
            "UPDATE items SET attempts=attempts+1, lease_until=NULL, last_error=? WHERE id=?",
            (f"{status}: {message}", item.id),
        )
        await bump(db, dead_lettered=1)

    async def waiting(self, limit: int) -> list[tuple[str, str | None, int, int, str | None]]:
        """(kind, path, readings, bytes, last error) of the oldest `limit` items still to
        send, dead letters excepted."""
        async with self._db.execute(
            "SELECT kind, path, count, bytes, last_error FROM items i WHERE NOT EXISTS"
            " (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id) ORDER BY id LIMIT ?",
            (limit,),
        ) as cur:
            rows = await cur.fetchall()
        return [(r[0], fs_path(r[1]) if r[1] else None, r[2], r[3], r[4]) for r in rows]

    async def dead_letters(self) -> list[DeadLetter]:
        async with self._db.execute(
            "SELECT i.id, i.uid, i.kind, i.count, i.bytes, d.status, d.message, d.dead_at,"
            " i.path FROM dead_letters d JOIN items i ON i.id=d.item_id ORDER BY d.dead_at"
        ) as cur:
            rows = await cur.fetchall()
        return [
            DeadLetter(
                r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], fs_path(r[8]) if r[8] else None
            )
            for r in rows
        ]

    async def retry_dead(self, db: aiosqlite.Connection, ids: Sequence[int] | None) -> int:
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
        return int(n)

    async def make_all_due(self, db: aiosqlite.Connection) -> None:
        await db.execute("UPDATE items SET next_attempt_at=0 WHERE next_attempt_at > 0")

    def next_due_in(
        self, conn: sqlite3.Connection, now: float, held: Collection[str] = ()
    ) -> float | None:
        """Seconds until the earliest item of a source not `held` is due. On the SQLite
        thread."""
        if self._unbatched_heads(conn, held):
            return 0.0
        marks = ",".join("?" * len(held))
        row = conn.execute(
            "SELECT min(next_attempt_at) FROM items i WHERE (lease_until IS NULL OR"
            " lease_until < ?) AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.item_id=i.id)"
            f" AND coalesce(source, '') NOT IN ({marks})",
            (now, *held),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return max(0.0, float(row[0]) - now)

    async def spooled(self) -> set[str]:
        """Spool files some item owns."""
        async with self._db.execute(
            "SELECT path FROM items WHERE stored=1 AND path IS NOT NULL"
        ) as q:
            return {fs_path(r[0]) for r in await q.fetchall()}

    # -- status -------------------------------------------------------------------------

    async def stats(
        self, readings: int, reading_bytes: int, stored_bytes: int, now: float
    ) -> OutboxStats:
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
        per_kind[KIND_TABULAR] = KindStats(readings, reading_bytes)
        for kind, n, size, enq in kinds:
            per_kind[kind] = KindStats(n, size)
            if enq is not None and (oldest is None or enq < oldest):
                oldest = enq
        async with self._db.execute("SELECT name, value FROM counters") as cur:
            counters = {str(k): int(v) for k, v in await cur.fetchall()}
        return OutboxStats(
            items=sum(k.items for k in per_kind.values()),
            readings=readings,
            bytes=sum(k.bytes for k in per_kind.values()),
            stored_bytes=stored_bytes,
            oldest_age_s=None if oldest is None else max(0.0, now - oldest),
            per_kind=per_kind,
            dead_letters=await scalar(self._db, "SELECT count(*) FROM dead_letters"),
            counters=counters,
        )
