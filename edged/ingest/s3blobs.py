"""S3-compatible object storage for blobs (`edged ingest --blobs s3://BUCKET/PREFIX`).

The contract is blobs.py's. How this store keeps it:

- Parts of `part_size` go up as they fill (multipart upload, created with the first full
  part; a blob smaller than one part is one PUT), so memory holds one part per upload.
- Before the first byte, a marker `<prefix>pending/<org>/<xx>/<file id>` is written; it
  is refreshed while parts flow and deleted once the index row is committed (or the
  blob removed). The object itself is written straight to its final key
  `<prefix>blobs/...`: no copy, and the row is committed only after the object is
  complete.
- `sweep` (at start and every SWEEP_INTERVAL_S, from any server sharing the bucket)
  removes the blob of every marker older than the grace period whose file id has no
  row, then the marker; and aborts multipart uploads older than that with no live
  marker. Markers rather than a scan of blobs/ because the index is asked only about
  the few stale markers, and a live upload (fresh marker) is never touched by another
  server's sweep.
- Credentials come from AWS_* only (`credentials_from_env`), are passed to the client
  explicitly (no profile files or instance metadata) and never appear in a message.
- Failures become `BlobStoreError`: UNAVAILABLE when the store cannot be reached or
  answers 5xx/throttling (daemons pause and retry), INTERNAL otherwise, each one
  sentence naming the bucket and key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from grpclib.const import Status

from edged.errors import ConfigError
from edged.ingest.blobs import (
    MAX_PARTS,
    MIN_PART_SIZE,
    PART_SIZE,
    SWEEP_GRACE_S,
    SWEEP_MAX_ITEMS,
    BlobStoreError,
    BlobWriter,
    Indexed,
    Swept,
    blob_key,
    check_key,
    key_of_marker,
    marker_key,
)

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)


@functools.cache
def botocore_session() -> AioSession:
    """One session per process: each loads botocore's S3 model (a second of CPU) once."""
    from aiobotocore.session import get_session

    return get_session()


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b/" (always ends in "/")


