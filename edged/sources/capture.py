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
import fcntl
import logging
import os
import stat
from pathlib import Path

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureReader, field_span, open_capture, split_legacy_images
from edged.config import SourceConfig
from edged.errors import CaptureFormatError, OutboxFull
from edged.outbox import (
    CLAIM_COMMITTED,
    CLAIM_COMMITTING,
    KIND_BINARY,
    Claim,
    FileRef,
    Progress,
)
from edged.safefs import Identity, Swapped, open_under, stat_under, unlink_under
from edged.sources.base import SourceContext, SourceStats, quarantine, wait_for_space
from edged.sources.watch import DirWatcher

log = logging.getLogger("edged.sources.capture")

ROBOT_DIRS = frozenset({"failed", "datasetUpload", "sequences"})
CHUNK_READINGS = 1000
CHUNK_BYTES = 1 << 20


def boot_time() -> float:
    """When this machine booted: a `.prog` older than that has no live writer."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def prog_is_orphaned(mtime: float, now: float, grace_s: float, booted_at: float) -> bool:
    """A `.prog` is recovered once its writer must be gone: untouched for the grace
    period, or last written before this boot."""
    return mtime < booted_at or now - mtime >= grace_s


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


class CaptureSource:
    kind = "capture"

    def __init__(self, config: SourceConfig, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = config.name or f"capture:{config.path}"
        self.root = config.path
        self.stats = SourceStats()
        self._watcher: DirWatcher | None = None
        self._booted_at = boot_time()
        self._prog_waiting: dict[Path, float] = {}  # .prog path -> when to look again
        self._unreadable: set[Path] = set()  # warned about once; pruned on every scan

    # -- loop ---------------------------------------------------------------------------

    def request_rescan(self) -> None:
        """`sync-now`: the running loop does a full pass (see Source.request_rescan)."""
        if self._watcher is not None:
            self._watcher.request_rescan()

    async def run(self) -> None:
        with DirWatcher(self.root) as watcher:
            self._watcher = watcher
            await self.scan_once()
            next_scan = self.ctx.clock() + self.ctx.rescan_s
            while True:
                now = self.ctx.clock()
                wake = min([next_scan, *self._prog_waiting.values()])
                was_active = watcher.active
                timeout = watcher.timeout(max(0.0, wake - now))
                appeared = not was_active and watcher.active  # root just created: scan it
                changed = await watcher.wait(0.0 if appeared else timeout)
                if changed is None or appeared or self.ctx.clock() >= next_scan:
                    await self.scan_once()
                    next_scan = self.ctx.clock() + self.ctx.rescan_s
                    continue
                due = [p for p, t in self._prog_waiting.items() if t <= self.ctx.clock()]
                for path in sorted({*changed, *due}):
                    if path.suffix in (".capture", ".prog") and self._inside(path):
                        await self.consider(path)

    async def scan_once(self) -> None:
        """Every capture file under the root, oldest name first (names are timestamps)."""
        found = await asyncio.to_thread(self._walk)
        self._unreadable &= set(found)
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
                elif entry.name.endswith((".capture", ".prog")):
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
            return
        except Swapped as exc:
            log.warning("%s; skipped", exc)
            return
        if not stat.S_ISREG(st.st_mode):
            return
        claim = await self.ctx.outbox.claim_of(str(path))
        committing = claim is not None and claim[0] == CLAIM_COMMITTING
        if claim is not None and not committing:
            if claim[0] != CLAIM_COMMITTED:
                return  # binary readings still queued by reference
            if (st.st_size, st.st_mtime_ns) == claim[1:]:
                await self._retire(path, st)  # crashed between commit and delete
                return
            # A .prog that grew after we committed it: its writer was alive after all.
            # Keep the offset, drop the claim, and commit what was appended.
            await self.ctx.outbox.forget_claim(str(path))
        if path.suffix == ".prog":
            now = self.ctx.clock()
            if not prog_is_orphaned(st.st_mtime, now, self.config.prog_grace, self._booted_at):
                self._prog_waiting[path] = st.st_mtime + self.config.prog_grace + 0.01
                return
            self._prog_waiting.pop(path, None)
            log.info("recovering orphaned %s (writer gone)", path)
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

    async def _commit_file(self, path: Path, st: os.stat_result, committing: bool) -> None:
        # A .prog past its grace period may still have a live writer (a slow sensor that
        # has not filled its 4 KiB buffer): commit what is there, keep the file.
        live = path.suffix == ".prog" and not self._writer_gone(path, st)
        fd = open_under(self.root, path.relative_to(self.root), Identity.of(st))
        try:
            reader = open_capture(path, fd=fd)
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
            if reader.metadata.type == pb.DATA_TYPE_BINARY_SENSOR:
                if live:
                    return  # binary files are closed after one image: wait for the rename
                referenced = await self._commit_binary(
                    path, st, reader, meta, start, claim, committing
                )
            else:
                referenced = False
                await self._commit_tabular(path, st, reader, meta, start, None if live else claim)
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

    async def _commit_tabular(
        self,
        path: Path,
        st: os.stat_result,
        reader: CaptureReader,
        meta: pb.UploadMetadata,
        start: int,
        claim: Claim | None,
    ) -> None:
        outbox, meta_bytes = self.ctx.outbox, meta.SerializeToString()
        chunk: list[bytes] = []
        size, end = 0, start
        try:
            for record in reader.read_from(start):
                chunk.append(record.raw)
                size += len(record.raw)
                end = record.end
                if len(chunk) >= CHUNK_READINGS or size >= CHUNK_BYTES:
                    await outbox.enqueue_readings(
                        meta_bytes, chunk, progress=self._progress(path, st, end)
                    )
                    self.stats.readings += len(chunk)
                    chunk, size = [], 0
        except CaptureFormatError as exc:
            if chunk:
                await outbox.enqueue_readings(
                    meta_bytes, chunk, progress=self._progress(path, st, end)
                )
                self.stats.readings += len(chunk)
            self._quarantine(path, st, str(exc), keep_original=False)
            raise FileNotFoundError from exc  # nothing left to retire
        await outbox.enqueue_readings(
            meta_bytes, chunk, claim=claim, progress=self._progress(path, st, end)
        )
        self.stats.readings += len(chunk)

    async def _commit_binary(
        self,
        path: Path,
        st: os.stat_result,
        reader: CaptureReader,
        meta: pb.UploadMetadata,
        start: int,
        claim: Claim,
        committing: bool,
    ) -> bool:
        """Queue each binary reading; True if any item still reads from this file."""
        outbox, meta_bytes = self.ctx.outbox, meta.SerializeToString()
        referenced = committing  # an earlier run queued references to this file
        try:
            for record in reader.read_from(start):
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
                    )
                    referenced = True
                elif kind == "struct":
                    await self._commit_legacy(path, reader, record.reading, meta, progress)
                self.stats.readings += 1
        except CaptureFormatError as exc:
            self._quarantine(path, st, str(exc), keep_original=referenced)
            if not referenced:
                raise FileNotFoundError from exc
            await outbox.finish_claim(str(path))
            return True
        if not referenced:
            await outbox.enqueue_readings(meta_bytes, [], claim=claim)  # header-only
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
        """True if no process has `path` open: written before this boot, or a write lease
        can be taken (Linux grants one only when nobody else holds the file open)."""
        if st.st_mtime < self._booted_at:
            return True
        try:
            fd = open_under(self.root, path.relative_to(self.root), Identity.of(st))
        except (OSError, Swapped):
            return False
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except OSError:
            return False  # open elsewhere (EAGAIN), or no lease support: assume a writer
        else:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            return True
        finally:
            os.close(fd)

    def _progress(self, path: Path, st: os.stat_result, offset: int) -> Progress:
        return Progress(self.name, str(path), st.st_ino, offset, 0)

    async def _retire(self, path: Path, st: os.stat_result) -> None:
        """Every reading is committed: delete the file (only if it is still the one read,
        reached without links), then forget it."""
        try:
            unlink_under(self.root, path.relative_to(self.root), Identity.of(st))
        except FileNotFoundError:
            pass  # a directory on the way went: so did the file
        except Swapped as exc:
            log.warning("%s; not deleting anything", exc)
        await self.ctx.outbox.forget_claim(str(path), self.name)
        if path.suffix == ".capture":  # its offset may have been kept under the .prog name
            await self.ctx.outbox.forget_claim(str(path.with_suffix(".prog")), self.name)

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
