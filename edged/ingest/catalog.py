"""The query API's SQL: synchronous functions over one DB-API connection (`Conn`).

`IngestStore.read` runs the readers on a read-only snapshot in a worker thread;
`IngestStore.write` runs the mutators inside one transaction. The SQL is SQLite's; the
PostgreSQL index (`pg.py`) runs the same text through a pure dialect translation, so
there is one catalog for both backends. Nothing here
knows about gRPC: lookups of ids outside the caller's organisation raise `NotFound`
naming the id, exactly as ids that never existed (no existence leak across orgs).

Organisation scoping lives in three places, one per way a row is reached:
- by filter: every `Where` comes from `filters`, whose builder starts with the org;
- by binary id: every function taking binary ids takes the org and passes the ids
  through `check_binaries` first (tags, boxes and memberships have no org column: they
  belong to their binary's org);
- by dataset id: every function taking a dataset id goes through `get_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

from edged.ingest.filters import BINARIES, READINGS, Cursor, Where, page_clause
from edged.ingest.values import BYTES_ONLY, as_stored

_CHUNK = 500  # ids per IN (...) list, far below SQLite's variable limit


class NotFound(LookupError):
    """An id the caller's organisation does not have; the message names it."""


class Unstorable(ValueError):
    """A value the index cannot hold or look up (PostgreSQL text has no NUL)."""


class Conflict(ValueError):
    """A write that a unique constraint refused (e.g. a dataset name taken in the org)."""


class Rows(Protocol):
    """What the catalog reads from a statement: sqlite3's and psycopg's cursors both fit."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """One connection inside one transaction; DB-API exceptions as attributes (PEP 249's
    optional extension), so the catalog can tell a unique violation from other faults."""

    @property
    def IntegrityError(self) -> type[Exception]: ...  # PEP 249's name
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Rows: ...
    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Rows: ...


@dataclass(frozen=True)
class Capture:
    """What captured a row, as readings and binaries both store it (one column each;
    `method_parameters` as JSON): the row's CaptureMetadata less tags and MIME type."""

    org_id: str
    location_id: str
    robot_name: str
    robot_id: str
    part_name: str
    part_id: str
    component_type: str
    component_name: str
    method_name: str
    method_parameters: str


_CAPTURE_COLS = (
    "org_id, location_id, robot_name, robot_id, part_name, part_id, component_type,"
    " component_name, method_name, method_parameters"
)
_CAPTURE_WIDTH = len(fields(Capture))


@dataclass(frozen=True)
class ReadingRow:
    rowid: int
    time_captured_ns: int
    capture: Capture
    tags: str
    time_requested_ns: int | None
    time_received_ns: int | None
    data: str
    data_exact: bytes | None  # see edged/ingest/values.py


_READING_COLS = (
    f"rowid, time_captured_ns, {_CAPTURE_COLS}, tags, time_requested_ns, time_received_ns,"
    " data, data_exact"
)


@dataclass
class BinaryRow:
    rowid: int
    time_captured_ns: int
    capture: Capture
    binary_data_id: str
    file_id: str
    file_name: str
    file_extension: str
    mime_type: str
    time_requested_ns: int | None
    time_received_ns: int | None
    annotations: bytes | None
    size: int
    blob_path: str
    tags: list[str] = field(default_factory=list)
    bboxes: list[tuple[str, str, float, float, float, float, float | None]] = field(
        default_factory=list
    )
    dataset_ids: list[str] = field(default_factory=list)


_BINARY_COLS = (
    f"rowid, time_captured_ns, {_CAPTURE_COLS}, binary_data_id, file_id, file_name,"
    " file_extension, mime_type, time_requested_ns, time_received_ns, annotations, size,"
    " blob_path"
)

_Row = TypeVar("_Row")


def _row(make: Callable[..., _Row], r: Sequence[Any]) -> _Row:
    """A row selected as `rowid, time_captured_ns, <_CAPTURE_COLS>, <the rest>`."""
    end = 2 + _CAPTURE_WIDTH
    return make(r[0], r[1], Capture(*r[2:end]), *r[end:])


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _one(conn: Conn, sql: str, params: Sequence[Any], missing: str) -> Any:
    """The row `sql` finds, else NotFound(`missing`): the same for an id that never
    existed as for one in another organisation."""
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise NotFound(missing)
    return row


# -- readers --------------------------------------------------------------------------------


def _page(
    make: Callable[..., _Row],
    table: str,
    cols: str,
    conn: Conn,
    where: Where,
    order: int,
    cursor: Cursor | None,
    limit: int,
) -> list[_Row]:
    """One page of `table`'s rows that match `where`, in `order` from after `cursor`."""
    extra, extra_params, order_by = page_clause(table, order, cursor)
    sql = f"SELECT {cols} FROM {table} WHERE {where.sql}"
    if extra:
        sql += f" AND {extra}"
    sql += f" ORDER BY {order_by} LIMIT ?"
    rows = conn.execute(sql, (*where.params, *extra_params, limit)).fetchall()
    return [_row(make, r) for r in rows]


