"""The `capture` source: robot `.capture` files (and orphaned `.prog` files).

Per file: tabular readings are copied into the outbox in chunks, each chunk committed
with the file offset it reached, so a crash resumes exactly where it stopped; the
last chunk also records a claim, and only then is the file deleted. Binary readings
are queued by reference (path, offset, length of the payload inside the file): the
outbox deletes the file once the last of them is acknowledged. A truncated file
(power cut) delivers every whole record and is retired; a corrupt one is moved to
quarantine with the path, byte offset and cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureReader, field_span, open_capture, split_legacy_images
from edged.daemon.config import SourceConfig
from edged.daemon.outbox import KIND_BINARY, Claim, ClaimState, FileRef, Progress
from edged.daemon.safefs import Identity, Swapped, open_under, stat_under
from edged.daemon.sources.base import (
    ROBOT_DIRS,
    SourceContext,
    SourceStats,
    is_ignored_name,
    note_root,
    quarantine,
    register,
    wait_for_space,
)
from edged.daemon.sources.watch import WatchLoop
from edged.errors import CaptureFormatError, IncompleteHeader, OutboxFull
from edged.options import Duration, option

log = logging.getLogger("edged.sources.capture")

CHUNK_READINGS = 1000
CHUNK_BYTES = 1 << 20


def boot_time() -> float:
    """When this machine booted (wall clock, as /proc/stat reckons it now)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def prog_wait_s(mtime: float, now: float, grace_s: float, watched_s: float) -> float:
    """Seconds until a `.prog` has been untouched for the grace period (0: it has).

    Untouched time is its age by mtime, or at least as long as we watched it unchanged
    (monotonic). An mtime in the future (the clock was stepped back, or a robot without
    a real-time clock booted with a stale one) says nothing, so then only watching counts:
    the file is late by one grace period, never stuck until the clock catches up."""
    age = now - mtime if mtime <= now else 0.0
    return max(0.0, grace_s - max(age, watched_s))


def writer_gone(lease: bool | None, mtime: float, booted_at: float) -> bool:
    """Whether a `.prog` has no live writer. The write-lease probe sees open descriptors,
    so when it can run it decides (`lease`: True = nobody has it open). Only when it
    cannot (`None`) does "last written before this boot" count: on robots whose clock
    starts stale and jumps at NTP sync that is weak evidence, and without either the
    file is treated as still being written (committed, kept)."""
    if lease is not None:
        return lease
    return mtime < booted_at


def lease_free(root: Path, path: Path, st: os.stat_result | None = None) -> bool | None:
    """Probe with a write lease, which Linux grants only when no other descriptor has the
    file open: True (nobody has it open), False (somebody does), None (cannot probe:
    unreadable, not our file without CAP_LEASE, or a filesystem without leases). The file
    is reached below `root` without links and must still be the one `st` describes."""
    try:
        fd = open_under(root, path.relative_to(root), None if st is None else Identity.of(st))
    except Swapped:
        return False  # not the file we saw: certainly not ours to call abandoned
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        return False if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True
    finally:
        os.close(fd)


def wanted_file(name: str) -> bool:
    """A capture file (or a writer's `.prog`), not a hidden or temporary name."""
    return name.endswith((".capture", ".prog")) and not is_ignored_name(name)


def upload_metadata_for(
    header: pb.DataCaptureMetadata, part_id: str, config: SourceConfig
) -> pb.UploadMetadata:
    meta = pb.UploadMetadata(
        part_id=part_id,
        component_type=header.component_type,
        component_name=header.component_name,
        method_name=header.method_name,
        type=header.type,
        file_extension=header.file_extension,
        tags=[*header.tags, *(t for t in config.tags if t not in header.tags)],
        dataset_ids=list(config.dataset_ids),
        mime_type=header.mime_type,
    )
    for key, value in header.method_parameters.items():
        meta.method_parameters[key].CopyFrom(value)
    return meta


def _changed(root: Path, path: Path, before: os.stat_result) -> bool:
    try:
        now = stat_under(root, path.relative_to(root))
    except FileNotFoundError:
        return False
    return (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns)


@dataclass(frozen=True)
class _Pass:
    """One commit pass over an open capture file: its readings from byte `start` on,
    queued under `meta`."""

    path: Path
    st: os.stat_result
    reader: CaptureReader
    meta: pb.UploadMetadata
    start: int


