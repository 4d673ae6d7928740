"""The PostgreSQL index (`edged ingest --database postgresql://...`): the same rows as
the SQLite index, shared by any number of `edged ingest` replicas.

Promised:
- one catalog: the catalog's and the store's SQL (SQLite's dialect) runs here through
  `pg_sql`, a pure translation table-tested in tests/test_pg.py, so both backends answer
  alike (tests/test_storage_contract.py runs every behaviour on both);
- an item id retried against another replica is stored once: the unique index on
  `uploads(org_id, item_id)` decides, inside the storing transaction (READ COMMITTED: a
  concurrent first upload is waited for, then its ids are returned);
- paging tokens are (capture time, rowid) from one sequence, valid on every replica;
- readings are partitioned by capture time, one partition per UTC month from 2000 to
  2100 (created on demand, at most 1200) plus one below and one above, so a caller's
  clock cannot make us create tables without bound; retention (retention.py) drops them;
- the schema is versioned (`edged_schema`) and migrated at start (or by `edged ingest
  migrate`, replicas then `--no-migrate`) under an advisory lock, so replicas starting
  at once migrate it once; a schema newer than the code is refused, never written;
- passwords: from the URL or libpq's environment (PGPASSWORD, ~/.pgpass); `redact` is
  the only form of the URL we print.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import pq

from edged.errors import ConfigError
from edged.ingest.auth import SharedToken
from edged.ingest.catalog import Conn, Rows, Unstorable
from edged.ingest.retention import Expired
from edged.ingest.storage import (
    BINARIES_COLUMNS_DDL,
    READING_COLUMNS,
    READINGS_COLUMNS_DDL,
    UPLOADS_COLUMNS_DDL,
    json_rows,
    schema_problem,
)

_T = TypeVar("_T")

# -- pure: dialect, partitions, URLs ---------------------------------------------------------

_JSON_EACH = re.compile(r"json_each\(([^()]*)\)")


def pg_sql(sql: str) -> str:
    """SQLite's SQL as PostgreSQL runs it: `?` placeholders as psycopg's `%s` (literal `%`
    doubled), `INSERT OR IGNORE` as `ON CONFLICT DO NOTHING`, `json_each(x)` as
    jsonb_array_elements_text with a `value` column. Only our own statements come here;
    none has a `?` or `%` inside a string literal."""
    out = sql.replace("%", "%%").replace("?", "%s")
    if out.lstrip().upper().startswith("INSERT OR IGNORE INTO"):
        out = out.replace("INSERT OR IGNORE INTO", "INSERT INTO", 1) + " ON CONFLICT DO NOTHING"
    return _JSON_EACH.sub(r"jsonb_array_elements_text((\1)::jsonb) AS je(value)", out)


_PG_TYPES = {"INTEGER": "BIGINT", "BLOB": "BYTEA", "REAL": "DOUBLE PRECISION"}
_SQLITE_TYPE = re.compile(r"\b(" + "|".join(_PG_TYPES) + r")\b")


def pg_columns(columns: str) -> str:
    """Column declarations in SQLite's type names (storage.py) with PostgreSQL's: 64-bit
    integers, bytea, double precision (text collation is the migration's)."""
    return _SQLITE_TYPE.sub(lambda m: _PG_TYPES[m.group(1)], columns)


_NS = 1_000_000_000
FIRST_YEAR, END_YEAR = 2000, 2100  # monthly partitions cover [FIRST_YEAR, END_YEAR)
_LOW = int(datetime(FIRST_YEAR, 1, 1, tzinfo=UTC).timestamp()) * _NS
_HIGH = int(datetime(END_YEAR, 1, 1, tzinfo=UTC).timestamp()) * _NS
_MONTHLY = re.compile(r"^readings_y(\d{4})m(\d{2})$")


def _month_start_ns(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp()) * _NS


def month_partition(captured_ns: int) -> tuple[str, int, int] | None:
    """(table name, lower bound, upper bound) of the monthly partition holding a capture
    time; None outside [2000, 2100), which the two fixed outer partitions hold."""
    if not _LOW <= captured_ns < _HIGH:
        return None
    when = datetime.fromtimestamp(captured_ns // _NS, tz=UTC)
    nxt = (when.year + 1, 1) if when.month == 12 else (when.year, when.month + 1)
    return (
        f"readings_y{when.year:04d}m{when.month:02d}",
        _month_start_ns(when.year, when.month),
        _month_start_ns(*nxt),
    )


def partition_end_ns(name: str) -> int | None:
    """Upper bound of a monthly partition named by `month_partition`; None for others."""
    m = _MONTHLY.match(name)
    if m is None:
        return None
    year, month = int(m.group(1)), int(m.group(2))
    return _month_start_ns(*((year + 1, 1) if month == 12 else (year, month + 1)))


def redact(url: str) -> str:
    """The database URL without its password, for logs and banners."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- schema -----------------------------------------------------------------------------------

# Advisory lock keys (any int64, fixed): schema migration, partition creation/retention.
_MIGRATE_LOCK = 0x6564676564_01
_PARTITION_LOCK = 0x6564676564_02

# Text columns compare bytewise ("C"), as SQLite does, whatever the database's locale:
# ORDER BY tag, label, id gives the same order on both backends.
_V1 = f"""
CREATE TABLE uploads(
{pg_columns(UPLOADS_COLUMNS_DDL)}
);
CREATE UNIQUE INDEX uploads_item ON uploads(org_id, item_id) WHERE item_id IS NOT NULL;
CREATE SEQUENCE readings_rowid_seq;
CREATE TABLE readings(
    rowid BIGINT NOT NULL DEFAULT nextval('readings_rowid_seq'),
{pg_columns(READINGS_COLUMNS_DDL)},
    PRIMARY KEY (time_captured_ns, rowid)
) PARTITION BY RANGE (time_captured_ns);
CREATE TABLE readings_before PARTITION OF readings FOR VALUES FROM (MINVALUE) TO ({_LOW});
CREATE TABLE readings_after PARTITION OF readings FOR VALUES FROM ({_HIGH}) TO (MAXVALUE);
CREATE INDEX readings_org_time ON readings(org_id, time_captured_ns, rowid);
CREATE INDEX readings_org_component ON readings(org_id, component_name, time_captured_ns, rowid);
CREATE INDEX readings_org_part ON readings(org_id, part_id, time_captured_ns, rowid);
CREATE TABLE binaries(
    rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
{pg_columns(BINARIES_COLUMNS_DDL)}
);
CREATE INDEX binaries_org_time ON binaries(org_id, time_captured_ns, rowid);
CREATE INDEX binaries_org_component ON binaries(org_id, component_name, time_captured_ns, rowid);
CREATE INDEX binaries_file_id ON binaries(file_id);
CREATE TABLE binary_tags(
    binary_data_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    PRIMARY KEY (binary_data_id, tag)
);
CREATE INDEX binary_tags_tag ON binary_tags(tag, binary_data_id);
CREATE TABLE datasets(
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_on BIGINT NOT NULL
);
CREATE UNIQUE INDEX datasets_org_name ON datasets(org_id, name);
CREATE TABLE dataset_members(
    dataset_id TEXT NOT NULL,
    binary_data_id TEXT NOT NULL,
    PRIMARY KEY (dataset_id, binary_data_id)
);
CREATE INDEX dataset_members_binary ON dataset_members(binary_data_id);
CREATE TABLE database_users(
    org_id TEXT PRIMARY KEY,
    salt BYTEA NOT NULL,
    password_hash BYTEA NOT NULL,
    updated_at_ns BIGINT NOT NULL
);
CREATE TABLE bboxes(
    rowid BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id TEXT NOT NULL,
    binary_data_id TEXT NOT NULL,
    label TEXT NOT NULL,
    x_min DOUBLE PRECISION NOT NULL,
    y_min DOUBLE PRECISION NOT NULL,
    x_max DOUBLE PRECISION NOT NULL,
    y_max DOUBLE PRECISION NOT NULL,
    confidence DOUBLE PRECISION,
    PRIMARY KEY (binary_data_id, id)
);
CREATE INDEX bboxes_label ON bboxes(label, binary_data_id);
""".replace(" TEXT", ' TEXT COLLATE "C"')

# Bearer tokens every replica accepts (auth.SharedTokens): digests only, never tokens.
_V2 = """
CREATE TABLE auth_tokens(
    digest BYTEA PRIMARY KEY,
    key_id TEXT COLLATE "C" NOT NULL,
    key_digest BYTEA NOT NULL,
    expires_at_ns BIGINT NOT NULL
);
CREATE INDEX auth_tokens_key ON auth_tokens(key_id, expires_at_ns);
CREATE INDEX auth_tokens_expiry ON auth_tokens(expires_at_ns);
"""


def _iso(col: str) -> str:
    """ns since the epoch as the SQLite view's text: ISO-8601 UTC, microseconds, 'Z'."""
    return (
        f"to_char(timestamp '1970-01-01' + floor({col} / 1000.0)::bigint"
        f" * interval '1 microsecond', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    )


# What TabularDataBySQL sees (pgsql.py): the SQLite view's columns over `readings`, read
# with the caller's role (security_invoker), so the row-level policies apply.
_V3 = f"""
CREATE SCHEMA edged_sql;
CREATE VIEW edged_sql.readings WITH (security_invoker = true) AS SELECT
    org_id AS organization_id, location_id, robot_id, robot_name, part_id, part_name,
    component_type, component_name, method_name,
    {_iso("time_requested_ns")} AS time_requested,
    {_iso("time_received_ns")} AS time_received,
    tags::json AS tags, data::json AS data
FROM public.readings;
ALTER TABLE public.readings ENABLE ROW LEVEL SECURITY;
CREATE TABLE edged_sql_secret(k BYTEA NOT NULL);
"""

# Version n is reached by running MIGRATIONS[n - 1]; append, never edit a shipped step.
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The version the database is at; 0 before the first migration (nothing created)."""
    if conn.execute("SELECT to_regclass('edged_schema')").fetchone() == (None,):
        return 0
    row = conn.execute("SELECT max(version) FROM edged_schema").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(conn: psycopg.Connection[Any], url: str = "") -> int:
    """Bring the database to SCHEMA_VERSION (autocommit connection); the version found.
    The advisory lock makes replicas that start together migrate one after another."""
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATE_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS edged_schema(version INTEGER NOT NULL)")
        found = schema_version(conn)
        _refuse(url, found, migrating=True)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            with conn.transaction():
                conn.execute(MIGRATIONS[version - 1])
                conn.execute("INSERT INTO edged_schema(version) VALUES (%s)", (version,))
        return found
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATE_LOCK,))


def _refuse(url: str, found: int, *, migrating: bool) -> None:
    shown = redact(url) if url else "URL"
    problem = schema_problem(
        f"--database {shown}" if url else "the database",
        found,
        code=SCHEMA_VERSION,
        migrating=migrating,
        command=f"edged ingest migrate --database {shown}",
    )
    if problem:
        raise ConfigError(problem)


def upgrade(url: str, *, apply: bool) -> tuple[int, int]:
    """(version found, version now), migrated when `apply` (`edged ingest migrate`);
    ConfigError for a database we cannot reach or one newer than this edged."""
    with _connected(url) as conn:
        if apply:
            return migrate(conn, url), SCHEMA_VERSION
        found = schema_version(conn)
        _refuse(url, found, migrating=True)
        return found, found


def _open_schema(url: str, *, migrating: bool) -> None:
    with _connected(url) as conn:
        if migrating:
            migrate(conn, url)
        else:
            _refuse(url, schema_version(conn), migrating=False)


@contextlib.contextmanager
def _connected(url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection; one we cannot open is a ConfigError naming the URL (redacted)."""
    try:
        conn = connect(url)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--database {redact(url)}: cannot connect ({first})") from None
    with conn:
        yield conn


# -- connections ------------------------------------------------------------------------------


class PgConn:
    """A psycopg connection as the catalog's `Conn`: same SQL text, PostgreSQL's dialect."""

    IntegrityError: type[Exception] = psycopg.errors.IntegrityError

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Rows:
        params = tuple(parameters)
        _check_text(params)
        return self.raw.execute(pg_sql(sql), params)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Rows:
        cur = self.raw.cursor()
        params = [tuple(p) for p in seq_of_parameters]
        for p in params:
            _check_text(p)
        if params:
            cur.executemany(pg_sql(sql), params)
        return cur


def _check_text(params: Sequence[Any]) -> None:
    """Unstorable for a NUL in a text value (an id, a tag): the caller's input, not a
    fault of ours; uploads are checked before this (validate.py) with the field named."""
    for value in params:
        if isinstance(value, str) and "\x00" in value:
            raise Unstorable(f"{value!r} contains a NUL character (U+0000)")


class _Pool:
    """Idle autocommit connections for worker threads (at most `size` kept); a connection
    that is closed or left inside a transaction is dropped, never reused."""

    def __init__(self, url: str, size: int) -> None:
        self._url = url
        self._size = size
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> psycopg.Connection[Any]:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return connect(self._url)

    def put(self, conn: psycopg.Connection[Any]) -> None:
        healthy = not conn.closed and conn.info.transaction_status == pq.TransactionStatus.IDLE
        with self._lock:
            if healthy and not self._closed and len(self._idle) < self._size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, application_name="edged-ingest")


class PgIndex:
    """Reads in REPEATABLE READ, READ ONLY transactions (one snapshot per call); writes in
    READ COMMITTED transactions, concurrent with each other (no process-wide lock: other
    replicas write too, and PostgreSQL's row locks and constraints arbitrate)."""

    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self._url = url
        self._pool = _Pool(url, pool_size)
        self._inflight: set[asyncio.Future[Any]] = set()
        self.url = url
        self.org_passwords: dict[str, str] = {}  # organisation roles set up (pgsql.py)

    def borrow(self) -> psycopg.Connection[Any]:
        """A pooled connection for a worker thread; `give_back` it when done."""
        return self._pool.get()

    def give_back(self, conn: psycopg.Connection[Any]) -> None:
        self._pool.put(conn)

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True) -> PgIndex:
        """Connect and migrate (or, with `migrate=False`, refuse a schema other than the
        code's); a database we cannot reach is a ConfigError naming it."""

        await asyncio.to_thread(_open_schema, url, migrating=migrate)
        return cls(url)

    async def close(self) -> None:
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        self._pool.close()

    async def read(self, fn: Callable[[Conn], _T], executor: Executor | None = None) -> _T:
        if executor is None:
            return await asyncio.to_thread(self._read, fn)
        return await asyncio.get_running_loop().run_in_executor(executor, self._read, fn)

    def _read(self, fn: Callable[[Conn], _T]) -> _T:
        conn = self._pool.get()
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return fn(PgConn(conn))
        finally:
            self._pool.put(conn)

    async def write(self, fn: Callable[[Conn], _T]) -> _T:
        """Shielded like SQLite's: a cancelled caller's transaction still commits or rolls
        back in its thread, and `close` waits for it."""
        fut = asyncio.ensure_future(asyncio.to_thread(self._write, fn))
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)
        return await asyncio.shield(fut)

    def _write(self, fn: Callable[[Conn], _T]) -> _T:
        conn = self._pool.get()
        try:
            with conn.transaction():
                return fn(PgConn(conn))
        finally:
            self._pool.put(conn)

    # -- readings partitions ----------------------------------------------------------------

    async def prepare_readings(self, captured_ns: Sequence[int]) -> None:
        """Create the monthly partitions these capture times need (usually none)."""
        wanted = {p for p in map(month_partition, captured_ns) if p is not None}
        if not wanted:
            return

        def missing(conn: Conn) -> list[str]:
            names = sorted(name for name, _, _ in wanted)
            rows = conn.execute(
                "SELECT n FROM unnest(?::text[]) AS n WHERE to_regclass(n) IS NULL", (names,)
            ).fetchall()
            return [r[0] for r in rows]

        todo = set(await self.read(missing))
        if todo:
            await self.write(lambda c: _create_partitions(c, [p for p in wanted if p[0] in todo]))

    def insert_readings(self, conn: Conn, rows: Sequence[tuple[Any, ...]]) -> None:
        """COPY: one round trip for the batch, however many readings it holds."""
        assert isinstance(conn, PgConn)
        with conn.raw.cursor().copy(f"COPY readings ({READING_COLUMNS}) FROM STDIN") as copy:
            for row in json_rows(rows):
                copy.write_row(row)

    async def drop_readings_before(self, cutoff_ns: int) -> list[str]:
        """Retention: drop the monthly partitions that end at or before `cutoff_ns` (whole
        months only; readings of a month still partly inside the window stay)."""
        return (await self.write(lambda c: _drop_partitions(c, cutoff_ns)))[0]

    async def expire_readings(self, cutoff_ns: int) -> Expired:
        """Whole months (`drop_readings_before`), and the rows captured before 2000 once
        the cutoff is past it: the fixed partition below the months ends there."""
        dropped, rows = await self.write(lambda c: _drop_partitions(c, cutoff_ns))
        return Expired(readings=rows, partitions=len(dropped))


