"""The `jsonl` source: JSON-lines files tailed into tabular readings, rotation-safe.

`path` is a file or a glob in its last component (`/var/log/robot/*.jsonl`). Each file's
committed position (inode, byte offset, line count) is stored in the outbox in the same
transaction as the readings it covers, so a crash neither loses nor repeats a line. A
trailing line without its newline is left for the next read.

A bad line (not JSON, not an object, a bad time) is appended to
`quarantine/<source>.badlines.jsonl` (fsync'd) *before* the offset passing it is
committed: a crash may repeat a quarantine record, never lose a line.

Rotation:
- rename + new file: the stored inode is looked up in the same directory (e.g.
  `imu.jsonl.1`) and read to its end under the original key; only once the new file has
  data (its writer has switched) is the trailing partial line of the old one taken and
  the key moved to the new inode at 0. A crash in between resumes on the old inode.
  If the old file's new name matches the glob too, its position is handed over to that
  name first, and a new name holding an inode another key still owns waits for it.
- copytruncate: same inode, size below the committed offset: read again from 0. Lines
  written between our last read and the truncation are lost; that is inherent to
  copytruncate (and a file that regrows past the old offset before we look is not
  recognised as truncated). Prefer rename rotation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fnmatch
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.config import SourceConfig
from edged.daemon.outbox import Progress
from edged.daemon.safefs import Swapped, open_under, stat_under
from edged.daemon.sources.base import (
    SourceContext,
    SourceStats,
    is_ignored_name,
    note_root,
    register,
)
from edged.daemon.sources.watch import WatchLoop
from edged.durable import fsync_dir
from edged.errors import OutboxFull
from edged.options import Text, option, required

log = logging.getLogger("edged.sources.jsonl")

CHUNK = 256 * 1024  # bytes read (and lines committed) per transaction
MAX_LINE = 1024 * 1024  # a longer line is quarantined (first QUARANTINE_TEXT bytes kept)
QUARANTINE_TEXT = 64 * 1024
POLL_S = 1.0  # tracked files are stat'ed at least this often (inotify may miss appends)
MAX_VANISHED = 1024


# --------------------------------------------------------------------------- pure helpers


class BadLine(ValueError):
    """A line that cannot become a reading; the message is the quarantine reason."""


_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9})\d*)?([Zz]|[+-]\d\d:\d\d)"
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MIN_S, _MAX_S = -62_135_596_800, 253_402_300_799  # what a protobuf Timestamp can hold


def parse_time(value: Any) -> int:
    """Nanoseconds since the epoch from RFC 3339 text (Z or offset required) or epoch
    seconds (int or float). Raises ValueError with a reason."""
    if isinstance(value, bool):
        raise ValueError(f"time {value!r} is not RFC 3339 text or epoch seconds")
    if isinstance(value, int | float):
        if not (math.isfinite(value) and _MIN_S <= value <= _MAX_S):
            raise ValueError(f"time {value!r} is out of range for epoch seconds")
        whole = math.floor(value)
        return int(whole) * 1_000_000_000 + round((value - whole) * 1e9)
    if not isinstance(value, str):
        raise ValueError(f"time {value!r} is not RFC 3339 text or epoch seconds")
    m = _RFC3339.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"time {value!r} is not RFC 3339 (e.g. 2024-05-01T12:00:00.5Z)")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    frac, zone = m.group(7) or "", m.group(8)
    offset = dt.timedelta(0)
    if zone not in ("Z", "z"):
        sign = -1 if zone[0] == "-" else 1
        offset = sign * dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    try:
        moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.timezone(offset))
    except ValueError as exc:
        raise ValueError(f"time {value!r}: {exc}") from None
    delta = moment - _EPOCH
    seconds = delta.days * 86_400 + delta.seconds
    if not _MIN_S <= seconds <= _MAX_S:
        raise ValueError(f"time {value!r} is out of range")
    return seconds * 1_000_000_000 + int(frac.ljust(9, "0"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_line(raw: bytes, now_ns: int) -> pb.SensorData:
    """One JSON object line -> a reading. `time` sets both timestamps, `time_requested`
    and `time_received` each one (default: `now_ns`); `data` (an object) is the reading,
    else the whole object is. Raises BadLine with the reason."""
    try:
        obj = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise BadLine("JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise BadLine(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadLine(f"not a JSON object but {type(obj).__name__}")
    times = {"time_requested": now_ns, "time_received": now_ns}
    try:
        if obj.get("time") is not None:
            times = dict.fromkeys(times, parse_time(obj["time"]))
        for key in times:
            if obj.get(key) is not None:
                times[key] = parse_time(obj[key])
    except ValueError as exc:
        raise BadLine(str(exc)) from None
    data = obj["data"] if isinstance(obj.get("data"), dict) else obj
    reading = pb.SensorData()
    for key, ns in times.items():
        ts = Timestamp()
        ts.FromNanoseconds(ns)
        getattr(reading.metadata, key).CopyFrom(ts)
    try:
        reading.struct.update(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadLine(f"cannot hold as a reading: {exc}") from None
    return reading


def quarantine_record(path: Path, line: int, offset: int, reason: str, raw: bytes) -> bytes:
    text = raw[:QUARANTINE_TEXT].decode("utf-8", errors="replace")
    record = {"file": str(path), "line": line, "offset": offset, "reason": reason, "text": text}
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "source"


def split_glob(path: Path) -> tuple[Path, str]:
    """(directory to watch, file-name pattern); a plain path is its own pattern."""
    return path.parent, path.name


# --------------------------------------------------------------------------- the source


@dataclass
class _Tail:
    """A tracked key's committed position, and what the file looked like when read."""

    pos: Progress
    snapshot: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last handled
    old_path: Path | None = None  # where the rotated-away inode was last found


