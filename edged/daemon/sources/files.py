"""The `files` source: arbitrary files, uploaded whole (by reference) once they settle.

A file is queued when it is non-empty and has not changed for `settle` seconds: by its
mtime (one look is enough, so `edged run --until-empty` takes it in its one scan), or,
when the mtime lies in the future (a clock stepped back, a robot that booted with a
stale clock), by our own monotonic watch of an unchanged (size, mtime). A file still
being written keeps a fresh mtime and is not taken.
The outbox keeps a claim per file: `pending` until acknowledged, then the outbox deletes
it (`delete_after_upload`, the default) or marks it `done`, and a later scan sends it
again only if its size or mtime changed.

Walking never follows symlinks (a link to a file or directory is skipped), so nothing
outside `path` is ever uploaded; a root that is itself a symlink is resolved once. The
file's (device, inode) is queued with it: the uploader and the delete after the ack
reach it again through `safefs`, so a file or directory swapped for a link after
queueing is neither read nor deleted.
Hidden and temporary names, the robot's `failed/`, `datasetUpload/` and `sequences/`
directories, and `.capture`/`.prog` files (the capture source owns those, also when both
sources watch one directory) are never taken.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import math
import mimetypes
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.config import SourceConfig
from edged.daemon.outbox import KIND_FILE, Claim, FileRef
from edged.daemon.safefs import Identity, Swapped, open_under
from edged.daemon.sources.base import (
    ROBOT_DIRS,
    SourceContext,
    SourceStats,
    is_ignored_name,
    note_root,
    register,
)
from edged.daemon.sources.watch import MIN_WAIT_S, WatchLoop
from edged.errors import OutboxFull
from edged.options import Duration, Flag, Strings, option

log = logging.getLogger("edged.sources.files")

CAPTURE_SUFFIXES = (".capture", ".prog")


# --------------------------------------------------------------------------- pure helpers


def wanted_dir(name: str) -> bool:
    return not is_ignored_name(name) and name not in ROBOT_DIRS


def wanted_file(name: str, patterns: Iterable[str]) -> bool:
    """Name-only decision: not hidden/temporary, not a capture file, matches a pattern."""
    if is_ignored_name(name) or name.endswith(CAPTURE_SUFFIXES):
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def path_labels(rel: PurePosixPath) -> tuple[list[str], list[str]]:
    """Tags and dataset ids from `tag=<name>` / `dataset=<id>` directory components."""
    tags: list[str] = []
    datasets: list[str] = []
    for part in rel.parts[:-1]:
        key, sep, value = part.partition("=")
        if sep and value and key == "tag":
            tags.append(value)
        elif sep and value and key == "dataset":
            datasets.append(value)
    return tags, datasets


def _merge(first: Iterable[str], second: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*first, *second]))


def _ts(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def file_metadata(
    part_id: str, config: SourceConfig, rel: PurePosixPath, st: os.stat_result
) -> pb.UploadMetadata:
    """`file_name` is the path relative to the root without its last suffix (unique per
    source and readable on the server); `file_extension` is that suffix, dot included.
    Linux has no birth time in stat: the create time falls back to the mtime. Names are
    bytes on Linux but strings on the wire: a byte that is not UTF-8 is sent as `\\xNN`."""
    rel = PurePosixPath(os.fsencode(rel.as_posix()).decode("utf-8", "backslashreplace"))
    tags, datasets = path_labels(rel)
    suffix = rel.suffix
    name = rel.as_posix()[: -len(suffix)] if suffix else rel.as_posix()
    created = getattr(st, "st_birthtime", None)
    return pb.UploadMetadata(
        part_id=part_id,
        type=pb.DATA_TYPE_FILE,
        file_name=name,
        file_extension=suffix,
        tags=_merge(config.tags, tags),
        dataset_ids=_merge(config.dataset_ids, datasets),
        mime_type=mimetypes.guess_type(rel.name)[0] or "",
        file_modify_time=_ts(st.st_mtime_ns),
        file_create_time=_ts(int(created * 1e9) if created else st.st_mtime_ns),
    )


@dataclass(frozen=True)
class Seen:
    """One observation of a candidate file: what it looked like and when we looked
    (`at`: wall clock, to compare with the mtime; `mono`: monotonic), and since when
    (monotonic) we have seen it with this very size and mtime."""

    size: int
    mtime_ns: int
    at: float
    mono: float = 0.0
    since: float = 0.0


def observe(prev: Seen | None, size: int, mtime_ns: int, at: float, mono: float) -> Seen:
    """A new look at a file; the watch goes on only while (size, mtime) stay the same."""
    same = prev is not None and (prev.size, prev.mtime_ns) == (size, mtime_ns)
    return Seen(size, mtime_ns, at, mono, prev.since if prev is not None and same else mono)


def settle_left(seen: Seen, settle_s: float) -> float:
    """Seconds until the file counts as unchanged for `settle_s` (0: it does now): by its
    mtime, unless that is in the future, or by how long we watched it unchanged."""
    age = seen.at - seen.mtime_ns / 1e9
    by_mtime = settle_s - age if age >= 0 else math.inf
    return max(0.0, min(by_mtime, settle_s - (seen.mono - seen.since)))


def is_settled(seen: Seen, settle_s: float) -> bool:
    """Ready to queue: non-empty and unchanged for the settle time."""
    return seen.size > 0 and settle_left(seen, settle_s) == 0


def recheck_at(seen: Seen, settle_s: float) -> float:
    """When a not-yet-settled file deserves another look (ctx.monotonic seconds)."""
    return seen.mono + max(settle_left(seen, settle_s), MIN_WAIT_S)


# --------------------------------------------------------------------------- the source


class FilesSource:
    kind = "files"

    def __init__(self, config: FilesConfig, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = config.name or f"files:{config.path}"
        self.stats = SourceStats()
        self._watch = WatchLoop(self, config.path)
        self.patterns = config.patterns or ("*",)
        self._root: Path | None = None
        # All bounded by the files/dirs present: pruned on every full scan.
        self._pending: dict[Path, Seen] = {}  # candidates not yet settled (or refused)
        self._known: dict[Path, tuple[int, int]] = {}  # in the outbox as (size, mtime_ns)
        self._dirs: set[Path] = set()
        self._warned: set[Path] = set()
        self._blocked = False

    # -- loop ----------------------------------------------------------------------------

    def request_rescan(self) -> None:
        """`sync-now`: the running loop does a full pass (see Source.request_rescan)."""
        self._watch.request_rescan()

    async def run(self) -> None:
        self._watch.root = self._watch_root()
        await self._watch.run()

    def wake_at(self) -> float | None:
        """When the first file not settled yet deserves another look."""
        settle = self.config.settle
        return min((recheck_at(s, settle) for s in self._pending.values()), default=None)

    def wants_scan(self) -> bool:
        return self._root is None  # the root appeared: walk it whole

    def blocked(self) -> bool:
        return self._blocked

    async def scan_once(self) -> None:
        note_root(self.name, self.stats, self.config.path)
        root = self._resolve_root()
        if root is None:
            return
        files, dirs = self._walk(root)
        present = set(files)
        self._dirs = dirs
        self._known = {p: v for p, v in self._known.items() if p in present}
        self._pending = {p: s for p, s in self._pending.items() if p in present}
        self._warned &= present | dirs
        await self._consider(files)

    async def on_changes(self, changed: set[Path]) -> None:
        """Watcher paths plus pending files that are due; new directories are walked."""
        root = self._resolve_root()
        if root is None:
            return
        now = self.ctx.monotonic()
        todo = [p for p, s in self._pending.items() if recheck_at(s, self.config.settle) <= now]
        for raw in changed:
            path = self._under_root(raw, root)
            if path is None:
                continue
            try:
                mode = path.lstat().st_mode
            except OSError:
                self._forget(path)
                continue
            if stat.S_ISDIR(mode):
                if path in self._dirs or path == root or not wanted_dir(path.name):
                    continue
                files, dirs = self._walk(path)  # a new (or moved-in) directory
                self._dirs |= dirs
                todo += files
            elif stat.S_ISREG(mode) and wanted_file(path.name, self.patterns):
                todo.append(path)
        await self._consider(dict.fromkeys(todo))

    def _forget(self, path: Path) -> None:
        self._pending.pop(path, None)
        self._known.pop(path, None)
        self._dirs.discard(path)

    # -- paths ---------------------------------------------------------------------------

    def _watch_root(self) -> Path:
        return self._resolve_root() or self.config.path

    def _resolve_root(self) -> Path | None:
        """The root, with a symlinked root resolved once (when it first exists)."""
        if self._root is None and self.config.path.is_dir():
            self._root = self.config.path.resolve()
        return self._root

    def _under_root(self, raw: Path, root: Path) -> Path | None:
        """A watcher path mapped under the resolved root; None if outside or unwanted."""
        for base in (root, self.config.path):
            with contextlib.suppress(ValueError):
                rel = raw.relative_to(base)
                if rel.parts and all(wanted_dir(p) for p in rel.parts[:-1]):
                    if is_ignored_name(rel.parts[-1]):
                        return None
                    return root / rel
                return None
        return None

    def _walk(self, top: Path) -> tuple[dict[Path, None], set[Path]]:
        """Wanted regular files and directories under `top`, never through a symlink."""
        files: dict[Path, None] = {}
        dirs: set[Path] = set()
        stack = [top]
        while stack:
            d = stack.pop()
            dirs.add(d)
            for entry in self._entries(d):
                if entry.is_dir(follow_symlinks=False):
                    if wanted_dir(entry.name):
                        stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False) and wanted_file(
                    entry.name, self.patterns
                ):
                    files[Path(entry.path)] = None
        return files, dirs

    def _entries(self, d: Path) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(d) as it:
                yield from it
        except FileNotFoundError:
            return
        except OSError as exc:
            self._warn(d, f"cannot list {d}: {exc.strerror or exc}")

    def _warn(self, path: Path, message: str) -> None:
        self.stats.last_error = message
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%s: %s", self.name, message)

    # -- settle and enqueue --------------------------------------------------------------

    async def _consider(self, paths: Iterable[Path]) -> None:
        """Observe each file; queue the settled ones. After OutboxFull the rest are only
        observed: the run loop waits for space and the next round tries again."""
        root = self._root
        assert root is not None
        self._blocked = False
        for path in paths:
            try:
                st = path.lstat()
            except FileNotFoundError:
                self._forget(path)
                continue
            except OSError as exc:
                self._warn(path, f"cannot stat {path}: {exc.strerror or exc}")
                continue
            prev = self._pending.get(path)
            seen = observe(prev, st.st_size, st.st_mtime_ns, self.ctx.clock(), self.ctx.monotonic())
            if seen.size == 0 or self._known.get(path) == (seen.size, seen.mtime_ns):
                self._pending.pop(path, None)  # empty files come back on their next event
                continue
            if prev is None:
                if await self._in_outbox(path, seen):
                    continue
                self.stats.files_seen += 1
            self._pending[path] = seen
            if not self._blocked and is_settled(seen, self.config.settle):
                await self._enqueue(path, root, st)

    async def _in_outbox(self, path: Path, seen: Seen) -> bool:
        claim = await self.ctx.outbox.claim_of(str(path))
        if claim is None or claim.send_again(seen.size, seen.mtime_ns):
            return False  # unknown, or uploaded and kept, then changed: a new version
        self._known[path] = (claim.size, claim.mtime_ns)
        return True

    async def _enqueue(self, path: Path, root: Path, st: os.stat_result) -> None:
        rel = PurePosixPath(path.relative_to(root))
        ident = Identity.of(st)
        try:
            # The identity the outbox keeps: the uploader sends and deletes only this file.
            os.close(open_under(root, rel, ident))
        except Swapped as exc:
            log.debug("%s: %s; skipped", self.name, exc)
            self._pending.pop(path, None)
            return
        except FileNotFoundError:
            log.debug("%s: %s vanished before it was queued", self.name, path)
            self._forget(path)
            return
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                self._warn(path, f"cannot read {path}: {exc.strerror}; retrying on rescan")
                self._pending.pop(path, None)  # the next full scan looks again
                return
            raise
        meta = file_metadata(self.ctx.part_id, self.config, rel, st)
        claim = Claim(
            str(path),
            st.st_size,
            st.st_mtime_ns,
            self.config.delete_after_upload,
            root=str(root),
            ident=ident,
        )
        try:
            await self.ctx.outbox.enqueue_item(
                KIND_FILE,
                meta.SerializeToString(),
                FileRef(str(path), 0, st.st_size, root=str(root), ident=ident),
                claim=claim,
                source=self.name,
            )
        except OutboxFull as exc:
            self._blocked = True
            self.stats.backpressure = True
            self.stats.last_error = str(exc)
            log.debug("%s: outbox full; %s stays where it is", self.name, path)
            return
        self._pending.pop(path, None)
        self._known[path] = (st.st_size, st.st_mtime_ns)
        self._warned.discard(path)
        self.stats.files_done += 1
        self.stats.backpressure = False
        self.stats.last_event_at = self.ctx.clock()


# --------------------------------------------------------------------------- kind


def _some_pattern(patterns: tuple[str, ...]) -> str | None:
    return None if patterns else "needs at least one pattern"


@dataclass(frozen=True, kw_only=True)
class FilesConfig(SourceConfig):
    """Any files in a directory, uploaded whole once they stop changing."""

    kind = "files"
    patterns: tuple[str, ...] = option(
        ("*",), Strings(), "glob patterns matched against file names", check=_some_pattern
    )
    settle: float = option(10.0, Duration(), "a file is taken once unchanged this long")
    delete_after_upload: bool = option(
        True, Flag(), "delete the file after the server's ack; false: remember it"
    )


register(FilesConfig, FilesSource)