def _create_partitions(conn: Conn, parts: Iterable[tuple[str, int, int]]) -> None:
    """Under the partition lock, so two replicas do not race on one name. A table made
    LIKE the parent and then attached takes only a SHARE UPDATE EXCLUSIVE lock on
    `readings` (CREATE ... PARTITION OF would block every reader for the moment)."""
    conn.execute("SET LOCAL lock_timeout = '10s'")
    conn.execute("SELECT pg_advisory_xact_lock(?)", (_PARTITION_LOCK,))
    for name, low, high in parts:
        if conn.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None:
            continue
        conn.execute(f"CREATE TABLE {name} (LIKE readings INCLUDING DEFAULTS)")
        conn.execute(
            f"ALTER TABLE readings ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})"
        )


def _drop_partitions(conn: Conn, cutoff_ns: int) -> tuple[list[str], int]:
    """(partitions dropped, readings they and `readings_before` held)."""
    conn.execute("SET LOCAL lock_timeout = '10s'")
    conn.execute("SELECT pg_advisory_xact_lock(?)", (_PARTITION_LOCK,))
    names = [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'readings'::regclass ORDER BY c.relname"
        )
    ]
    dropped = [n for n in names if (end := partition_end_ns(n)) is not None and end <= cutoff_ns]
    rows = conn.execute("DELETE FROM readings_before").rowcount if cutoff_ns >= _LOW else 0
    # Counted before the first DETACH, which locks `readings` until the commit.
    for name in dropped:
        rows += int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
    for name in dropped:
        conn.execute(f"ALTER TABLE readings DETACH PARTITION {name}")
        conn.execute(f"DROP TABLE {name}")
    return dropped, rows