class CaptureSource:
    kind = "capture"

    def __init__(
        self, config: CaptureConfig, ctx: SourceContext, *, booted_at: float | None = None
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.name = config.name or f"capture:{config.path}"
        self.root = config.path
        self.stats = SourceStats()
        self._watch = WatchLoop(self, self.root)
        self._booted_at = boot_time() if booted_at is None else booted_at
        # Both keyed by .prog path, bounded by the files present (pruned on every scan).
        self._prog_waiting: dict[Path, float] = {}  # when to look again (ctx.monotonic)
        self._prog_watched: dict[Path, tuple[int, int, float]] = {}  # size, mtime, since
        self._unreadable: set[Path] = set()  # warned about once; pruned on every scan

    # -- loop ---------------------------------------------------------------------------

    def request_rescan(self) -> None:
        """`sync-now`: the running loop does a full pass (see Source.request_rescan)."""
        self._watch.request_rescan()

    async def run(self) -> None:
        await self._watch.run()

    async def on_changes(self, changed: set[Path]) -> None:
        """Changed capture files, and `.prog` files whose grace period is over. A `.prog`
        that changed (its writer just closed it) brings its `.capture` name along: the
        writer renames it right after closing, and the rename's own event may come late."""
        due = [p for p, t in self._prog_waiting.items() if t <= self.ctx.monotonic()]
        renamed = [p.with_suffix(".capture") for p in changed if p.suffix == ".prog"]
        for path in sorted({*changed, *due, *renamed}):
            if wanted_file(path.name) and self._inside(path):
                await self.consider(path)

    def wake_at(self) -> float | None:
        return min(self._prog_waiting.values(), default=None)

    def wants_scan(self) -> bool:
        return False

    def blocked(self) -> bool:
        return False  # `consider` waits for space itself: a file is committed whole

    async def scan_once(self) -> None:
        """Every capture file under the root, oldest name first (names are timestamps)."""
        note_root(self.name, self.stats, self.root)
        found = await asyncio.to_thread(self._walk)
        self._unreadable &= set(found)
        present = set(found)
        self._prog_waiting = {p: t for p, t in self._prog_waiting.items() if p in present}
        self._prog_watched = {p: w for p, w in self._prog_watched.items() if p in present}
        for path in found:
            await self.consider(path)

    def _walk(self) -> list[Path]:
        found: list[Path] = []
        stack = [self.root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if entry.name not in ROBOT_DIRS and not entry.name.startswith("."):
                        stack.append(Path(entry.path))
                elif wanted_file(entry.name):
                    found.append(Path(entry.path))
        found.sort()
        return found

    def _inside(self, path: Path) -> bool:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        return not any(part in ROBOT_DIRS or part.startswith(".") for part in rel.parts[:-1])

    # -- one file -----------------------------------------------------------------------

    async def consider(self, path: Path) -> None:
        """Commit whatever `path` holds that the outbox does not have yet."""
        try:
            st = stat_under(self.root, path.relative_to(self.root))
        except FileNotFoundError:
            self._prog_waiting.pop(path, None)
            self._prog_watched.pop(path, None)
            return
        except Swapped as exc:
            log.warning("%s; skipped", exc)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        claim = await self.ctx.outbox.claim_of(str(path))
        committing = claim is not None and claim.state is ClaimState.COMMITTING
        if claim is not None and not committing:
            if claim.state is not ClaimState.COMMITTED:
                return  # binary readings still queued by reference
            if claim.same_version(st.st_size, st.st_mtime_ns):
                await self._retire(path, st)  # crashed between commit and delete
                return
            # A .prog that grew after we committed it: its writer was alive after all.
            # Keep the offset, drop the claim, and commit what was appended.
            await self.ctx.outbox.forget_claim(str(path))
        if path.suffix == ".prog":
            wait = prog_wait_s(
                st.st_mtime, self.ctx.clock(), self.config.prog_grace, self._watched_s(path, st)
            )
            if wait > 0:
                self._prog_waiting[path] = self.ctx.monotonic() + wait + 0.01
                return
            self._prog_waiting.pop(path, None)
            log.info("recovering %s (untouched for %.0fs)", path, self.config.prog_grace)
        self.stats.files_seen += 1
        self.stats.last_event_at = self.ctx.clock()
        while True:
            try:
                await self._commit_file(path, st, committing)
                return
            except OutboxFull as exc:
                self.stats.last_error = str(exc)
                await wait_for_space(self.ctx, self.stats)
            except FileNotFoundError:
                return
            except Swapped as exc:  # a link took its place: nothing is read through it
                self.stats.last_error = str(exc)
                log.warning("%s; skipped", exc)
                return
            except OSError as exc:
                # EACCES (the robot wrote it with a mode we may not read), EIO: nothing is
                # wrong with the data, so no quarantine; it stays put, the next scan looks
                # again, and the other files go on.
                self.stats.last_error = f"cannot read {path}: {exc.strerror or exc}"
                if path not in self._unreadable:
                    self._unreadable.add(path)
                    log.warning("%s; retrying on rescan", self.stats.last_error)
                return

    def _watched_s(self, path: Path, st: os.stat_result) -> float:
        """How long (monotonic) we have seen `path` with this very size and mtime."""
        now = self.ctx.monotonic()
        size, mtime_ns, since = self._prog_watched.get(path, (-1, -1, now))
        if (size, mtime_ns) != (st.st_size, st.st_mtime_ns):
            since = now
            self._prog_watched[path] = (st.st_size, st.st_mtime_ns, since)
        return now - since

    async def _commit_file(self, path: Path, st: os.stat_result, committing: bool) -> None:
        # A .prog past its grace period may still have a live writer (a slow sensor that
        # has not filled its 4 KiB buffer): commit what is there, keep the file.
        live = path.suffix == ".prog" and not self._writer_gone(path, st)
        fd = open_under(self.root, path.relative_to(self.root), Identity.of(st))
        try:
            reader = open_capture(path, fd=fd)
        except IncompleteHeader as exc:
            if path.suffix == ".capture":  # finished, yet no header: corrupt
                self._quarantine(path, st, str(exc), keep_original=False)
            elif not live:  # its writer died before the header reached the disk
                log.info("%s: removed: no complete header, so no data (%s)", path, exc.reason)
                await self._retire(path, st)
            return  # a live writer has the header in its buffer still: look again later
        except CaptureFormatError as exc:
            self._quarantine(path, st, str(exc), keep_original=False)
            return
        with reader:
            meta = upload_metadata_for(reader.metadata, self.ctx.part_id, self.config)
            start = max(reader.data_offset, await self._resume_offset(path, st))
            claim = Claim(
                str(path),
                st.st_size,
                st.st_mtime_ns,
                delete_after=True,
                root=str(self.root),
                ident=Identity.of(st),
            )
            file = _Pass(path, st, reader, meta, start)
            if reader.metadata.type == pb.DATA_TYPE_BINARY_SENSOR:
                if live:
                    return  # binary files are closed after one image: wait for the rename
                referenced = await self._commit_binary(file, claim, committing)
            else:
                referenced = False
                await self._commit_tabular(file, None if live else claim)
            self.stats.backpressure = False
            if reader.truncated_at is not None:
                self.stats.truncated += 1
                log.info(
                    "%s ends mid-record at byte %d (power cut?): delivered every whole"
                    " reading before it",
                    path,
                    reader.truncated_at,
                )
        self._unreadable.discard(path)
        if live:
            log.info("%s: committed what is there; its writer still has it open", path)
            return
        if not referenced:
            if path.suffix == ".prog" and _changed(self.root, path, st):
                log.warning("%s changed while it was recovered; its writer is alive", path)
                return
            await self._retire(path, st)
        self.stats.files_done += 1

    async def _commit_tabular(self, file: _Pass, claim: Claim | None) -> None:
        path, st, meta_bytes = file.path, file.st, file.meta.SerializeToString()

        async def commit(chunk: list[bytes], end: int, with_claim: Claim | None = None) -> None:
            """Queue `chunk`, the readings up to byte `end`, with the file's progress."""
            await self.ctx.outbox.enqueue_readings(
                meta_bytes,
                chunk,
                claim=with_claim,
                progress=self._progress(path, st, end),
                source=self.name,
            )
            self.stats.readings += len(chunk)

        chunk: list[bytes] = []
        size, end = 0, file.start
        try:
            for record in file.reader.read_from(file.start):
                # A full chunk is committed only once another record follows: the last
                # one goes with the claim, so a file of one chunk is one transaction.
                if len(chunk) >= CHUNK_READINGS or size >= CHUNK_BYTES:
                    await commit(chunk, end)
                    chunk, size = [], 0
                chunk.append(record.raw)
                size += len(record.raw)
                end = record.end
        except CaptureFormatError as exc:
            if chunk:
                await commit(chunk, end)
            self._quarantine(path, st, str(exc), keep_original=False)
            raise FileNotFoundError from exc  # nothing left to retire
        await commit(chunk, end, claim)

    async def _commit_binary(self, file: _Pass, claim: Claim, committing: bool) -> bool:
        """Queue each binary reading; True if any item still reads from this file."""
        path, st, meta = file.path, file.st, file.meta
        outbox, meta_bytes = self.ctx.outbox, meta.SerializeToString()
        referenced = committing  # an earlier run queued references to this file
        try:
            for record in file.reader.read_from(file.start):
                progress = self._progress(path, st, record.end)
                sensor = record.reading.metadata.SerializeToString()
                kind = record.reading.WhichOneof("data")
                if kind == "binary":
                    span = field_span(record.raw, 3)
                    assert span is not None
                    body_start = record.end - len(record.raw)
                    ref = FileRef(str(path), body_start + span[0], span[1], claim.root, claim.ident)
                    await outbox.enqueue_item(
                        KIND_BINARY,
                        meta_bytes,
                        ref,
                        sensor=sensor,
                        claim=claim,
                        progress=progress,
                        more=True,  # not deletable until finish_claim: more may follow
                        source=self.name,
                    )
                    referenced = True
                elif kind == "struct":
                    await self._commit_legacy(path, file.reader, record.reading, meta, progress)
                self.stats.readings += 1
        except CaptureFormatError as exc:
            self._quarantine(path, st, str(exc), keep_original=referenced)
            if not referenced:
                raise FileNotFoundError from exc
            await outbox.finish_claim(str(path))
            return True
        if not referenced:
            await outbox.enqueue_readings(
                meta_bytes, [], claim=claim, source=self.name
            )  # header-only
            return False
        await outbox.finish_claim(str(path))  # every reading queued: the last ack deletes it
        return True

    async def _commit_legacy(
        self,
        path: Path,
        reader: CaptureReader,
        reading: pb.SensorData,
        meta: pb.UploadMetadata,
        progress: Progress,
    ) -> None:
        """Old GetImages captures: one struct holding several images → one upload each."""
        try:
            images = split_legacy_images(reader.metadata, reading) or []
        except ValueError as exc:
            raise CaptureFormatError(str(path), progress.offset, str(exc)) from exc
        for n, image in enumerate(images):
            sensor = pb.SensorMetadata()
            sensor.CopyFrom(reading.metadata)
            sensor.mime_type = image.mime_type_enum
            img_meta = pb.UploadMetadata()
            img_meta.CopyFrom(meta)
            if image.mime_type:
                img_meta.mime_type = image.mime_type
            await self.ctx.outbox.enqueue_item(
                KIND_BINARY,
                img_meta.SerializeToString(),
                image.data,
                sensor=sensor.SerializeToString(),
                # The record counts as done only with its last image: a crash in between
                # resends the first ones (bounded duplicates) instead of losing the rest.
                progress=progress if n == len(images) - 1 else None,
                source=self.name,
            )

    async def _resume_offset(self, path: Path, st: os.stat_result) -> int:
        """Where an earlier run stopped: this path's offset, or (a .prog renamed to
        .capture by its writer) the offset stored under the .prog name, same inode."""
        for candidate in (path, path.with_suffix(".prog")):
            progress = await self.ctx.outbox.progress_of(self.name, str(candidate))
            if progress is not None and progress.inode == st.st_ino:
                return progress.offset
            if path.suffix != ".capture":
                break
        return 0

    def _writer_gone(self, path: Path, st: os.stat_result) -> bool:
        """See `writer_gone`: the lease probe first, the boot time only as a fallback."""
        return writer_gone(lease_free(self.root, path, st), st.st_mtime, self._booted_at)

    def _progress(self, path: Path, st: os.stat_result, offset: int) -> Progress:
        return Progress(self.name, str(path), st.st_ino, offset, 0)

    async def _retire(self, path: Path, st: os.stat_result) -> None:
        """Every reading is committed: the ledger deletes the file (only if it is still
        the one read, reached without links) and forgets it, with the offset that may
        have been kept under its `.prog` name."""
        also = [str(path.with_suffix(".prog"))] if path.suffix == ".capture" else []
        await self.ctx.outbox.retire_committed(
            str(path), str(self.root), Identity.of(st), source=self.name, also=also
        )

    def _quarantine(
        self, path: Path, st: os.stat_result, reason: str, *, keep_original: bool
    ) -> None:
        """Move the file aside; `keep_original` (queued readings still read from it):
        a copy. Never through a link: a swapped path is left where it is."""
        self.stats.quarantined += 1
        self.stats.last_error = reason
        try:
            quarantine(
                self.ctx,
                path,
                reason,
                root=self.root,
                expect=Identity.of(st),
                keep_original=keep_original,
            )
        except Swapped as exc:
            log.warning("%s; not quarantining it (%s)", exc, reason)


# --------------------------------------------------------------------------- kind


@dataclass(frozen=True, kw_only=True)
class CaptureConfig(SourceConfig):
    """A directory of robot .capture files (and .prog files whose writer is gone)."""

    kind = "capture"
    prog_grace: float = option(
        60.0, Duration(), "a .prog file is read once unchanged this long and its writer is gone"
    )


register(CaptureConfig, CaptureSource)
