"""The ledger: which robot files the outbox has taken responsibility for, and how far.

Two tables, written only inside the outbox's transactions (see `outbox.Outbox`):
- `claims`: a source file by path, with what it looked like when queued and its state
  (`ClaimState`); sources read it back as a typed `ClaimRecord`;
- `offsets`: how far a tailed file has been committed (`Progress`).

A claim's life is a small state machine; the transitions are the pure functions below
(`claim_on_enqueue`, `claim_on_finish`, `claim_after_retire`), the SQL only stores them.

This module is the only code that deletes a robot file (`retire_file`): reached below
its root without following a link, and only while it is still the file (device, inode;
size and mtime when recorded) that was queued. Callers commit first and retire after:
a readings file once its readings are committed, a referenced file once its last item is
acknowledged; the claim outlives the delete, so a crash in between is finished on the
next start instead of sending the file again.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import aiosqlite

from edged.daemon.safefs import Identity, Swapped, locate, stat_under, unlink_under
from edged.daemon.script import Script, fetchone, on_thread

log = logging.getLogger("edged.outbox")


class ClaimState(enum.StrEnum):
    """Where a claimed file stands (the value is what the `claims` table stores)."""

    COMMITTING = "committing"  # the source is still queuing readings of this file
    COMMITTED = "committed"  # its readings are copied in; the source may delete it
    PENDING = "pending"  # fully queued; items still read from the file
    DONE = "done"  # uploaded and kept on disk: never send again


class Retired(enum.Enum):
    """What `retire_file` found and did."""

    DELETED = "deleted"
    GONE = "gone"  # not there any more: nothing to do
    CHANGED = "changed"  # another file or version now: kept, it is new input
    KEPT = "kept"  # kept on purpose (delete_after=False)
    REFUSED = "refused"  # a link or non-file in its place, or the OS said no: untouched


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
class ClaimRecord:
    """A claim as the ledger holds it: what sources get back from `Outbox.claim_of`."""

    path: str
    state: ClaimState
    size: int
    mtime_ns: int

    def same_version(self, size: int, mtime_ns: int) -> bool:
        """The file still looks as it did when it was claimed."""
        return (self.size, self.mtime_ns) == (size, mtime_ns)

    @property
    def referenced(self) -> bool:
        """Items still read from the file (or will): its source must leave it alone."""
        return self.state in (ClaimState.PENDING, ClaimState.COMMITTING)

    def send_again(self, size: int, mtime_ns: int) -> bool:
        """An uploaded-and-kept file that changed since is a new version to send."""
        return self.state is ClaimState.DONE and not self.same_version(size, mtime_ns)


@dataclass(frozen=True)
class Progress:
    """A tailed file's committed position, stored with the readings it covers."""

    source: str
    path: str
    inode: int
    offset: int
    line: int


# -- transitions (pure) ----------------------------------------------------------------


def claim_on_enqueue(*, by_reference: bool, more: bool) -> ClaimState:
    """State a claim takes when a write carries it: readings copied in are committed;
    items reading from the file are pending (committing while the source queues more)."""
    if not by_reference:
        return ClaimState.COMMITTED
    return ClaimState.COMMITTING if more else ClaimState.PENDING


def claim_on_finish(state: ClaimState) -> ClaimState:
    """The source queued every reading of the file: its last ack may now retire it."""
    return ClaimState.PENDING if state is ClaimState.COMMITTING else state


def claim_after_retire(outcome: Retired) -> ClaimState | None:
    """After the last ack: forget the claim (None) when the file is gone or is another
    version now (its source may queue that); keep it as done when the file stays, so the
    same version is never sent again."""
    if outcome in (Retired.DELETED, Retired.GONE, Retired.CHANGED):
        return None
    return ClaimState.DONE


# -- the robot-file delete (the only one) --------------------------------------------