class JsonlSource:
    kind = "jsonl"

    def __init__(self, config: JsonlConfig, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = config.name or f"jsonl:{config.path}"
        self.stats = SourceStats()
        self.dir, self.pattern = split_glob(config.path)
        self._watch = WatchLoop(self, self.dir, recursive=False)
        self._explicit = not any(c in self.pattern for c in "*?[")
        self._tails: dict[Path, _Tail] = {}  # only files present (a vanished one is dropped)
        self._vanished: dict[Path, int] = {}  # key -> inode it had when we saw it go
        self._links: set[Path] = set()  # tracked names now a symlink (warned once)
        self._blocked = False
        self._bad_file = ctx.quarantine_dir / f"{safe_name(self.name)}.badlines.jsonl"
        meta = pb.UploadMetadata(
            part_id=ctx.part_id,
            type=pb.DATA_TYPE_TABULAR_SENSOR,
            component_type=config.component_type,
            component_name=config.component_name,
            method_name=config.method,
            tags=list(config.tags),
            dataset_ids=list(config.dataset_ids),
        )
        self._meta = meta.SerializeToString()

    # -- loop ----------------------------------------------------------------------------

    def request_rescan(self) -> None:
        """`sync-now`: the running loop does a full pass (see Source.request_rescan)."""
        self._watch.request_rescan()

    async def run(self) -> None:
        await self._watch.run()

    def wake_at(self) -> float | None:
        return self.ctx.monotonic() + POLL_S  # tracked files are polled: appends may be missed

    def wants_scan(self) -> bool:
        return False

    def blocked(self) -> bool:
        return self._blocked

    async def on_changes(self, changed: set[Path]) -> None:
        """Tracked files (a cheap stat each) plus new matching paths the watcher saw."""
        fresh = {p for p in changed if p.parent == self.dir and self._matches(p.name)}
        if self._explicit:
            fresh.add(self.dir / self.pattern)  # catches a create the watcher missed
        await self._round([*self._tails, *sorted(fresh - set(self._tails))], True)

    async def scan_once(self) -> None:
        note_root(self.name, self.stats, self.dir)
        paths = self._list()
        for gone in set(self._tails) - set(paths):
            if self._is_link(gone):
                self._say_link(gone)  # once: it is no longer tracked after this
            self._drop(gone)
        await self._round(paths, False)

    async def _round(self, paths: list[Path], only_if_changed: bool) -> None:
        """Follow each path; stop early on backpressure (the run loop waits for space)."""
        self._blocked = False
        await self._load([p for p in paths if p not in self._tails])
        for path in paths:
            if self._blocked:
                return
            await self._follow(path, only_if_changed=only_if_changed)

    def _matches(self, name: str) -> bool:
        if self._explicit:
            return name == self.pattern
        return not is_ignored_name(name) and fnmatch.fnmatchcase(name, self.pattern)

    def _list(self) -> list[Path]:
        """Matching regular files; symlinks are never followed (they would read their
        target, which may lie outside the directory): name the file itself instead."""
        if self._explicit:
            path = self.dir / self.pattern  # a link stays tracked: `_follow` warns once
            return [path] if self._regular(path) or self._is_link(path) else []
        try:
            with os.scandir(self.dir) as it:
                found = [
                    Path(e.path)
                    for e in it
                    if self._matches(e.name) and e.is_file(follow_symlinks=False)
                ]
        except OSError:
            return []
        return sorted(found)

    async def _load(self, paths: list[Path]) -> None:
        """Committed positions of keys not tracked yet (all loaded before any is read, so
        a rotated-away inode's owner is known)."""
        for path in paths:
            pos = await self.ctx.outbox.progress_of(self.name, str(path))
            if pos is None:
                continue
            tail = self._tails[path] = _Tail(pos)
            if self._vanished.pop(path, None) == pos.inode:
                # Deleted and created again with its inode number reused: a new file.
                await self._save(tail, replace(pos, offset=0, line=0))

    def _drop(self, path: Path) -> None:
        """Forget a vanished key, remembering its inode (bounded) to spot inode reuse."""
        self._links.discard(path)
        tail = self._tails.pop(path, None)
        if tail is not None:
            self._vanished[path] = tail.pos.inode
            while len(self._vanished) > MAX_VANISHED:
                del self._vanished[next(iter(self._vanished))]

    # -- one key -------------------------------------------------------------------------

    def _lstat(self, path: Path) -> os.stat_result:
        """The entry itself, never what a link points to (see safefs)."""
        return stat_under(self.dir, path.name)

    def _regular(self, path: Path) -> bool:
        try:
            return stat.S_ISREG(self._lstat(path).st_mode)
        except OSError:
            return False

    def _is_link(self, path: Path) -> bool:
        try:
            return stat.S_ISLNK(self._lstat(path).st_mode)
        except OSError:
            return False

    def _say_link(self, path: Path) -> None:
        self.stats.last_error = f"{path} is now a symlink; not following it"
        log.warning("%s: %s", self.name, self.stats.last_error)

    async def _follow(self, path: Path, *, only_if_changed: bool) -> None:
        try:
            st = self._lstat(path)
        except OSError:
            self._drop(path)  # its stored position stays: it may be a rename rotation
            return
        if stat.S_ISLNK(st.st_mode):
            if (path in self._tails or self._explicit) and path not in self._links:
                self._links.add(path)
                self._say_link(path)
            return
        self._links.discard(path)
        if not stat.S_ISREG(st.st_mode):
            return
        snap = (st.st_ino, st.st_size, st.st_mtime_ns)
        tail = self._tails.get(path)
        if tail is None:
            if self._owned_elsewhere(path, st.st_ino):
                return  # a rotated-away file: its owner hands its position over
            tail = self._tails[path] = _Tail(Progress(self.name, str(path), st.st_ino, 0, 0))
            self.stats.files_seen += 1
        elif only_if_changed and tail.snapshot == snap and tail.pos.inode == st.st_ino:
            return
        if tail.pos.inode != st.st_ino:
            if not await self._finish_rotated(path, tail, new_has_data=st.st_size > 0):
                return
        elif st.st_size < tail.pos.offset:
            log.warning(
                "%s: %s shrank from %d to %d bytes (copytruncate?): reading again from 0;"
                " lines written just before the truncation may be lost",
                self.name,
                path,
                tail.pos.offset,
                st.st_size,
            )
            self.stats.truncated += 1
            await self._save(tail, replace(tail.pos, offset=0, line=0))
        tail.snapshot = snap if await self._read(path, tail, final=False) else None

    def _owned_elsewhere(self, path: Path, inode: int) -> bool:
        return any(t.pos.inode == inode for p, t in self._tails.items() if p != path)

    async def _finish_rotated(self, path: Path, tail: _Tail, *, new_has_data: bool) -> bool:
        """Read the old inode to its end under this key; True once the key has moved to
        the new file (only when that has data, i.e. its writer has switched)."""
        old = self._find_inode(path.parent, tail.pos.inode, tail.old_path)
        if old is not None:
            tail.old_path = old
            # A rotated name the glob matches is tailed on under that name: no final read.
            keeps_tailing = old != path and old.parent == self.dir and self._matches(old.name)
            final = new_has_data and not keeps_tailing
            if not await self._read(old, tail, final=final) or not new_has_data:
                return False
            if keeps_tailing:
                handed = _Tail(replace(tail.pos, path=str(old)))
                await self._save(handed, handed.pos)  # first, so a crash keeps one owner
                self._tails[old] = handed
        elif new_has_data:
            log.warning(
                "%s: %s was replaced and its old file (inode %d) is gone; lines after"
                " offset %d of it were not read",
                self.name,
                path,
                tail.pos.inode,
                tail.pos.offset,
            )
        else:
            return False
        log.info("%s: %s rotated; following the new file", self.name, path)
        self.stats.files_seen += 1
        tail.old_path = None
        try:
            inode = self._lstat(path).st_ino
        except OSError:
            return False
        await self._save(tail, Progress(self.name, str(path), inode, 0, 0))
        return True

    @staticmethod
    def _find_inode(directory: Path, inode: int, hint: Path | None) -> Path | None:
        if hint is not None:
            try:
                if stat_under(directory, hint.name).st_ino == inode:
                    return hint
            except OSError:
                pass
        try:
            with os.scandir(directory) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False) and e.stat().st_ino == inode:
                        return Path(e.path)
        except OSError:
            pass
        return None

    async def _save(self, tail: _Tail, pos: Progress) -> None:
        await self.ctx.outbox.save_progress(pos)
        tail.pos = pos

    # -- reading and committing ----------------------------------------------------------

    async def _read(self, path: Path, tail: _Tail, *, final: bool) -> bool:
        """Commit `path` from the key's offset to its last newline (to its end if `final`),
        one transaction per chunk. False if stopped (backpressure, file swapped)."""
        try:
            fd = open_under(self.dir, path.name)
        except Swapped as exc:
            self.stats.last_error = str(exc)
            return False
        except OSError as exc:
            self.stats.last_error = f"cannot open {path}: {exc.strerror or exc}"
            return False
        try:
            if os.fstat(fd).st_ino != tail.pos.inode:
                return False  # replaced since we looked; the next round sorts it out
            while True:
                pos = tail.pos
                lines, end = _next_lines(fd, pos.offset, final=final)
                if not lines:
                    return True
                if not await self._commit(path, tail, lines, end):
                    return False
        finally:
            os.close(fd)

    async def _commit(self, path: Path, tail: _Tail, lines: list[bytes], end: int) -> bool:
        pos = tail.pos
        now_ns = round(self.ctx.clock() * 1e9)
        readings: list[bytes] = []
        bad: list[bytes] = []
        offset, line = pos.offset, pos.line
        for raw in lines:
            line += 1
            if len(raw) > MAX_LINE:
                reason: str | None = f"line longer than {MAX_LINE} bytes"
            elif raw.strip():
                try:
                    readings.append(parse_line(raw, now_ns).SerializeToString())
                    reason = None
                except BadLine as exc:
                    reason = str(exc)
            else:
                reason = None
            if reason is not None:
                bad.append(quarantine_record(path, line, offset, reason, raw))
                log.warning("%s: %s:%d: %s (quarantined)", self.name, path, line, reason)
            offset += len(raw) + 1
        if bad:
            await asyncio.to_thread(self._append_bad, bad)  # before the offset passes them
        new = replace(pos, offset=end, line=line)
        try:
            if readings:
                await self.ctx.outbox.enqueue_readings(
                    self._meta, readings, progress=new, source=self.name
                )
            else:
                await self.ctx.outbox.save_progress(new)
        except OutboxFull as exc:
            self._blocked = True
            self.stats.backpressure = True
            self.stats.last_error = str(exc)
            return False
        tail.pos = new
        self.stats.quarantined += len(bad)
        self.stats.backpressure = False
        if readings:
            self.stats.readings += len(readings)
            self.stats.last_event_at = self.ctx.clock()
        return True

    def _append_bad(self, records: list[bytes]) -> None:
        directory = self._bad_file.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not self._bad_file.exists()
        fd = os.open(self._bad_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            data = memoryview(b"".join(records))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(directory)


def _next_lines(fd: int, offset: int, *, final: bool) -> tuple[list[bytes], int]:
    """Complete lines from `offset` (newline excluded) and the offset after them.

    At most CHUNK bytes, or one line up to MAX_LINE; a longer line comes back whole-less:
    its first MAX_LINE + 1 bytes, so the caller quarantines it, while the returned
    offset skips to its end. With `final`, a trailing line without newline counts too.
    """
    buf = os.pread(fd, CHUNK, offset)
    cut = buf.rfind(b"\n")
    if cut < 0 and len(buf) == CHUNK:
        buf = os.pread(fd, MAX_LINE + 1, offset)
        cut = buf.rfind(b"\n")
        if cut < 0 and len(buf) > MAX_LINE:
            return _skip_long_line(fd, offset, buf, final=final)
    if cut < 0:
        if final and buf:
            return [buf], offset + len(buf)
        return [], offset
    if final and cut < len(buf) - 1 and len(buf) < CHUNK:
        return buf.split(b"\n"), offset + len(buf)
    return buf[:cut].split(b"\n"), offset + cut + 1


def _skip_long_line(fd: int, offset: int, head: bytes, *, final: bool) -> tuple[list[bytes], int]:
    pos = offset + len(head)
    while True:
        piece = os.pread(fd, CHUNK, pos)
        if not piece:
            return ([head], pos) if final else ([], offset)
        nl = piece.find(b"\n")
        if nl >= 0:
            # The record's `offset` math in _commit uses len(raw)+1; only the end matters.
            return [head], pos + nl + 1
        pos += len(piece)


# --------------------------------------------------------------------------- kind


@dataclass(frozen=True, kw_only=True)
class JsonlConfig(SourceConfig):
    """JSON-lines files tailed from a path or glob; each line is one reading."""

    kind = "jsonl"
    one_per_tree = False  # files, not trees: two tails in one directory are fine
    component_type: str = option("rdk:component:sensor", Text(), "the readings' component type")
    component_name: str = required(
        Text(), "the component the readings belong to", "the component's name, e.g. imu"
    )
    method: str = option("Readings", Text(), "the method that produced the readings")

    def watched_dir(self) -> Path:
        return self.path.parent


register(JsonlConfig, JsonlSource)
