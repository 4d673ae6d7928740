"""What `edged ingest` keeps: a SQLite index plus a blob directory.

Tabular readings are rows (one per reading, data as JSON so SQL can reach into it);
binary readings and files are blobs written to a temp name, fsync'd, renamed, and only
then indexed, so an acknowledged upload survives a power cut and a crash leaves at
worst an orphaned temp file, never an index row without its bytes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiosqlite
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.durable import fsync_dir

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads(
    upload_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    item_id TEXT,
    kind TEXT NOT NULL,
    file_id TEXT NOT NULL,
    binary_data_id TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS uploads_item ON uploads(org_id, item_id)
    WHERE item_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS readings(
    id INTEGER PRIMARY KEY,
    upload_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    location_id TEXT NOT NULL DEFAULT '',
    robot_id TEXT NOT NULL DEFAULT '',
    robot_name TEXT NOT NULL DEFAULT '',
    part_name TEXT NOT NULL DEFAULT '',
    part_id TEXT NOT NULL,
    component_type TEXT NOT NULL,
    component_name TEXT NOT NULL,
    method_name TEXT NOT NULL,
    method_parameters TEXT NOT NULL,
    tags TEXT NOT NULL,
    dataset_ids TEXT NOT NULL,
    time_requested_ns INTEGER,
    time_received_ns INTEGER,
    data TEXT NOT NULL,
    received_at_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS binaries(
    binary_data_id TEXT PRIMARY KEY,
    file_id TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    part_id TEXT NOT NULL,
    component_type TEXT NOT NULL,
    component_name TEXT NOT NULL,
    method_name TEXT NOT NULL,
    method_parameters TEXT NOT NULL,
    file_name TEXT NOT NULL,
    file_extension TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    tags TEXT NOT NULL,
    dataset_ids TEXT NOT NULL,
    time_requested_ns INTEGER,
    time_received_ns INTEGER,
    annotations BLOB,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    blob_path TEXT NOT NULL,
    received_at_ns INTEGER NOT NULL
);
"""

KIND_TABULAR = "tabular"
KIND_BINARY = "binary"
KIND_FILE = "file"


@dataclass(frozen=True)
class UploadIds:
    file_id: str
    binary_data_id: str


@dataclass(frozen=True)
class StoredReading:
    part_id: str
    component_type: str
    component_name: str
    method_name: str
    tags: list[str]
    dataset_ids: list[str]
    time_requested_ns: int | None
    time_received_ns: int | None
    data: dict[str, Any]
    upload_id: str


@dataclass(frozen=True)
class StoredBinary:
    binary_data_id: str
    file_id: str
    kind: str
    part_id: str
    component_type: str
    component_name: str
    method_name: str
    file_name: str
    file_extension: str
    mime_type: str
    tags: list[str]
    dataset_ids: list[str]
    time_requested_ns: int | None
    time_received_ns: int | None
    size: int
    sha256: str
    path: Path


def ts_ns(msg: Any, field: str) -> int | None:
    """Timestamp field as integer nanoseconds, None when the sender left it unset."""
    if not msg.HasField(field):
        return None
    ts: Timestamp = getattr(msg, field)
    return ts.seconds * 1_000_000_000 + ts.nanos


def _params_json(params: Any) -> str:
    out: dict[str, Any] = {}
    for key, value in params.items():
        assert isinstance(value, AnyPb)
        try:
            out[key] = json_format.MessageToDict(value)
        except (json_format.Error, TypeError, KeyError):
            out[key] = {"@type": value.type_url, "value": base64.b64encode(value.value).decode()}
    return json.dumps(out, sort_keys=True)