def retire_file(
    path: str,
    root: str | None,
    ident: Identity | None,
    *,
    size: int = 0,
    mtime_ns: int = 0,
    delete: bool = True,
) -> Retired:
    """Delete a source file whose data the outbox no longer needs from it.

    Reached only below `root` without links, and deleted only if it is still the file
    that was queued: same (device, inode) when `ident` is given, same size and mtime when
    `mtime_ns` is. A link or non-file in its place is never touched. Blocking: run it in
    a thread."""
    try:
        base, rel = locate(path, root)
        st = stat_under(base, rel)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise Swapped(f"{path} is no longer a regular file (a symlink now?)")
    except FileNotFoundError:
        return Retired.GONE
    except Swapped as exc:
        log.warning("%s; not deleting anything", exc)
        return Retired.REFUSED
    except (OSError, ValueError) as exc:
        log.warning("cannot check %s before deleting it: %s", path, exc)
        return Retired.REFUSED
    if (ident is not None and Identity.of(st) != ident) or (
        mtime_ns and (st.st_size, st.st_mtime_ns) != (size, mtime_ns)
    ):
        log.warning("%s changed after it was queued; keeping it", path)
        return Retired.CHANGED
    if not delete:
        return Retired.KEPT
    try:
        unlink_under(base, rel, Identity.of(st))
    except FileNotFoundError:
        return Retired.GONE
    except Swapped as exc:
        log.warning("%s; not deleting anything", exc)
        return Retired.REFUSED
    except OSError as exc:
        log.warning("cannot delete %s: %s", path, exc.strerror or exc)
        return Retired.REFUSED
    return Retired.DELETED


# -- storage --------------------------------------------------------------------------


