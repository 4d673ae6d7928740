"""What `edged ingest` keeps: an index (SQLite or PostgreSQL) plus a blob store (blobs.py).

Tabular readings are rows (one per reading; SQLite keeps the Struct's bytes, which SQL
reads as strict JSON through values.DATA_SQL, PostgreSQL strict JSON with the exact
Struct beside it for NaN; see values.py);
binary readings and files are blobs made durable in the blob store (a directory or a
bucket) and only then indexed, so an acknowledged upload survives a power cut and a
crash leaves at worst an orphan the blob store's sweep removes, never an index row
without its bytes.

The query API adds curation state beside the upload rows: live tags (`binary_tags`,
seeded from the upload's tags; `binaries.tags` stays "as uploaded"), bounding boxes
(`bboxes`, seeded from upload annotations; ids unique per binary), datasets and their
members (seeded from the upload's dataset_ids, each of which must be a dataset of the
uploader's organisation), and database users. `time_captured_ns` (time requested, else
received, else arrival) is the one sort and interval key, indexed per organisation.
Queries read through their own read-only connection in a worker thread (`read`);
curation writes go through `write`, serialised with uploads by the store's lock.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import operator
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.errors import ConfigError
from edged.ingest import catalog, retention
from edged.ingest.blobs import BlobStore, BlobWriter, LocalBlobStore
from edged.ingest.catalog import Conn
from edged.ingest.retention import Expired
from edged.ingest.values import BYTES_ONLY, decode_python, stored_json
from edged.rows import SharedInsert

# Bounding-box ids are chosen by the uploader (annotations) or by us (AddBoundingBox) and
# are unique per binary, never across binaries: one organisation's id cannot collide with
# (or be dropped for) another's. Templated so the migration builds the same table.
_BBOXES = """
CREATE TABLE IF NOT EXISTS {name}(
    id TEXT NOT NULL,
    binary_data_id TEXT NOT NULL,
    label TEXT NOT NULL,
    x_min REAL NOT NULL,
    y_min REAL NOT NULL,
    x_max REAL NOT NULL,
    y_max REAL NOT NULL,
    confidence REAL,
    PRIMARY KEY (binary_data_id, id)
);
"""
_BBOX_COLS = "id, binary_data_id, label, x_min, y_min, x_max, y_max, confidence"

# Columns added after the first release of the schema: ALTERed into an older index.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("readings", "location_id", "TEXT NOT NULL DEFAULT ''"),
    ("readings", "robot_id", "TEXT NOT NULL DEFAULT ''"),
    ("readings", "robot_name", "TEXT NOT NULL DEFAULT ''"),
    ("readings", "part_name", "TEXT NOT NULL DEFAULT ''"),
    ("readings", "time_captured_ns", "INTEGER NOT NULL DEFAULT 0"),
    ("readings", "data_exact", "BLOB"),
    ("binaries", "location_id", "TEXT NOT NULL DEFAULT ''"),
    ("binaries", "robot_id", "TEXT NOT NULL DEFAULT ''"),
    ("binaries", "robot_name", "TEXT NOT NULL DEFAULT ''"),
    ("binaries", "part_name", "TEXT NOT NULL DEFAULT ''"),
    ("binaries", "time_captured_ns", "INTEGER NOT NULL DEFAULT 0"),
)

# The upload tables' columns, declared once (SQLite's type names): SQLite's SCHEMA takes
# them through `_as_added`, pg.py's migration through `pg_columns`; each backend puts its
# own row key in front. Every insert names time_captured_ns.
UPLOADS_COLUMNS_DDL = """\
    upload_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    item_id TEXT,
    kind TEXT NOT NULL,
    file_id TEXT NOT NULL,
    binary_data_id TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL"""
READINGS_COLUMNS_DDL = """\
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
    received_at_ns INTEGER NOT NULL,
    time_captured_ns INTEGER NOT NULL,
    data_exact BLOB"""
BINARIES_COLUMNS_DDL = """\
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
    received_at_ns INTEGER NOT NULL,
    location_id TEXT NOT NULL DEFAULT '',
    robot_id TEXT NOT NULL DEFAULT '',
    robot_name TEXT NOT NULL DEFAULT '',
    part_name TEXT NOT NULL DEFAULT '',
    time_captured_ns INTEGER NOT NULL"""


def _as_added(table: str, columns: str) -> str:
    """`columns` with each column of ADDED_COLUMNS declared as its ALTER adds it (with the
    DEFAULT an ALTER needs), so a new SQLite index and a migrated one agree."""
    added = {column: decl for t, column, decl in ADDED_COLUMNS if t == table}
    lines = []
    for line in columns.split(",\n"):
        name = line.split()[0]
        lines.append(f"    {name} {added[name]}" if name in added else line)
    return ",\n".join(lines)


SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS uploads(
{uploads}
);
CREATE UNIQUE INDEX IF NOT EXISTS uploads_item ON uploads(org_id, item_id)
    WHERE item_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS readings(
    id INTEGER PRIMARY KEY,
{readings}
);
CREATE TABLE IF NOT EXISTS binaries(
{binaries}
);
CREATE TABLE IF NOT EXISTS binary_tags(
    binary_data_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (binary_data_id, tag)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS datasets(
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_on INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_members(
    dataset_id TEXT NOT NULL,
    binary_data_id TEXT NOT NULL,
    PRIMARY KEY (dataset_id, binary_data_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS database_users(
    org_id TEXT PRIMARY KEY,
    salt BLOB NOT NULL,
    password_hash BLOB NOT NULL,
    updated_at_ns INTEGER NOT NULL
);
""".format(
        uploads=UPLOADS_COLUMNS_DDL,
        readings=_as_added("readings", READINGS_COLUMNS_DDL),
        binaries=_as_added("binaries", BINARIES_COLUMNS_DDL),
    )
    + _BBOXES.format(name="bboxes")
)