class BlobWriter:
    """A blob being received: bytes go to a private temp file until `commit`."""

    def __init__(self, tmp_dir: Path) -> None:
        self.path = tmp_dir / f"{uuid.uuid4().hex}.part"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._sha.update(chunk)
        self.size += len(chunk)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    async def sync_and_close(self) -> None:
        def _sync() -> None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

        await asyncio.to_thread(_sync)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class IngestStore:
    """Single-connection store; a lock keeps each upload's transaction whole."""

    def __init__(self, root: Path, db: aiosqlite.Connection) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "blobs" / ".tmp"
        self._db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, root: Path, *, synchronous: str = "FULL") -> IngestStore:
        for d in (root, root / "blobs", root / "blobs" / ".tmp"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in (root / "blobs" / ".tmp").glob("*.part"):
            leftover.unlink()  # an upload cut short before it was acknowledged
        db = await aiosqlite.connect(root / "ingest.sqlite3", isolation_level=None)
        os.chmod(root / "ingest.sqlite3", 0o600)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={synchronous}")
        await db.executescript(SCHEMA)
        return cls(root, db)

    async def close(self) -> None:
        await self._db.close()

    def new_blob(self) -> BlobWriter:
        return BlobWriter(self.tmp_dir)

    async def find_upload(self, org_id: str, item_id: str | None) -> UploadIds | None:
        if not item_id:
            return None
        async with self._db.execute(
            "SELECT file_id, binary_data_id FROM uploads WHERE org_id=? AND item_id=?",
            (org_id, item_id),
        ) as cur:
            row = await cur.fetchone()
        return UploadIds(row[0], row[1]) if row else None

    async def _claim(self, org_id: str, item_id: str | None, kind: str, ids: UploadIds) -> bool:
        """Record the upload inside the open transaction; False if the item id is a repeat."""
        cur = await self._db.execute(
            "INSERT INTO uploads(upload_id, org_id, item_id, kind, file_id, binary_data_id,"
            " created_at_ns) VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
            (
                ids.file_id,
                org_id,
                item_id or None,
                kind,
                ids.file_id,
                ids.binary_data_id,
                time.time_ns(),
            ),
        )
        return cur.rowcount == 1

    async def store_tabular(
        self,
        org_id: str,
        item_id: str | None,
        meta: pb.UploadMetadata,
        readings: Sequence[pb.SensorData],
    ) -> UploadIds:
        ids = UploadIds(file_id=uuid.uuid4().hex, binary_data_id="")
        now = time.time_ns()
        common = (
            ids.file_id,
            org_id,
            meta.part_id,
            meta.component_type,
            meta.component_name,
            meta.method_name,
            _params_json(meta.method_parameters),
            json.dumps(list(meta.tags)),
            json.dumps(list(meta.dataset_ids)),
        )
        rows = [
            (
                *common,
                ts_ns(r.metadata, "time_requested"),
                ts_ns(r.metadata, "time_received"),
                json.dumps(json_format.MessageToDict(r.struct)),
                now,
            )
            for r in readings
        ]
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                if not await self._claim(org_id, item_id, KIND_TABULAR, ids):
                    await self._db.execute("ROLLBACK")
                    found = await self.find_upload(org_id, item_id)
                    assert found is not None
                    return found
                await self._db.executemany(
                    "INSERT INTO readings(upload_id, org_id, part_id, component_type,"
                    " component_name, method_name, method_parameters, tags, dataset_ids,"
                    " time_requested_ns, time_received_ns, data, received_at_ns)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
        return ids

    async def store_blob(
        self,
        org_id: str,
        item_id: str | None,
        kind: str,
        meta: pb.UploadMetadata,
        sensor: pb.SensorMetadata | None,
        blob: BlobWriter,
        mime_type: str,
    ) -> UploadIds:
        """Make the blob durable under its final name, then index it in one transaction."""
        file_id = uuid.uuid4().hex
        ids = UploadIds(file_id=file_id, binary_data_id=file_id)
        await blob.sync_and_close()
        final_dir = self.blob_dir / file_id[:2]
        final_dir.mkdir(exist_ok=True, mode=0o700)
        final = final_dir / file_id
        os.replace(blob.path, final)
        await asyncio.to_thread(fsync_dir, final_dir)
        row = (
            ids.binary_data_id,
            ids.file_id,
            ids.file_id,
            org_id,
            kind,
            meta.part_id,
            meta.component_type,
            meta.component_name,
            meta.method_name,
            _params_json(meta.method_parameters),
            meta.file_name,
            meta.file_extension,
            mime_type,
            json.dumps(list(meta.tags)),
            json.dumps(list(meta.dataset_ids)),
            ts_ns(sensor, "time_requested") if sensor else None,
            ts_ns(sensor, "time_received") if sensor else None,
            sensor.annotations.SerializeToString() if sensor else None,
            blob.size,
            blob.sha256,
            str(final.relative_to(self.root)),
            time.time_ns(),
        )
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                if not await self._claim(org_id, item_id, kind, ids):
                    await self._db.execute("ROLLBACK")
                    final.unlink(missing_ok=True)
                    found = await self.find_upload(org_id, item_id)
                    assert found is not None
                    return found
                await self._db.execute(
                    "INSERT INTO binaries(binary_data_id, file_id, upload_id, org_id, kind,"
                    " part_id, component_type, component_name, method_name, method_parameters,"
                    " file_name, file_extension, mime_type, tags, dataset_ids,"
                    " time_requested_ns, time_received_ns, annotations, size, sha256,"
                    " blob_path, received_at_ns)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                final.unlink(missing_ok=True)
                raise
        return ids

    async def readings(self, org_id: str | None = None) -> list[StoredReading]:
        """Every stored reading in arrival order (tests and, later, the query API)."""
        sql = (
            "SELECT part_id, component_type, component_name, method_name, tags, dataset_ids,"
            " time_requested_ns, time_received_ns, data, upload_id FROM readings"
        )
        args: tuple[str, ...] = ()
        if org_id is not None:
            sql, args = sql + " WHERE org_id=?", (org_id,)
        async with self._db.execute(sql + " ORDER BY id", args) as cur:
            rows = await cur.fetchall()
        return [
            StoredReading(
                r[0],
                r[1],
                r[2],
                r[3],
                json.loads(r[4]),
                json.loads(r[5]),
                r[6],
                r[7],
                json.loads(r[8]),
                r[9],
            )
            for r in rows
        ]

    async def binaries(self, org_id: str | None = None) -> list[StoredBinary]:
        sql = (
            "SELECT binary_data_id, file_id, kind, part_id, component_type, component_name,"
            " method_name, file_name, file_extension, mime_type, tags, dataset_ids,"
            " time_requested_ns, time_received_ns, size, sha256, blob_path FROM binaries"
        )
        args: tuple[str, ...] = ()
        if org_id is not None:
            sql, args = sql + " WHERE org_id=?", (org_id,)
        async with self._db.execute(sql + " ORDER BY received_at_ns", args) as cur:
            rows = await cur.fetchall()
        return [
            StoredBinary(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                r[7],
                r[8],
                r[9],
                json.loads(r[10]),
                json.loads(r[11]),
                r[12],
                r[13],
                r[14],
                r[15],
                self.root / r[16],
            )
            for r in rows
        ]

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for table in ("uploads", "readings", "binaries"):
            async with self._db.execute(f"SELECT count(*) FROM {table}") as cur:
                row = await cur.fetchone()
            out[table] = int(row[0]) if row else 0
        return out