class Ledger:
    """The claims and offsets SQL. Writes go into the `Script` of a transaction the
    outbox has open, so they commit (or roll back) with the items they belong to; each
    read is one hop to the SQLite thread."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    def put_claim(self, script: Script, claim: Claim | None, state: ClaimState) -> None:
        if claim is not None:
            script.execute(
                "INSERT INTO claims(path, size, mtime_ns, state, delete_after, root, dev, ino)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET size=excluded.size,"
                " mtime_ns=excluded.mtime_ns, state=excluded.state,"
                " delete_after=excluded.delete_after, root=excluded.root, dev=excluded.dev,"
                " ino=excluded.ino",
                (
                    db_path(claim.path),
                    claim.size,
                    claim.mtime_ns,
                    state.value,
                    int(claim.delete_after),
                    *location(claim.root, claim.ident),
                ),
            )

    def put_progress(self, script: Script, progress: Progress | None) -> None:
        if progress is not None:
            script.execute(
                "INSERT INTO offsets(source, path, inode, offset, line) VALUES (?,?,?,?,?)"
                " ON CONFLICT(source, path) DO UPDATE SET inode=excluded.inode,"
                " offset=excluded.offset, line=excluded.line",
                (
                    progress.source,
                    db_path(progress.path),
                    progress.inode,
                    progress.offset,
                    progress.line,
                ),
            )

    async def claim_of(self, path: str) -> ClaimRecord | None:
        row = await on_thread(
            self._db,
            fetchone("SELECT state, size, mtime_ns FROM claims WHERE path=?", (db_path(path),)),
        )
        if row is None:
            return None
        return ClaimRecord(path, ClaimState(row[0]), int(row[1]), int(row[2]))

    async def stored_claim(self, path: str) -> tuple[ClaimState, Claim] | None:
        """The whole claim row (for retiring the file)."""
        row = await on_thread(
            self._db,
            fetchone(
                "SELECT state, delete_after, size, mtime_ns, root, dev, ino FROM claims"
                " WHERE path=?",
                (db_path(path),),
            ),
        )
        if row is None:
            return None
        root = None if row[4] is None else fs_path(row[4])
        claim = Claim(path, int(row[2]), int(row[3]), bool(row[1]), root, identity(row[5], row[6]))
        return ClaimState(row[0]), claim

    def finish(self, script: Script, path: str) -> None:
        script.execute(
            "UPDATE claims SET state=? WHERE path=? AND state=?",
            (
                claim_on_finish(ClaimState.COMMITTING).value,
                db_path(path),
                ClaimState.COMMITTING.value,
            ),
        )

    def set_state(self, script: Script, path: str, state: ClaimState | None) -> None:
        """Store a transition; None forgets the claim and every offset of the path."""
        key = db_path(path)
        if state is None:
            script.execute("DELETE FROM claims WHERE path=?", (key,))
            script.execute("DELETE FROM offsets WHERE path=?", (key,))
        else:
            script.execute("UPDATE claims SET state=? WHERE path=?", (state.value, key))

    def forget_committed(self, script: Script, paths: Sequence[str], source: str | None) -> None:
        """The committed file is gone: drop its claim (only a committed one) and, with
        `source`, that source's offsets of each path."""
        for path in paths:
            key = db_path(path)
            script.execute(
                "DELETE FROM claims WHERE path=? AND state=?", (key, ClaimState.COMMITTED.value)
            )
            if source is not None:
                script.execute("DELETE FROM offsets WHERE source=? AND path=?", (source, key))

    async def progress_of(self, source: str, path: str) -> Progress | None:
        row = await on_thread(
            self._db,
            fetchone(
                "SELECT inode, offset, line FROM offsets WHERE source=? AND path=?",
                (source, db_path(path)),
            ),
        )
        return Progress(source, path, row[0], row[1], row[2]) if row else None

    async def committed(self) -> list[tuple[str, str]]:
        """(path, root) of committed claims; the path's directory stands in for a root
        that was not recorded."""
        async with self._db.execute(
            "SELECT path, root FROM claims WHERE state=?", (ClaimState.COMMITTED.value,)
        ) as q:
            rows = await q.fetchall()
        found = [(fs_path(p), None if r is None else fs_path(r)) for p, r in rows]
        return [(path, root or os.path.dirname(path)) for path, root in found]

    async def orphans(self) -> list[str]:
        """Pending claims no item reads from any more: an ack was cut before the delete."""
        async with self._db.execute(
            "SELECT path FROM claims c WHERE state=? AND NOT EXISTS"
            " (SELECT 1 FROM items i WHERE i.path=c.path)",
            (ClaimState.PENDING.value,),
        ) as q:
            return [fs_path(r[0]) for r in await q.fetchall()]


def is_gone(path: str, root: str) -> bool:
    """The file is not there, though its root is: it was retired (a root that is missing,
    such as an unmounted card, says nothing). Blocking."""
    return os.path.isdir(root) and not os.path.lexists(path)


# -- how paths and identities are stored ------------------------------------------------


def db_path(path: str) -> str | bytes:
    """A path as the outbox stores it: text, or, for a name that is not valid UTF-8
    (Linux names are bytes; SQLite text must be UTF-8), its raw bytes as a BLOB. The same
    path always maps to the same value, so lookups and joins match."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def fs_path(value: str | bytes) -> str:
    """Inverse of `db_path`."""
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


_I64 = 1 << 63


def location(
    root: str | None, ident: Identity | None
) -> tuple[str | bytes | None, int | None, int | None]:
    """(root, dev, ino) as stored; device and inode numbers are unsigned 64-bit, SQLite
    integers signed, so the upper half is stored as negative numbers."""
    if ident is None:
        return (None if root is None else db_path(root), None, None)
    dev, ino = (v - 2 * _I64 if v >= _I64 else v for v in ident)
    return (None if root is None else db_path(root), dev, ino)


def identity(dev: int | None, ino: int | None) -> Identity | None:
    if dev is None or ino is None:
        return None
    return Identity(dev + 2 * _I64 if dev < 0 else dev, ino + 2 * _I64 if ino < 0 else ino)