class PgTokens:
    """auth.SharedTokens in the index's database. A key keeps at most `keep` live tokens
    across all replicas (the oldest go), so the table is bounded by keys x keep."""

    def __init__(self, index: PgIndex) -> None:
        self._index = index

    async def publish(self, token: SharedToken, keep: int, now_ns: int) -> None:
        def put(conn: Conn) -> None:
            conn.execute("DELETE FROM auth_tokens WHERE expires_at_ns < ?", (now_ns,))
            conn.execute(
                "INSERT INTO auth_tokens(digest, key_id, key_digest, expires_at_ns)"
                " VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                (token.digest, token.key_id, token.key_digest, token.expires_at_ns),
            )
            conn.execute(
                "DELETE FROM auth_tokens WHERE key_id = ? AND digest NOT IN (SELECT digest"
                " FROM auth_tokens WHERE key_id = ? ORDER BY expires_at_ns DESC LIMIT ?)",
                (token.key_id, token.key_id, keep),
            )

        await self._index.write(put)

    async def lookup(self, digest: bytes, now_ns: int) -> SharedToken | None:
        row = await self._index.read(
            lambda c: c.execute(
                "SELECT key_id, key_digest, expires_at_ns FROM auth_tokens"
                " WHERE digest = ? AND expires_at_ns > ?",
                (digest, now_ns),
            ).fetchone()
        )
        return SharedToken(digest, str(row[0]), bytes(row[1]), int(row[2])) if row else None