def page_readings(
    conn: Conn, where: Where, order: int, cursor: Cursor | None, limit: int
) -> list[ReadingRow]:
    return _page(_stored_reading, READINGS, _READING_COLS, conn, where, order, cursor, limit)


def _stored_reading(*fields: Any) -> ReadingRow:
    """A ReadingRow; data kept as Struct bytes reads as its JSON form (values.as_stored)."""
    stored: tuple[Any, ...] = as_stored(fields[-2], fields[-1])
    return ReadingRow(*fields[:-2], *stored)


def count_readings(conn: Conn, where: Where) -> tuple[int, int]:
    """(matching readings, their data size in bytes as stored JSON). A row kept as Struct
    bytes (values.BYTES_ONLY) counts its JSON's length, as when the JSON was stored."""
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(length(data)), 0) FROM readings WHERE {where.sql}",
        where.params,
    ).fetchone()
    size = int(row[1])
    bytes_only = conn.execute(
        f"SELECT data_exact FROM readings WHERE ({where.sql}) AND data = ?"
        " AND data_exact IS NOT NULL",
        (*where.params, BYTES_ONLY),
    )
    for (exact,) in bytes_only:
        size += len(as_stored(BYTES_ONLY, exact)[0]) - len(BYTES_ONLY)
    return int(row[0]), size


def page_binaries(
    conn: Conn, where: Where, order: int, cursor: Cursor | None, limit: int
) -> list[BinaryRow]:
    rows = _page(BinaryRow, BINARIES, _BINARY_COLS, conn, where, order, cursor, limit)
    _enrich(conn, rows)
    return rows


def count_binaries(conn: Conn, where: Where) -> tuple[int, int]:
    """(matching binaries, their total size in bytes)."""
    row = conn.execute(
        f"SELECT count(*), coalesce(sum(size), 0) FROM binaries WHERE {where.sql}", where.params
    ).fetchone()
    return int(row[0]), int(row[1])


def binaries_by_ids(conn: Conn, org_id: str, ids: Sequence[str]) -> list[BinaryRow]:
    """Rows in the order asked (repeats once); NotFound for any id outside the org."""
    wanted = list(dict.fromkeys(ids))
    found: dict[str, BinaryRow] = {}
    for part in _chunks(wanted):
        sql = (
            f"SELECT {_BINARY_COLS} FROM binaries WHERE org_id = ?"
            f" AND binary_data_id IN ({_marks(len(part))})"
        )
        for r in conn.execute(sql, (org_id, *part)):
            row = _row(BinaryRow, r)
            found[row.binary_data_id] = row
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFound(f"binary data id {missing[0]!r} not found")
    rows = [found[i] for i in wanted]
    _enrich(conn, rows)
    return rows


def resolve_file_ids(conn: Conn, org_id: str, file_ids: Sequence[str]) -> list[str]:
    """Legacy BinaryID.file_id -> binary_data_id within the org; NotFound otherwise."""
    out: list[str] = []
    for file_id in file_ids:
        row = _one(
            conn,
            "SELECT binary_data_id FROM binaries WHERE org_id = ? AND file_id = ?",
            (org_id, file_id),
            f"binary id with file_id {file_id!r} not found",
        )
        out.append(str(row[0]))
    return out


def check_binaries(conn: Conn, org_id: str, ids: Iterable[str]) -> list[str]:
    """The ids (repeats once) if every one is binary data of the org, else NotFound
    naming the first that is not: the one gate for every id-taking mutator below."""
    wanted = list(dict.fromkeys(ids))
    have: set[str] = set()
    for part in _chunks(wanted):
        sql = (
            f"SELECT binary_data_id FROM binaries WHERE org_id = ?"
            f" AND binary_data_id IN ({_marks(len(part))})"
        )
        have.update(r[0] for r in conn.execute(sql, (org_id, *part)))
    for i in wanted:
        if i not in have:
            raise NotFound(f"binary data id {i!r} not found")
    return wanted


def _enrich(conn: Conn, rows: list[BinaryRow]) -> None:
    """Attach live tags, boxes and dataset memberships to a page of rows."""
    by_id = {r.binary_data_id: r for r in rows}
    ids = list(by_id)
    for part in _chunks(ids):
        marks = _marks(len(part))
        for bid, tag in conn.execute(
            f"SELECT binary_data_id, tag FROM binary_tags WHERE binary_data_id IN ({marks})"
            " ORDER BY binary_data_id, tag",
            part,
        ):
            by_id[bid].tags.append(tag)
        for bid, *box in conn.execute(
            f"SELECT binary_data_id, id, label, x_min, y_min, x_max, y_max, confidence"
            f" FROM bboxes WHERE binary_data_id IN ({marks}) ORDER BY binary_data_id, rowid",
            part,
        ):
            by_id[bid].bboxes.append(tuple(box))
        for bid, ds in conn.execute(
            f"SELECT binary_data_id, dataset_id FROM dataset_members"
            f" WHERE binary_data_id IN ({marks}) ORDER BY binary_data_id, dataset_id",
            part,
        ):
            by_id[bid].dataset_ids.append(ds)