CAPTURED = "coalesce(time_requested_ns, time_received_ns, received_at_ns)"

# Every filter is scoped to one organisation and pages in (time_captured_ns, rowid) order;
# the implicit rowid suffix of each index serves the tie-break without a sort.
INDEXES = """
CREATE INDEX IF NOT EXISTS readings_org_time ON readings(org_id, time_captured_ns);
CREATE INDEX IF NOT EXISTS readings_org_component
    ON readings(org_id, component_name, time_captured_ns);
CREATE INDEX IF NOT EXISTS readings_org_part ON readings(org_id, part_id, time_captured_ns);
CREATE INDEX IF NOT EXISTS binaries_org_time ON binaries(org_id, time_captured_ns);
CREATE INDEX IF NOT EXISTS binaries_org_component
    ON binaries(org_id, component_name, time_captured_ns);
CREATE INDEX IF NOT EXISTS binaries_file_id ON binaries(file_id);
CREATE INDEX IF NOT EXISTS binary_tags_tag ON binary_tags(tag, binary_data_id);
CREATE INDEX IF NOT EXISTS bboxes_binary ON bboxes(binary_data_id);
CREATE INDEX IF NOT EXISTS bboxes_label ON bboxes(label, binary_data_id);
CREATE UNIQUE INDEX IF NOT EXISTS datasets_org_name ON datasets(org_id, name);
CREATE INDEX IF NOT EXISTS dataset_members_binary ON dataset_members(binary_data_id);
"""

_T = TypeVar("_T")
RAW_ANY_KEY = "@edged_bytes"  # a stored method parameter kept as bytes (see any_json)


# PRAGMA user_version of an index whose bbox ids are per binary and whose dataset
# memberships never cross organisations (0: an index from before both rules); 2: new
# readings may hold their Struct bytes alone (values.BYTES_ONLY), which an edged before
# it would misread in SQL. Older rows stay as they are: readers take both forms.
SCHEMA_VERSION = 2