def parse_s3_url(url: str) -> S3Location:
    """`s3://bucket[/prefix]` as bucket and key prefix; a ConfigError naming the flag."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError(f"--blobs {url!r} is not s3://BUCKET[/PREFIX]")
    if not _BUCKET.fullmatch(parts.netloc):
        raise ConfigError(f"--blobs {url!r}: {parts.netloc!r} is not an S3 bucket name")
    if parts.query or parts.fragment:
        raise ConfigError(f"--blobs {url!r}: no query or fragment allowed")
    segments = [s for s in parts.path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ConfigError(f"--blobs {url!r}: '.' and '..' are not allowed in the prefix")
    return S3Location(parts.netloc, "".join(f"{s}/" for s in segments))


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(default="", repr=False)  # never in a log or traceback
    session_token: str | None = field(default=None, repr=False)
    region: str = "us-east-1"


def credentials_from_env(env: Mapping[str, str]) -> S3Credentials:
    """Credentials from the standard AWS_* variables only (no profile files, no instance
    metadata lookups): what the operator exported is what is used."""
    key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
    if not key or not secret:
        raise ConfigError(
            "--blobs s3://... needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        )
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return S3Credentials(key, secret, env.get("AWS_SESSION_TOKEN") or None, region)


_RETRYABLE_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}
)


def s3_status(error: BaseException) -> Status | None:
    """The gRPC status an object-store failure maps to (None: not a store failure)."""
    if isinstance(error, BotoConnectionError | HTTPClientError | OSError | TimeoutError):
        return Status.UNAVAILABLE
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        http = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return Status.UNAVAILABLE if http >= 500 or code in _RETRYABLE_CODES else Status.INTERNAL
    if isinstance(error, BotoCoreError):
        return Status.INTERNAL
    return None


class S3BlobWriter:
    """Parts go up as they fill; the object exists under `key` once `finish` completes it,
    announced meanwhile by a marker under pending/ that only the index commit retires."""

    def __init__(self, store: S3BlobStore, org_id: str) -> None:
        self.file_id = uuid.uuid4().hex
        self.key = blob_key(org_id, self.file_id)
        self.size = 0
        self.peak_buffered = 0
        self._store = store
        self._buf = bytearray()
        self._sha = hashlib.sha256()
        self._upload_id: str | None = None
        self._parts: list[CompletedPartTypeDef] = []
        self._finished = False
        self._placed = False
        self._gone = False
        self._marked_at = 0.0

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def mark(self) -> None:
        """(Re)write the pending marker: its age tells a sweep whether we are alive."""
        await self._store.put(marker_key(self.key), b"")
        self._marked_at = time.monotonic()

    async def _keep_marked(self) -> None:
        if time.monotonic() - self._marked_at > self._store.grace_s / 4:
            await self.mark()

    async def write(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self.size += len(chunk)
        self._buf += chunk
        self.peak_buffered = max(self.peak_buffered, len(self._buf))
        while len(self._buf) >= self._store.part_size:
            part = bytes(self._buf[: self._store.part_size])
            del self._buf[: self._store.part_size]
            await self._upload_part(part)

    async def _upload_part(self, part: bytes) -> None:
        s = self._store
        if len(self._parts) >= MAX_PARTS:
            raise BlobStoreError(
                Status.RESOURCE_EXHAUSTED,
                f"blob s3://{s.bucket}/{s.name(self.key)} needs more than {MAX_PARTS} parts"
                f" of {s.part_size} bytes; lower --max-upload-bytes",
            )
        await self._keep_marked()
        if self._upload_id is None:
            async with s.errors("start a multipart upload of", self.key):
                started = await s.client.create_multipart_upload(
                    Bucket=s.bucket, Key=s.name(self.key)
                )
            self._upload_id = started["UploadId"]
        number = len(self._parts) + 1
        async with s.errors(f"upload part {number} of", self.key):
            done = await s.client.upload_part(
                Bucket=s.bucket,
                Key=s.name(self.key),
                UploadId=self._upload_id,
                PartNumber=number,
                Body=part,
            )
        self._parts.append({"ETag": done["ETag"], "PartNumber": number})

    async def finish(self) -> None:
        s = self._store
        if self._upload_id is None:  # it fitted in one part: a plain PUT
            await self._keep_marked()
            await s.put(self.key, bytes(self._buf))
        else:
            if self._buf:
                await self._upload_part(bytes(self._buf))
            await self._keep_marked()
            async with s.errors("complete the multipart upload of", self.key):
                await s.client.complete_multipart_upload(
                    Bucket=s.bucket,
                    Key=s.name(self.key),
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._buf = bytearray()
        self._finished = True

    def place(self) -> None:
        self._placed = True  # the object is already where the row will point

    def unplace(self) -> None:
        self._placed = False

    async def drop(self) -> None:
        self._placed = False
        await self.discard()

    async def committed(self) -> None:
        await self._store.forget(marker_key(self.key))

    async def discard(self) -> None:
        if self._placed or self._gone:
            return
        s = self._store
        self._buf = bytearray()
        try:
            if self._finished:
                await s.delete([self.key])
            elif self._upload_id is not None:
                async with s.errors("abort the multipart upload of", self.key):
                    await s.client.abort_multipart_upload(
                        Bucket=s.bucket, Key=s.name(self.key), UploadId=self._upload_id
                    )
            self._upload_id = None
            self._finished = False
            await s.forget(marker_key(self.key))
            self._gone = True
        except BlobStoreError as exc:  # the marker stays: the sweep finishes the job
            log.warning("%s; the sweep will remove it", exc.message)


class S3BlobStore:
    """Blobs as objects `<prefix>blobs/...` in one bucket; markers `<prefix>pending/...`."""

    def __init__(
        self,
        location: S3Location,
        credentials: S3Credentials,
        endpoint: str | None = None,
        *,
        part_size: int = PART_SIZE,
        grace_s: float = SWEEP_GRACE_S,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ConfigError(f"S3 part size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        self.bucket = location.bucket
        self.prefix = location.prefix
        self.endpoint = endpoint
        self.part_size = part_size
        self.grace_s = grace_s
        self.description = f"s3://{self.bucket}/{self.prefix}" + (
            f" at {endpoint}" if endpoint else ""
        )
        self._credentials = credentials
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "blob store not open"
        return self._client

    def name(self, key: str) -> str:
        return self.prefix + key

    async def open(self) -> None:
        from aiobotocore.config import AioConfig

        c = self._credentials
        config = AioConfig(
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            # Only what S3 requires: other S3-compatible stores reject the newer defaults.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        self._client = await self._stack.enter_async_context(
            botocore_session().create_client(
                "s3",
                region_name=c.region,
                endpoint_url=self.endpoint,
                aws_access_key_id=c.access_key_id,
                aws_secret_access_key=c.secret_access_key,
                aws_session_token=c.session_token,
                config=config,
            )
        )

    async def close(self) -> None:
        self._client = None
        await self._stack.aclose()

    @contextlib.asynccontextmanager
    async def errors(self, what: str, key: str) -> AsyncIterator[None]:
        """Store failures as BlobStoreError: one sentence naming the bucket and key."""
        try:
            yield
        except BlobStoreError:
            raise
        except Exception as exc:
            status = s3_status(exc)
            if status is None:
                raise
            where = f"s3://{self.bucket}/{self.name(key)}"
            if status is Status.UNAVAILABLE:
                reason = f"the object store at {self.endpoint or 'AWS S3'} is unavailable"
            else:
                reason = "the object store refused it"
            detail = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
            raise BlobStoreError(status, f"could not {what} {where}: {reason} ({detail})") from None

    async def put(self, key: str, body: bytes) -> None:
        async with self.errors("write", key):
            await self.client.put_object(Bucket=self.bucket, Key=self.name(key), Body=body)

    async def forget(self, marker: str) -> None:
        """Delete a marker; a failure only leaves work for the sweep."""
        try:
            async with self.errors("delete the marker", marker):
                await self.client.delete_object(Bucket=self.bucket, Key=self.name(marker))
        except BlobStoreError as exc:
            log.warning("%s; the sweep will remove it", exc.message)

    async def begin(self, org_id: str) -> BlobWriter:
        writer = S3BlobWriter(self, org_id)
        await writer.mark()
        return writer

    async def read(self, key: str) -> bytes:
        check_key(key)
        async with self.errors("read", key):
            got = await self.client.get_object(Bucket=self.bucket, Key=self.name(key))
            async with got["Body"] as body:
                data: bytes = await body.read()
        return data

    async def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            check_key(key)
        for key in keys:
            async with self.errors("delete", key):
                await self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    async def _listed(self, prefix: str) -> list[tuple[str, float]]:
        """(key below our prefix, last-modified time) of up to SWEEP_MAX_ITEMS objects."""
        out: list[tuple[str, float]] = []
        async with self.errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.name(prefix)
            )
            async for page in pages:
                for obj in page.get("Contents", []):
                    out.append((obj["Key"][len(self.prefix) :], obj["LastModified"].timestamp()))
                if len(out) >= SWEEP_MAX_ITEMS:
                    break
        return out[:SWEEP_MAX_ITEMS]

    async def _uploads(self) -> list[tuple[str, str, float]]:
        """(key below our prefix, upload id, initiated) of multipart uploads in progress."""
        out: list[tuple[str, str, float]] = []
        async with self.errors("list multipart uploads under", "blobs/"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self.name("blobs/")
            )
            async for page in pages:
                for up in page.get("Uploads", []):
                    out.append(
                        (up["Key"][len(self.prefix) :], up["UploadId"], up["Initiated"].timestamp())
                    )
                if len(out) >= SWEEP_MAX_ITEMS:
                    break
        return out[:SWEEP_MAX_ITEMS]

    async def sweep(self, indexed: Indexed, grace_s: float | None = None) -> Swept:
        cutoff = time.time() - (self.grace_s if grace_s is None else grace_s)
        live: set[str] = set()
        stale: dict[str, str] = {}  # blob key -> marker
        for marker, modified in await self._listed("pending/"):
            key = key_of_marker(marker)
            if key is None:
                continue  # not ours: leave it
            if modified <= cutoff:
                stale[key] = marker
            else:
                live.add(key)
        known = await indexed([k.rsplit("/", 1)[1] for k in stale]) if stale else set()
        blobs = multipart = 0
        for key, marker in stale.items():
            if key.rsplit("/", 1)[1] not in known:
                await self.delete([key])
                blobs += 1
            await self.forget(marker)
        for key, upload_id, initiated in await self._uploads():
            if key in live or initiated > cutoff:
                continue
            async with self.errors("abort the multipart upload of", key):
                await self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.name(key), UploadId=upload_id
                )
            multipart += 1
        return Swept(blobs=blobs, markers=len(stale), multipart_uploads=multipart)


def open_s3_store(url: str, endpoint: str | None, env: Mapping[str, str]) -> S3BlobStore:
    """The store for `--blobs url --s3-endpoint endpoint`, credentials from `env`."""
    location = parse_s3_url(url)
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError(f"--s3-endpoint {endpoint!r} is not an http(s):// URL")
    return S3BlobStore(location, credentials_from_env(env), endpoint)