def tags_where(conn: Conn, where: Where) -> list[str]:
    sql = (
        "SELECT DISTINCT tag FROM binary_tags WHERE binary_data_id IN"
        f" (SELECT binary_data_id FROM binaries WHERE {where.sql}) ORDER BY tag"
    )
    return [r[0] for r in conn.execute(sql, where.params)]


def labels_where(conn: Conn, where: Where) -> list[str]:
    sql = (
        "SELECT DISTINCT label FROM bboxes WHERE binary_data_id IN"
        f" (SELECT binary_data_id FROM binaries WHERE {where.sql}) ORDER BY label"
    )
    return [r[0] for r in conn.execute(sql, where.params)]


# -- curation (inside IngestStore.write) ---------------------------------------------------


def add_tags(conn: Conn, org_id: str, ids: Iterable[str], tags: Sequence[str]) -> None:
    ids = check_binaries(conn, org_id, ids)
    conn.executemany(
        "INSERT OR IGNORE INTO binary_tags(binary_data_id, tag) VALUES (?, ?)",
        [(i, t) for i in ids for t in tags],
    )


def remove_tags(conn: Conn, org_id: str, ids: Iterable[str], tags: Sequence[str]) -> int:
    removed = 0
    for part in _chunks(check_binaries(conn, org_id, ids)):
        cur = conn.execute(
            f"DELETE FROM binary_tags WHERE binary_data_id IN ({_marks(len(part))})"
            f" AND tag IN ({_marks(len(tags))})",
            (*part, *tags),
        )
        removed += cur.rowcount
    return removed


def add_tags_where(conn: Conn, where: Where, tags: Sequence[str]) -> None:
    for tag in tags:
        conn.execute(
            "INSERT OR IGNORE INTO binary_tags(binary_data_id, tag)"
            f" SELECT binary_data_id, ? FROM binaries WHERE {where.sql}",
            (tag, *where.params),
        )


def remove_tags_where(conn: Conn, where: Where, tags: Sequence[str]) -> int:
    cur = conn.execute(
        f"DELETE FROM binary_tags WHERE tag IN ({_marks(len(tags))}) AND binary_data_id IN"
        f" (SELECT binary_data_id FROM binaries WHERE {where.sql})",
        (*tags, *where.params),
    )
    return cur.rowcount


def add_bbox(
    conn: Conn,
    org_id: str,
    binary_data_id: str,
    label: str,
    box: tuple[float, float, float, float],
    confidence: float | None,
) -> str:
    check_binaries(conn, org_id, [binary_data_id])
    bbox_id = uuid.uuid4().hex
    conn.execute(
        "INSERT INTO bboxes(id, binary_data_id, label, x_min, y_min, x_max, y_max, confidence)"
        " VALUES (?,?,?,?,?,?,?,?)",
        (bbox_id, binary_data_id, label, *box, confidence),
    )
    return bbox_id


def remove_bbox(conn: Conn, org_id: str, binary_data_id: str, bbox_id: str) -> None:
    check_binaries(conn, org_id, [binary_data_id])
    cur = conn.execute(
        "DELETE FROM bboxes WHERE id = ? AND binary_data_id = ?", (bbox_id, binary_data_id)
    )
    if cur.rowcount == 0:
        raise NotFound(f"bbox_id {bbox_id!r} not found on binary data {binary_data_id!r}")


def _delete_binary_rows(conn: Conn, ids: Sequence[str]) -> None:
    for part in _chunks(list(ids)):
        marks = _marks(len(part))
        for table in ("binary_tags", "bboxes", "dataset_members", "binaries"):
            conn.execute(f"DELETE FROM {table} WHERE binary_data_id IN ({marks})", part)


def delete_binaries(conn: Conn, org_id: str, ids: Sequence[str]) -> list[str]:
    """Delete the rows; return the blob paths (relative to the store root) to unlink."""
    ids = check_binaries(conn, org_id, ids)
    paths: list[str] = []
    for part in _chunks(ids):
        paths += [
            r[0]
            for r in conn.execute(
                f"SELECT blob_path FROM binaries WHERE org_id = ?"
                f" AND binary_data_id IN ({_marks(len(part))})",
                (org_id, *part),
            )
        ]
    _delete_binary_rows(conn, ids)
    return paths