def migrate(db: sqlite3.Connection) -> None:
    """Add columns an older index lacks (backfilling the capture time), bring it to
    SCHEMA_VERSION in one transaction, then indexes."""
    for table, column, decl in ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            if column == "time_captured_ns":
                db.execute(f"UPDATE {table} SET time_captured_ns = {CAPTURED}")
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found < SCHEMA_VERSION:
        db.execute("BEGIN IMMEDIATE")
        try:
            if found < 1:
                _rekey_bboxes(db)
                _drop_cross_org_members(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    db.executescript(INDEXES)


def _rekey_bboxes(db: sqlite3.Connection) -> None:
    """An older index keyed boxes by id alone (one global namespace): rebuild it keyed
    by (binary, id), keeping rowids so boxes stay in the order they were added."""
    pk = {row[1]: row[5] for row in db.execute("PRAGMA table_info(bboxes)")}
    if pk.get("binary_data_id"):
        return
    db.execute(_BBOXES.format(name="bboxes_per_binary"))
    db.execute(
        f"INSERT INTO bboxes_per_binary(rowid, {_BBOX_COLS}) SELECT rowid, {_BBOX_COLS} FROM bboxes"
    )
    db.execute("DROP TABLE bboxes")
    db.execute("ALTER TABLE bboxes_per_binary RENAME TO bboxes")


def _drop_cross_org_members(db: sqlite3.Connection) -> None:
    """Uploads used to join whatever dataset id they named, another organisation's too;
    such memberships go (ids that name no dataset at all link nothing and stay)."""
    db.execute(
        "DELETE FROM dataset_members WHERE EXISTS (SELECT 1 FROM datasets d"
        " WHERE d.id = dataset_members.dataset_id) AND NOT EXISTS (SELECT 1 FROM datasets d"
        " JOIN binaries b ON b.org_id = d.org_id WHERE d.id = dataset_members.dataset_id"
        " AND b.binary_data_id = dataset_members.binary_data_id)"
    )


INDEX_FILE = "ingest.sqlite3"  # under --data
KIND_TABULAR = "tabular"
KIND_BINARY = "binary"
KIND_FILE = "file"


@dataclass(frozen=True)
class UploadIds:
    file_id: str
    binary_data_id: str


# (org_id, item_id, metadata, readings): what one tabular upload stores.
TabularUpload: TypeAlias = tuple[str, str | None, pb.UploadMetadata, Sequence[pb.SensorData]]


@dataclass(frozen=True)
class TabularWrite:
    """A tabular upload ready to store: called inside a write transaction, it answers
    `ids` when it stored the rows, the first upload's ids when the item id repeats.
    `nbytes`: the readings' encoded size (the stored-bytes metric)."""

    ids: UploadIds
    store: Callable[[Conn], UploadIds]
    nbytes: int = 0

    def __call__(self, conn: Conn) -> UploadIds:
        return self.store(conn)


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


def _captured(requested: int | None, received: int | None, arrived: int) -> int:
    """The capture time queries sort and filter by: requested, else received, else arrival."""
    if requested is not None:
        return requested
    return received if received is not None else arrived


def schema_problem(
    where: str, found: int, *, code: int, migrating: bool, command: str
) -> str | None:
    """Why this edged cannot use an index at schema version `found` (None: it can). A newer
    one is never touched (this code would misread it); an older one is migrated at start
    unless the operator turned that off (`--no-migrate`), then `command` upgrades it."""
    if found > code:
        return (
            f"{where} is at schema version {found}, newer than this edged's {code}; upgrade"
            " edged (an older edged never writes to a newer schema)"
        )
    if found < code and not migrating:
        return (
            f"{where} is at schema version {found}, older than this edged's {code}, and"
            f" --no-migrate is set; run `{command}` first"
        )
    return None


def sqlite_version(path: Path) -> int:
    """The index file's PRAGMA user_version; 0 for no file yet (nothing is created)."""
    if not path.exists():
        return 0
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def upgrade_sqlite(path: Path, *, apply: bool) -> tuple[int, int]:
    """(version found, version now) of the index at `path`, migrated when `apply`
    (`edged ingest migrate --data`); ConfigError for one newer than this edged."""
    found = sqlite_version(path)
    _refuse_sqlite(path, found, migrating=True)
    if not apply:
        return found, found
    _prepare(path)
    return found, SCHEMA_VERSION


def _open_sqlite(path: Path, *, migrate: bool) -> None:
    if migrate:
        upgrade_sqlite(path, apply=True)
    else:
        _refuse_sqlite(path, sqlite_version(path), migrating=False)


def _refuse_sqlite(path: Path, found: int, *, migrating: bool) -> None:
    command = f"edged ingest migrate --data {path.parent}"
    where = f"the index {path}"
    problem = schema_problem(
        where, found, code=SCHEMA_VERSION, migrating=migrating, command=command
    )
    if problem:
        raise ConfigError(problem)


def _prepare(path: Path) -> None:
    """Create or upgrade the index (plain sqlite3: ALTERs and backfills run in one go)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        os.chmod(path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        migrate(db)
    finally:
        db.close()


def _params_json(params: Any) -> str:
    out: dict[str, Any] = {}
    for key, value in params.items():
        assert isinstance(value, AnyPb)
        out[key] = any_json(value)
    return json.dumps(out, sort_keys=True)


def any_json(value: AnyPb) -> dict[str, Any]:
    """An Any as json_format's JSON when that reads back to the same bytes; otherwise its
    type URL and raw bytes under `RAW_ANY_KEY` (NaN in a Value, an unknown type, corrupt
    bytes: all valid on the wire), so storing never fails and never loses a parameter."""
    try:
        as_json = json_format.MessageToDict(value)
        back = AnyPb()
        json_format.ParseDict(as_json, back)
    except Exception:  # json_format raises ValueError, TypeError, DecodeError, ... on them
        back = None
    if back is not None and back == value:
        return dict(as_json)
    return {"@type": value.type_url, RAW_ANY_KEY: base64.b64encode(value.value).decode()}


READING_COLUMNS = (
    "upload_id, org_id, location_id, part_id, component_type, component_name, method_name,"
    " method_parameters, tags, dataset_ids, time_requested_ns, time_received_ns, data,"
    " data_exact, received_at_ns, time_captured_ns"
)
_DATA_AT = 12  # `data` in READING_COLUMNS; `data_exact` follows


def json_rows(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows of `READING_COLUMNS` with each reading's JSON written out, for an index that
    queries `data` as JSON itself (PostgreSQL's jsonb)."""
    at = _DATA_AT
    return [
        (*row[:at], *stored_json(row[at + 1]), *row[at + 2 :]) if row[at] == BYTES_ONLY else row
        for row in rows
    ]


class Index(Protocol):
    """Where the rows live: `SqliteIndex` (embedded default, `--data DIR`) or
    `pg.PgIndex` (`--database postgresql://...`). Both run the catalog's synchronous
    functions on a `Conn` in a worker thread; tests/test_storage_contract.py holds them to
    one behaviour."""

    dialect: str  # "sqlite" | "postgresql"

    async def read(self, fn: Callable[[Conn], _T], executor: Executor | None = None) -> _T:
        """`fn` on one read-only snapshot."""
        ...

    async def write(self, fn: Callable[[Conn], _T]) -> _T:
        """`fn` in one transaction; runs to its end even if the caller is cancelled."""
        ...

    async def prepare_readings(self, captured_ns: Sequence[int]) -> None:
        """Whatever must exist before readings with these capture times are inserted."""
        ...

    def insert_readings(self, conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert rows of `READING_COLUMNS` inside `write`'s transaction. Each reading
        comes as its Struct bytes (`data` = values.BYTES_ONLY, `data_exact`): SQLite
        keeps them so, PostgreSQL writes the JSON out (`json_rows`)."""
        ...

    async def expire_readings(self, cutoff_ns: int) -> Expired:
        """Retention (retention.py): remove readings captured before `cutoff_ns`."""
        ...

    async def close(self) -> None:
        """Wait for writes in flight, then release connections."""
        ...


_COLUMN_NAMES = tuple(c.strip() for c in READING_COLUMNS.split(","))
# Columns every reading of one upload shares (its metadata, the BYTES_ONLY marker, the
# arrival time) and the ones each reading has of its own.
_OWN = ("time_requested_ns", "time_received_ns", "data_exact", "time_captured_ns")
_SHARED_AT = tuple(i for i, c in enumerate(_COLUMN_NAMES) if c not in _OWN)
_shared = operator.itemgetter(*_SHARED_AT)
_own = operator.itemgetter(*(i for i, c in enumerate(_COLUMN_NAMES) if c in _OWN))
_INSERT = SharedInsert("readings", _COLUMN_NAMES, tuple(_COLUMN_NAMES[i] for i in _SHARED_AT))
_INSERT_ONE = f"INSERT INTO readings({READING_COLUMNS}) VALUES ({','.join('?' * 16)})"


class SqliteIndex:
    """One SQLite file: reads on fresh read-only connections (WAL snapshots), writes on one
    connection serialised by a lock."""

    dialect = "sqlite"

    def __init__(self, db_path: Path, *, synchronous: str = "FULL") -> None:
        self.db_path = db_path
        self._lock = asyncio.Lock()
        self._synchronous = synchronous
        self._writer: sqlite3.Connection | None = None

    @classmethod
    async def open(
        cls, db_path: Path, *, synchronous: str = "FULL", migrate: bool = True
    ) -> SqliteIndex:
        await asyncio.to_thread(functools.partial(_open_sqlite, db_path, migrate=migrate))
        return cls(db_path, synchronous=synchronous)

    async def close(self) -> None:
        async with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    async def read(self, fn: Callable[[Conn], _T], executor: Executor | None = None) -> _T:
        if executor is None:
            return await asyncio.to_thread(self._read, fn)
        return await asyncio.get_running_loop().run_in_executor(executor, self._read, fn)

    def _read(self, fn: Callable[[Conn], _T]) -> _T:
        conn = sqlite3.connect(f"{self.db_path.as_uri()}?mode=ro", uri=True)
        try:
            conn.execute("BEGIN")  # one snapshot for every statement fn runs
            return fn(conn)
        finally:
            conn.close()

    async def write(self, fn: Callable[[Conn], _T]) -> _T:
        """Shielded: grpclib cancels a handler when its client gives up, but the thread runs
        its transaction to the end anyway, so the lock must stay held until it has."""
        return await asyncio.shield(asyncio.ensure_future(self._locked_write(fn)))

    async def _locked_write(self, fn: Callable[[Conn], _T]) -> _T:
        async with self._lock:
            return await asyncio.to_thread(self._write, fn)

    def _write(self, fn: Callable[[Conn], _T]) -> _T:
        if self._writer is None:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=10000")
            self._writer = conn
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def prepare_readings(self, captured_ns: Sequence[int]) -> None:
        return None

    def insert_readings(self, conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
        """One upload's readings in multi-row INSERTs, one statement per chunk
        (`edged.rows`): half the CPU of a statement per row, which bound all 16 values."""
        assert isinstance(conn, sqlite3.Connection)
        if not rows:
            return
        shared = _shared(rows[0])
        if all(_shared(r) == shared for r in rows):
            _INSERT.run(conn, shared, [_own(r) for r in rows])
        else:  # not one upload's readings: a statement per row
            conn.executemany(_INSERT_ONE, rows)

    async def expire_readings(self, cutoff_ns: int) -> Expired:
        """Per organisation (its time index finds the rows), `retention.BATCH` rows a
        transaction, at most `retention.MAX_BATCHES` transactions a run."""
        orgs = await self.read(
            lambda c: [str(r[0]) for r in c.execute("SELECT DISTINCT org_id FROM readings")]
        )

        def delete_some(conn: Conn, org: str) -> int:
            return conn.execute(
                "DELETE FROM readings WHERE id IN (SELECT id FROM readings"
                " WHERE org_id = ? AND time_captured_ns < ? LIMIT ?)",
                (org, cutoff_ns, retention.BATCH),
            ).rowcount

        deleted, batches = 0, 0
        for org in orgs:
            while batches < retention.MAX_BATCHES:
                batches += 1
                n = await self.write(functools.partial(delete_some, org=org))
                deleted += n
                if n < retention.BATCH:
                    break
        return Expired(readings=deleted)


class IngestStore:
    """The index (SQLite or PostgreSQL) plus the blob store; one API for the services."""

    def __init__(self, root: Path, index: Index, blobs: BlobStore | None = None) -> None:
        self.root = root
        self.blobs: BlobStore = blobs or LocalBlobStore(root)
        self.db_path = root / INDEX_FILE  # what the SQL/MQL engines read (SQLite only)
        self.index = index

    @classmethod
    async def open(
        cls,
        root: Path,
        *,
        synchronous: str = "FULL",
        database: str | None = None,
        blobs: BlobStore | None = None,
        migrate: bool = True,
    ) -> IngestStore:
        """`database` (a postgresql:// URL) puts the index in PostgreSQL; `blobs` (default:
        the data directory) holds the bytes; `migrate=False` (`--no-migrate`) refuses an
        index at another schema version instead of upgrading it."""
        root = root.absolute()  # SQLite URIs and blob paths must not follow a later chdir
        blobs = blobs or LocalBlobStore(root)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        await blobs.open()
        index: Index
        try:
            if database:
                from edged.ingest.pg import PgIndex

                index = await PgIndex.open(database, migrate=migrate)
            else:
                index = await SqliteIndex.open(
                    root / INDEX_FILE, synchronous=synchronous, migrate=migrate
                )
        except BaseException:
            await blobs.close()
            raise
        return cls(root, index, blobs)

    async def expire_readings(self, cutoff_ns: int) -> Expired:
        """Retention: readings captured before `cutoff_ns` go (retention.py)."""
        return await self.index.expire_readings(cutoff_ns)

    @staticmethod
    async def upgrade_schema(
        root: Path | None, database: str | None, *, apply: bool
    ) -> tuple[int, int, int]:
        """`edged ingest migrate`: (version found, version now, this edged's version) of
        the index in `database` or under `root`, upgraded when `apply`."""
        if database:
            from edged.ingest import pg

            found, now = await asyncio.to_thread(pg.upgrade, database, apply=apply)
            return found, now, pg.SCHEMA_VERSION
        assert root is not None
        if apply:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        found, now = await asyncio.to_thread(upgrade_sqlite, root / INDEX_FILE, apply=apply)
        return found, now, SCHEMA_VERSION

    @property
    def dialect(self) -> str:
        return self.index.dialect

    async def close(self) -> None:
        try:
            await self.index.close()
        finally:
            await self.blobs.close()

    # -- query-side access ----------------------------------------------------------------

    async def read(self, fn: Callable[[Conn], _T], executor: Executor | None = None) -> _T:
        """Run `fn` on a read-only snapshot in a worker thread; the query API passes its
        own pool so uploads never wait behind reads."""
        return await self.index.read(fn, executor)

    async def write(self, fn: Callable[[Conn], _T]) -> _T:
        """Run `fn` in one transaction in a worker thread (serialised with uploads on
        SQLite); shielded, so a cancelled caller's transaction still ends cleanly."""
        return await self.index.write(fn)

    # -- uploads --------------------------------------------------------------------------

    async def new_blob(self, org_id: str) -> BlobWriter:
        return await self.blobs.begin(org_id)

    async def indexed_file_ids(self, file_ids: list[str]) -> set[str]:
        """Which of these blob file ids have a row (the blob sweep asks about a few)."""

        def known(conn: Conn) -> set[str]:
            found: set[str] = set()
            for i in range(0, len(file_ids), 500):
                part = file_ids[i : i + 500]
                marks = ",".join("?" * len(part))
                found.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT binary_data_id FROM binaries WHERE binary_data_id IN ({marks})",
                        part,
                    )
                )
            return found

        return await self.read(known)

    async def find_upload(self, org_id: str, item_id: str | None) -> UploadIds | None:
        if not item_id:
            return None
        row = await self.read(
            lambda c: c.execute(
                "SELECT file_id, binary_data_id FROM uploads WHERE org_id=? AND item_id=?",
                (org_id, item_id),
            ).fetchone()
        )
        return UploadIds(row[0], row[1]) if row else None

    @staticmethod
    def _claim(
        conn: Conn, org_id: str, item_id: str | None, kind: str, ids: UploadIds
    ) -> UploadIds | None:
        """Record the upload inside the open transaction; the first upload's ids if the
        item id is a repeat (then the caller stores nothing)."""
        cur = conn.execute(
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
        if cur.rowcount == 1:
            return None
        row = conn.execute(
            "SELECT file_id, binary_data_id FROM uploads WHERE org_id=? AND item_id=?",
            (org_id, item_id),
        ).fetchone()
        return UploadIds(row[0], row[1])

    async def store_tabular(self, *upload: *TabularUpload, location_id: str = "") -> UploadIds:
        """One tabular upload in a transaction of its own (`tabular_writer`, then `write`)."""
        return await self.write(await self.tabular_writer(*upload, location_id=location_id))

    async def tabular_writer(self, *upload: *TabularUpload, location_id: str = "") -> TabularWrite:
        """The rows of one tabular upload, built now (and their partitions made ready),
        and the function that stores them inside a write transaction (`write`, or a group
        commit of several uploads)."""
        org_id, item_id, meta, readings = upload
        ids = UploadIds(file_id=uuid.uuid4().hex, binary_data_id="")
        now = time.time_ns()
        common = (
            ids.file_id,
            org_id,
            location_id,
            meta.part_id,
            meta.component_type,
            meta.component_name,
            meta.method_name,
            _params_json(meta.method_parameters),
            json.dumps(list(meta.tags)),
            json.dumps(list(meta.dataset_ids)),
        )
        rows = []
        nbytes = 0
        for r in readings:  # per reading: no JSON here, the Struct's bytes (values.py)
            md = r.metadata
            requested = ts_ns(md, "time_requested")
            received = ts_ns(md, "time_received")
            nbytes += r.ByteSize()  # in this loop, not one more over the readings
            rows.append(
                (
                    *common,
                    requested,
                    received,
                    BYTES_ONLY,
                    r.struct.SerializeToString(),
                    now,
                    _captured(requested, received, now),
                )
            )

        def store(conn: Conn) -> UploadIds:
            earlier = self._claim(conn, org_id, item_id, KIND_TABULAR, ids)
            if earlier is not None:
                return earlier
            catalog.check_datasets(conn, org_id, meta.dataset_ids)
            self.index.insert_readings(conn, rows)
            return ids

        await self.index.prepare_readings([r[-1] for r in rows])
        return TabularWrite(ids, store, nbytes)

    async def store_blob(
        self,
        org_id: str,
        item_id: str | None,
        kind: str,
        meta: pb.UploadMetadata,
        sensor: pb.SensorMetadata | None,
        blob: BlobWriter,
        mime_type: str,
        *,
        location_id: str = "",
    ) -> UploadIds:
        """Make the blob durable in the blob store, then index it in one transaction."""
        ids = UploadIds(file_id=blob.file_id, binary_data_id=blob.file_id)
        await blob.finish()
        now = time.time_ns()
        requested = ts_ns(sensor, "time_requested") if sensor else None
        received = ts_ns(sensor, "time_received") if sensor else None
        row = (
            ids.binary_data_id,
            ids.file_id,
            ids.file_id,
            org_id,
            location_id,
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
            requested,
            received,
            sensor.annotations.SerializeToString() if sensor else None,
            blob.size,
            blob.sha256,
            blob.key,
            now,
            _captured(requested, received, now),
        )
        bid = ids.binary_data_id
        tags = [(bid, t) for t in dict.fromkeys(meta.tags) if t]
        members = [(d, bid) for d in dict.fromkeys(meta.dataset_ids) if d]
        boxes = [
            (
                box.id or uuid.uuid4().hex,
                bid,
                box.label,
                box.x_min_normalized,
                box.y_min_normalized,
                box.x_max_normalized,
                box.y_max_normalized,
                box.confidence if box.HasField("confidence") else None,
            )
            for box in (sensor.annotations.bboxes if sensor else ())
        ]

        def store(conn: Conn) -> UploadIds:
            """Place the blob inside the transaction: a failure (or a repeat) removes it
            again, so no blob is left that the index does not know."""
            earlier = self._claim(conn, org_id, item_id, kind, ids)
            if earlier is not None:
                return earlier
            catalog.check_datasets(conn, org_id, meta.dataset_ids)
            blob.place()
            try:
                conn.execute(
                    "INSERT INTO binaries(binary_data_id, file_id, upload_id, org_id, location_id,"
                    " kind, part_id, component_type, component_name, method_name,"
                    " method_parameters, file_name, file_extension, mime_type, tags, dataset_ids,"
                    " time_requested_ns, time_received_ns, annotations, size, sha256,"
                    " blob_path, received_at_ns, time_captured_ns)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO binary_tags(binary_data_id, tag) VALUES (?,?)", tags
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO dataset_members(dataset_id, binary_data_id)"
                    " VALUES (?,?)",
                    members,
                )
                conn.executemany(  # ids were checked unique (validate.check_bbox_ids)
                    f"INSERT INTO bboxes({_BBOX_COLS}) VALUES (?,?,?,?,?,?,?,?)", boxes
                )
            except BaseException:
                blob.unplace()
                raise
            return ids

        try:
            stored = await self.write(store)
        except Exception:
            # The transaction failed (COMMIT included): nothing indexes this blob. A
            # cancelled caller is not this case: the shielded write may still commit.
            await blob.drop()
            raise
        if stored is ids:
            await blob.committed()
        return stored

    async def readings(self, org_id: str | None = None) -> list[StoredReading]:
        """Every stored reading in arrival order (tests and, later, the query API)."""
        sql = (
            "SELECT part_id, component_type, component_name, method_name, tags, dataset_ids,"
            " time_requested_ns, time_received_ns, data, upload_id, data_exact FROM readings"
        )
        args: tuple[str, ...] = ()
        if org_id is not None:
            sql, args = sql + " WHERE org_id=?", (org_id,)
        rows = await self.read(lambda c: c.execute(sql + " ORDER BY rowid", args).fetchall())

        def stored(r: Any) -> StoredReading:
            v = list(r[:10])  # the row's columns, the encoded ones decoded in place
            v[4:6] = map(json.loads, r[4:6])
            v[8] = decode_python(r[8], r[10])
            return StoredReading(*v)

        return [stored(r) for r in rows]

    async def binaries(self, org_id: str | None = None) -> list[StoredBinary]:
        sql = (
            "SELECT binary_data_id, file_id, kind, part_id, component_type, component_name,"
            " method_name, file_name, file_extension, mime_type, tags, dataset_ids,"
            " time_requested_ns, time_received_ns, size, sha256, blob_path FROM binaries"
        )
        args: tuple[str, ...] = ()
        if org_id is not None:
            sql, args = sql + " WHERE org_id=?", (org_id,)
        rows = await self.read(
            lambda c: c.execute(sql + " ORDER BY received_at_ns, rowid", args).fetchall()
        )

        def stored(r: Any) -> StoredBinary:
            v = list(r)  # the row's columns, the encoded ones decoded in place
            v[10:12] = map(json.loads, r[10:12])
            v[16] = self.root / r[16]
            return StoredBinary(*v)

        return [stored(r) for r in rows]

    async def counts(self) -> dict[str, int]:
        def count(conn: Conn) -> dict[str, int]:
            return {
                table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                for table in ("uploads", "readings", "binaries")
            }

        return await self.read(count)
