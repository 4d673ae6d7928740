"""Where `edged ingest` keeps blob bytes: a directory (default) or S3-compatible storage.

Contract, the same for every store (tests/test_blob_contract.py runs it on each):

- A blob is written through a `BlobWriter` under a key chosen at `begin`
  (`blob_key`: `blobs/<org segment>/<xx>/<file id>`, so every organisation has its own
  prefix), `finish`ed (durable, not yet visible to the index), `place`d inside the
  index transaction, and `committed` once that transaction is. Until then `discard`
  removes everything the writer made; after `place` it removes nothing (the row may
  still commit), and `drop` removes the placed blob when the commit failed.
- Memory holds at most one part (`part_size`) plus the chunk being written.
- Keys are ours (`blob_key`) and checked on every read and delete (`check_key`): a
  stored or hostile path cannot leave the data directory or the bucket prefix.
- `sweep` removes what a crashed upload left behind: the local store's temp files; in
  S3 (s3blobs.py), blobs whose pending marker outlived `SWEEP_GRACE_S` without a row, and
  multipart uploads older than that without a live marker. A writer refreshes its
  marker while parts flow, so a long upload is never swept; the index is asked only
  about the few stale markers, never about the whole bucket.

Not promised: a crash between deleting rows and deleting their blobs leaves orphans
(no marker names them); they cost space, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote

from grpclib.exceptions import GRPCError

from edged.durable import fsync_dir
from edged.errors import ConfigError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PART_SIZE = 8 * MiB  # bytes buffered per multipart part (memory per upload in flight)
MIN_PART_SIZE = 5 * MiB  # S3's smallest part but the last
MAX_PARTS = 10_000  # S3's most parts per upload: 8 MiB parts carry up to 78 GiB
SWEEP_GRACE_S = 3600.0  # a pending marker or multipart upload older than this is abandoned
SWEEP_INTERVAL_S = 600.0  # how often a running server sweeps (and once at start)
SWEEP_MAX_ITEMS = 10_000  # objects or uploads looked at per sweep (bounded work)

# What `blob_key` makes, and all a read or delete accepts. The org segment is optional
# for blobs stored before keys were scoped per organisation (`blobs/xx/<id>`).
_ORG_SEGMENT = r"(?:o_[A-Za-z0-9_.~%-]{0,200}|h_[0-9a-f]{64})"
_KEY = re.compile(rf"blobs/(?:{_ORG_SEGMENT}/)?[0-9a-f]{{2}}/[0-9a-f]{{32}}")
_MARKER = re.compile(rf"pending/{_ORG_SEGMENT}/[0-9a-f]{{2}}/[0-9a-f]{{32}}")

Indexed = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these file ids have an index row (the sweep's one question to the index)."""


class BlobStoreError(GRPCError):
    """The blob store failed; `status` is what the caller gets (UNAVAILABLE when the store
    is unreachable or overloaded, so daemons retry) and the message names bucket and key."""

    message: str


def org_segment(org_id: str) -> str:
    """The organisation's key prefix: readable, never `.`/`..`, bounded in length."""
    quoted = quote(org_id, safe="")
    if len(quoted) <= 200:
        return f"o_{quoted}"
    return f"h_{hashlib.sha256(org_id.encode()).hexdigest()}"


def blob_key(org_id: str, file_id: str) -> str:
    return check_key(f"blobs/{org_segment(org_id)}/{file_id[:2]}/{file_id}")


def check_key(key: str) -> str:
    """`key` if it is one `blob_key` makes; a ValueError naming it otherwise."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"{key!r} is not a blob key (blobs/<org>/<xx>/<file id>)")
    return key


def marker_key(key: str) -> str:
    """Where an upload in progress announces itself: pending/ beside blobs/."""
    return "pending/" + key.removeprefix("blobs/")


def key_of_marker(marker: str) -> str | None:
    return "blobs/" + marker.removeprefix("pending/") if _MARKER.fullmatch(marker) else None


@dataclass(frozen=True)
class Swept:
    """What one sweep removed."""

    temp_files: int = 0
    blobs: int = 0
    markers: int = 0
    multipart_uploads: int = 0


class BlobWriter(Protocol):
    file_id: str
    key: str
    size: int
    peak_buffered: int  # most bytes held in memory at once (tests check the bound)

    @property
    def sha256(self) -> str: ...

    async def write(self, chunk: bytes) -> None: ...

    async def finish(self) -> None:
        """Every byte durable in the store, not yet visible under `key` to the index."""

    def place(self) -> None:
        """Inside the index transaction (a worker thread): make the blob readable at `key`."""

    def unplace(self) -> None:
        """The transaction failed after `place` (same thread)."""

    async def drop(self) -> None:
        """The commit failed after `place`: remove the blob."""

    async def committed(self) -> None:
        """The row is committed: forget the pending state (never fails)."""

    async def discard(self) -> None:
        """The upload ends: remove whatever was not placed (never fails)."""


class BlobStore(Protocol):
    description: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def begin(self, org_id: str) -> BlobWriter: ...

    async def read(self, key: str) -> bytes: ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Remove blobs whose rows are gone; a missing one is not an error."""

    async def sweep(self, indexed: Indexed, grace_s: float | None = None) -> Swept:
        """Remove what abandoned uploads left that is older than `grace_s` (default: the
        store's grace period)."""