def delete_binaries_where(conn: Conn, where: Where) -> list[str]:
    rows = conn.execute(
        f"SELECT binary_data_id, blob_path FROM binaries WHERE {where.sql}", where.params
    ).fetchall()
    _delete_binary_rows(conn, [r[0] for r in rows])
    return [r[1] for r in rows]


def delete_readings_where(conn: Conn, where: Where) -> int:
    return conn.execute(f"DELETE FROM readings WHERE {where.sql}", where.params).rowcount


# -- datasets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetRow:
    id: str
    org_id: str
    name: str
    created_on_ns: int


def create_dataset(conn: Conn, org_id: str, name: str) -> str:
    """A new dataset id; Conflict if the org has the name already."""
    dataset_id = uuid.uuid4().hex
    try:
        conn.execute(
            "INSERT INTO datasets(id, org_id, name, created_on) VALUES (?,?,?,?)",
            (dataset_id, org_id, name, time.time_ns()),
        )
    except conn.IntegrityError:
        raise Conflict(f"a dataset named {name!r} already exists") from None
    return dataset_id


def get_dataset(conn: Conn, org_id: str, dataset_id: str) -> DatasetRow:
    row = _one(
        conn,
        "SELECT id, org_id, name, created_on FROM datasets WHERE id = ? AND org_id = ?",
        (dataset_id, org_id),
        f"dataset id {dataset_id!r} not found",
    )
    return DatasetRow(*row)


def list_datasets(conn: Conn, org_id: str) -> list[DatasetRow]:
    rows = conn.execute(
        "SELECT id, org_id, name, created_on FROM datasets WHERE org_id = ?"
        " ORDER BY created_on, id",
        (org_id,),
    )
    return [DatasetRow(*r) for r in rows]


def check_datasets(conn: Conn, org_id: str, dataset_ids: Iterable[str]) -> None:
    """NotFound naming the first non-empty id that is not a dataset of the org (uploads:
    an empty id names no dataset and is skipped, as the upload path always did)."""
    for dataset_id in dict.fromkeys(d for d in dataset_ids if d):
        get_dataset(conn, org_id, dataset_id)


def rename_dataset(conn: Conn, org_id: str, dataset_id: str, name: str) -> None:
    get_dataset(conn, org_id, dataset_id)
    try:
        conn.execute(
            "UPDATE datasets SET name = ? WHERE id = ? AND org_id = ?", (name, dataset_id, org_id)
        )
    except conn.IntegrityError:
        raise Conflict(f"a dataset named {name!r} already exists") from None


def delete_dataset(conn: Conn, org_id: str, dataset_id: str) -> None:
    get_dataset(conn, org_id, dataset_id)
    conn.execute("DELETE FROM dataset_members WHERE dataset_id = ?", (dataset_id,))
    conn.execute("DELETE FROM datasets WHERE id = ? AND org_id = ?", (dataset_id, org_id))


def add_members(conn: Conn, org_id: str, dataset_id: str, ids: Iterable[str]) -> None:
    get_dataset(conn, org_id, dataset_id)
    conn.executemany(
        "INSERT OR IGNORE INTO dataset_members(dataset_id, binary_data_id) VALUES (?,?)",
        [(dataset_id, i) for i in check_binaries(conn, org_id, ids)],
    )


def remove_members(conn: Conn, org_id: str, dataset_id: str, ids: Iterable[str]) -> None:
    get_dataset(conn, org_id, dataset_id)
    conn.executemany(
        "DELETE FROM dataset_members WHERE dataset_id = ? AND binary_data_id = ?",
        [(dataset_id, i) for i in check_binaries(conn, org_id, ids)],
    )


# -- database users -------------------------------------------------------------------------

_SCRYPT: dict[str, Any] = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def hash_password(password: str, salt: bytes) -> bytes:
    """scrypt: slow on purpose, so a copied index does not give the password away."""
    return hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)


def new_password_hash(password: str) -> tuple[bytes, bytes]:
    """(salt, hash) for a password; run it outside the write lock, it takes ~50 ms."""
    salt = secrets.token_bytes(16)
    return salt, hash_password(password, salt)


def set_database_user(conn: Conn, org_id: str, salted: tuple[bytes, bytes]) -> None:
    conn.execute(
        "INSERT INTO database_users(org_id, salt, password_hash, updated_at_ns) VALUES (?,?,?,?)"
        " ON CONFLICT(org_id) DO UPDATE SET salt = excluded.salt,"
        " password_hash = excluded.password_hash, updated_at_ns = excluded.updated_at_ns",
        (org_id, *salted, time.time_ns()),
    )


def has_database_user(conn: Conn, org_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM database_users WHERE org_id = ?", (org_id,)).fetchone()
    return row is not None


def params_dict(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