# -- local directory --------------------------------------------------------------------------


class LocalBlobWriter:
    """Bytes go to a private temp file, fsync'd at `finish`, renamed into place by `place`."""

    def __init__(self, store: LocalBlobStore, org_id: str) -> None:
        self.file_id = uuid.uuid4().hex
        self.key = blob_key(org_id, self.file_id)
        self.size = 0
        self.peak_buffered = 0
        self._store = store
        self.path = store.tmp_dir / f"{self.file_id}.part"
        self._final = store.root / self.key
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self._placed = False
        store.live.add(self.path)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    async def finish(self) -> None:
        def _sync() -> None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

        await asyncio.to_thread(_sync)

    def place(self) -> None:
        final_dir = self._final.parent
        for d in (final_dir.parent, final_dir):  # the org's directory, then xx/: both 0700
            if not d.is_dir():
                d.mkdir(exist_ok=True, mode=0o700)
                fsync_dir(d.parent)
        os.replace(self.path, self._final)
        self._placed = True
        fsync_dir(final_dir)

    def unplace(self) -> None:
        self._final.unlink(missing_ok=True)

    async def drop(self) -> None:
        self._final.unlink(missing_ok=True)

    async def committed(self) -> None:
        self._store.live.discard(self.path)

    async def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self._placed:
            self.path.unlink(missing_ok=True)
        self._store.live.discard(self.path)


class LocalBlobStore:
    """Blobs under `<data>/blobs/`, temp files under `<data>/blobs/.tmp/` (one server per
    directory, so everything there at start is a leftover)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "blobs" / ".tmp"
        self.description = str(root / "blobs")
        self.live: set[Path] = set()  # temp files of uploads in progress (never swept)

    async def open(self) -> None:
        for d in (self.root, self.root / "blobs", self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.tmp_dir.glob("*.part"):
            leftover.unlink()  # an upload cut short before it was acknowledged

    async def close(self) -> None:
        return None

    async def begin(self, org_id: str) -> BlobWriter:
        return LocalBlobWriter(self, org_id)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def read(self, key: str) -> bytes:
        return await asyncio.to_thread(self.path(key).read_bytes)

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self.path(k) for k in keys]

        def unlink() -> None:
            for p in paths:
                p.unlink(missing_ok=True)

        await asyncio.to_thread(unlink)

    async def sweep(self, indexed: Indexed, grace_s: float | None = None) -> Swept:
        cutoff = time.time() - (SWEEP_GRACE_S if grace_s is None else grace_s)
        removed = 0
        for leftover in self.tmp_dir.glob("*.part"):
            if leftover in self.live:
                continue
            with contextlib.suppress(FileNotFoundError):
                if leftover.stat().st_mtime <= cutoff:
                    leftover.unlink()
                    removed += 1
        return Swept(temp_files=removed)


def open_blob_store(
    url: str | None, root: Path, endpoint: str | None, env: Mapping[str, str] | None = None
) -> BlobStore:
    """The store `--blobs` names (the data directory when unset); not yet opened."""
    if url is None:
        if endpoint is not None:
            raise ConfigError("--s3-endpoint needs --blobs s3://BUCKET[/PREFIX]")
        return LocalBlobStore(root)
    try:
        from edged.ingest import s3blobs
    except ImportError:
        raise ConfigError("--blobs s3://... needs the s3 extra: pip install 'edged[s3]'") from None
    return s3blobs.open_s3_store(url, endpoint, os.environ if env is None else env)


async def sweep_forever(
    store: BlobStore, indexed: Indexed, interval_s: float = SWEEP_INTERVAL_S
) -> None:
    """Sweep now and then every `interval_s`; a failed sweep is logged and retried."""
    while True:
        try:
            swept = await store.sweep(indexed)
            if swept != Swept():
                log.info("blob sweep of %s removed %s", store.description, swept)
        except BlobStoreError as exc:
            log.warning("blob sweep of %s failed: %s", store.description, exc.message)
        await asyncio.sleep(interval_s)
