"""Read-only, organisation-scoped SQL over the ingest database (TabularDataBySQL).

The caller sees one table, `readings`: a TEMP VIEW over `main.readings` holding only
their organisation's rows. SQLite parses and plans; safety comes from layers that do
not trust each other: a read-only connection (`mode=ro` + `query_only`), a check that
the text starts like a SELECT, Python's one-statement rule, and an authorizer that
allows only SELECT/READ/FUNCTION and reads of `main.readings` only through a scope
view whose name is random per connection (a user CTE can borrow the name `readings`,
never an unguessable one). See docs/query-language.md.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edged.ingest.limits import LimitExceeded, QueryControl, QueryLimits
from edged.ingest.values import DATA_SQL, register_sql_functions

_DEFAULTS = QueryLimits()
DEFAULT_TIMEOUT_S = _DEFAULTS.timeout_s
MAX_VALUE_BYTES = _DEFAULTS.max_value_bytes  # SQLITE_LIMIT_LENGTH: caps randomblob/printf/...
MAX_QUERY_BYTES = 1024 * 1024
_PROGRESS_STEPS = 1_000  # VM instructions between deadline checks (a timer backs them up)

# (view column, expression over main.readings). Times are ISO-8601 UTC text with
# microseconds and 'Z' so they sort and compare as text; floor division keeps
# pre-1970 instants right.
_NS = 1_000_000_000


def _iso_sql(col: str) -> str:
    frac = f"((({col} % {_NS}) + {_NS}) % {_NS})"
    return (
        f"CASE WHEN {col} IS NULL THEN NULL ELSE"
        f" strftime('%Y-%m-%dT%H:%M:%S', ({col} - {frac}) / {_NS}, 'unixepoch')"
        f" || printf('.%06dZ', {frac} / 1000) END"
    )


VIEW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("organization_id", "org_id"),
    ("location_id", "location_id"),
    ("robot_id", "robot_id"),
    ("robot_name", "robot_name"),
    ("part_id", "part_id"),
    ("part_name", "part_name"),
    ("component_type", "component_type"),
    ("component_name", "component_name"),
    ("method_name", "method_name"),
    ("time_requested", _iso_sql("time_requested_ns")),
    ("time_received", _iso_sql("time_received_ns")),
    ("tags", "tags"),
    ("data", DATA_SQL),  # JSON text, also of rows stored as Struct bytes (values.py)
)

_ALLOWED_FIRST_WORDS = frozenset({"SELECT", "WITH", "VALUES"})
# Functions that touch files, load code or poke at internals; most are absent from the
# stdlib build, listed anyway in case a distribution's SQLite ships them.
_DENIED_FUNCTIONS = frozenset(
    {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "zipfile", "fsdir"}
)
_TABLE_FUNCTIONS = frozenset({"json_each", "json_tree"})
_ACTION_NAMES = {
    1: "CREATE INDEX",
    2: "CREATE TABLE",
    3: "CREATE TEMP INDEX",
    4: "CREATE TEMP TABLE",
    5: "CREATE TEMP TRIGGER",
    6: "CREATE TEMP VIEW",
    7: "CREATE TRIGGER",
    8: "CREATE VIEW",
    9: "DELETE",
    10: "DROP INDEX",
    11: "DROP TABLE",
    12: "DROP TEMP INDEX",
    13: "DROP TEMP TABLE",
    14: "DROP TEMP TRIGGER",
    15: "DROP TEMP VIEW",
    16: "DROP TRIGGER",
    17: "DROP VIEW",
    18: "INSERT",
    19: "PRAGMA",
    20: "READ",
    21: "SELECT",
    22: "a transaction statement",
    23: "UPDATE",
    24: "ATTACH",
    25: "DETACH",
    26: "ALTER TABLE",
    27: "REINDEX",
    28: "ANALYZE",
    29: "CREATE VIRTUAL TABLE",
    30: "DROP VIRTUAL TABLE",
    31: "FUNCTION",
    32: "SAVEPOINT",
    33: "RECURSIVE",
}
_SQLITE_READ, _SQLITE_SELECT, _SQLITE_UPDATE, _SQLITE_FUNCTION, _SQLITE_RECURSIVE = (
    20,
    21,
    23,
    31,
    33,
)

_ISO_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_INT64 = (-(2**63), 2**63 - 1)


class SqlRejected(Exception):
    """The query is not allowed or failed as written; the message is for the caller."""


class SqlLimitExceeded(SqlRejected, LimitExceeded):
    """The query ran into a resource bound (time, value size, result size, memory)."""


# ---------------------------------------------------------------- pure helpers


def first_keyword(query: str) -> str | None:
    """First word of the SQL text after whitespace and comments, upper-cased."""
    i, n = 0, len(query)
    while i < n:
        if query[i].isspace():
            i += 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            i = n if end < 0 else end + 1
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            m = re.match(r"[A-Za-z_]+", query[i:])
            return m.group(0).upper() if m else query[i]
    return None


def check_shape(query: str) -> None:
    """Reject what the authorizer cannot see (VACUUM, empty text) before SQLite runs it."""
    try:
        size = len(query.encode("utf-8"))
    except UnicodeEncodeError:
        raise SqlRejected("the query is not valid UTF-8 text") from None
    if size > MAX_QUERY_BYTES:
        raise SqlRejected(f"the query is longer than {MAX_QUERY_BYTES} bytes")
    word = first_keyword(query)
    if word is None:
        raise SqlRejected("the query is empty; send one SELECT statement")
    if word not in _ALLOWED_FIRST_WORDS:
        raise SqlRejected(f"{word} is not allowed; only a single SELECT is allowed")


def sql_literal(text: str) -> str:
    """A SQL string literal; the org id is ours (from the API key), quoted all the same."""
    if "\x00" in text:
        raise SqlRejected("the organization id contains a NUL character")
    return "'" + text.replace("'", "''") + "'"


def _json_int(text: str) -> int | float:
    """JSON integers that BSON cannot hold as int64 become floats instead of failing."""
    value = int(text)
    return value if _INT64[0] <= value <= _INT64[1] else float(value)


_DECODER = json.JSONDecoder(parse_int=_json_int)  # one instance: json.loads(parse_int=) rebuilds it


def loads_json(text: str) -> Any:
    return _DECODER.decode(text)


def convert_value(value: Any) -> Any:
    """A SQLite value as the BSON the cloud would send.

    Text in the view's time format becomes an aware datetime; text that is a JSON object
    or array (the `data`/`tags` columns, json_extract of an object, json_group_array...)
    becomes a dict/list. Everything else passes through.
    """
    if not isinstance(value, str) or not value:
        return value
    first = value[0]
    if first in "{[":
        try:
            decoded = loads_json(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, dict | list) else value
    if "0" <= first <= "9" and len(value) == 27 and _ISO_RE.fullmatch(value):
        try:
            return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        except ValueError:
            return value
    return value


def convert_row(names: Sequence[str], row: Sequence[Any], index: int) -> dict[str, Any]:
    """One result row as a dict; JSON nested past Python's recursion limit is refused
    naming the column (BSON could not carry it either)."""
    out: dict[str, Any] = {}
    for name, value in zip(names, row, strict=True):
        try:
            out[name] = convert_value(value)
        except RecursionError:
            raise SqlLimitExceeded(
                f"column {name!r} of result row {index} holds JSON nested too deeply"
            ) from None
    return out


def column_names(description: Sequence[Sequence[Any]]) -> list[str]:
    """Result keys; a repeated name gets _2, _3... so no column silently disappears."""
    seen: set[str] = set()
    out: list[str] = []
    for col in description:
        name = str(col[0])
        unique, k = name, 2
        while unique in seen:
            unique, k = f"{name}_{k}", k + 1
        seen.add(unique)
        out.append(unique)
    return out


class Guard:
    """The authorizer: allow only reading, and `main.readings` only via the scope view.

    `hidden` holds every name an unqualified FROM item could resolve to other than the
    scope views (tables, views and modules of this connection, lower-cased): SQLite
    reports a FROM item none of whose columns is read (`count(*)`, `SELECT 1`, EXISTS)
    by that name alone, with no database, and a CTE looks the same.
    """

    def __init__(self, scope_view: str, hidden: frozenset[str] = frozenset()) -> None:
        self.scope_view = scope_view
        self.hidden = hidden
        self.reason: str | None = None
        self._vtab_init = False

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, inner: str | None
    ) -> int:
        verdict = self.check(action, arg1, arg2, db, inner)
        if isinstance(verdict, str):
            if self.reason is None:
                self.reason = verdict
            return sqlite3.SQLITE_DENY
        return verdict

    def check(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, inner: str | None
    ) -> int | str:
        """SQLITE_OK / SQLITE_IGNORE, or the reason to deny."""
        if action in (_SQLITE_SELECT, _SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == _SQLITE_FUNCTION:
            name = (arg2 or "").lower()
            if name in _DENIED_FUNCTIONS:
                return f"function {name}() is not allowed"
            return sqlite3.SQLITE_OK
        if action == _SQLITE_READ:
            return self._check_read(arg1 or "", arg2 or "", db, inner)
        if action == _SQLITE_UPDATE and arg1 == "sqlite_master" and db == "main" and not inner:
            # SQLite's own bookkeeping when json_each/json_tree is first used in a
            # statement; IGNORE means "change nothing", and the connection is read-only.
            self._vtab_init = True
            return sqlite3.SQLITE_IGNORE
        what = _ACTION_NAMES.get(action, f"action {action}")
        return f"{what} is not allowed; only a single SELECT is allowed"

    def _check_read(self, table: str, column: str, db: str | None, inner: str | None) -> int | str:
        if db == "main" and table == "readings" and inner == self.scope_view:
            return sqlite3.SQLITE_OK
        if db == "temp" and table == self.scope_view and inner == "readings":
            return sqlite3.SQLITE_OK
        if db == "temp" and table == "readings":
            return sqlite3.SQLITE_OK
        if not db:
            return self._check_unread_item(table)
        if table in _TABLE_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if db == "main" and table == "sqlite_master" and column == "ROWID" and self._vtab_init:
            return sqlite3.SQLITE_IGNORE  # same bookkeeping as above; reads as NULL
        if table.startswith("pragma_"):
            return "PRAGMA is not allowed; only a single SELECT is allowed"
        return f"table {db}.{table} is not accessible; query the readings view"

    def _check_unread_item(self, name: str) -> int | str:
        """A FROM item read for no column: a CTE, the readings view, or a table to deny.

        Only this case reaches the authorizer without a database name (column reads
        of CTEs and subqueries never reach it), so an unknown name is a CTE.
        """
        low = name.lower()
        if low in ("readings", self.scope_view) or low in _TABLE_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if low.startswith("pragma_"):
            return "PRAGMA is not allowed; only a single SELECT is allowed"
        if low in self.hidden or low.startswith("sqlite_"):
            return (
                f"table {name} is not accessible; query the readings view"
                " (a CTE cannot reuse the name of a table)"
            )
        return sqlite3.SQLITE_OK


# ---------------------------------------------------------------- I/O


def open_readonly(db_path: Path, max_value_bytes: int = MAX_VALUE_BYTES) -> sqlite3.Connection:
    """A connection that cannot write the ingest database, whatever it is asked."""
    if not db_path.exists():
        raise FileNotFoundError(db_path)
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    register_sql_functions(conn)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_QUERY_BYTES + 4096)
    return conn


def install_scope(conn: sqlite3.Connection, org_id: str) -> str:
    """Create temp.readings (the org's rows) over a randomly named scope view."""
    scope = f"scope_{secrets.token_hex(16)}"
    cols = ", ".join(f"{expr} AS {name}" for name, expr in VIEW_COLUMNS)
    conn.execute(
        f'CREATE TEMP VIEW "{scope}" AS SELECT {cols} FROM main.readings'
        f" WHERE org_id = {sql_literal(org_id)}"
    )
    conn.execute(f'CREATE TEMP VIEW readings AS SELECT * FROM temp."{scope}"')
    return scope


def hidden_names(conn: sqlite3.Connection) -> frozenset[str]:
    """Every table, view and table-valued module name of `conn`, lower-cased (read before
    the authorizer is installed): what an unqualified FROM item could resolve to."""
    rows = conn.execute(
        "SELECT name FROM main.sqlite_master UNION SELECT name FROM temp.sqlite_master"
        " UNION SELECT name FROM pragma_module_list"
    ).fetchall()
    return frozenset(str(r[0]).lower() for r in rows)


def _rejection(
    err: sqlite3.Error, guard: Guard, control: QueryControl, max_value_bytes: int
) -> Exception:
    """Map a SQLite error to what the caller did wrong, or pass server faults through."""
    msg = str(err)
    if control.timed_out:
        return SqlLimitExceeded(str(control.too_long("narrow it or add LIMIT")))
    if control.cancelled:
        return SqlRejected("query cancelled")
    if guard.reason is not None:
        return SqlRejected(guard.reason)
    name = getattr(err, "sqlite_errorname", None) or ""
    if name == "SQLITE_TOOBIG":
        return SqlLimitExceeded(
            f"a value would be larger than {max_value_bytes} bytes (--query-max-value-bytes)"
        )
    if name == "SQLITE_NOMEM":
        return SqlLimitExceeded("the query needs more memory than allowed (--sqlite-heap-limit)")
    if isinstance(err, sqlite3.ProgrammingError):
        if "one statement" in msg:
            return SqlRejected("only a single SELECT is allowed; the query has several statements")
        return SqlRejected(f"invalid query: {msg}")
    if name.startswith("SQLITE_READONLY") or "cannot modify" in msg:
        return SqlRejected("writes are not allowed; only a single SELECT is allowed")
    # No SQLite code: Python's own conversion failed (e.g. text that is not UTF-8).
    if not name or name in ("SQLITE_ERROR", "SQLITE_TOOBIG", "SQLITE_RANGE", "SQLITE_MISMATCH"):
        return SqlRejected(f"SQL error: {msg}")
    return err


def row_bytes(row: Sequence[Any]) -> int:
    """What a raw result row costs before conversion: text and blob lengths, 16 bytes for
    anything else (BSON's per-field overhead included)."""
    return sum(len(v) + 16 if isinstance(v, str | bytes) else 16 for v in row)


def run_sql(
    db_path: Path,
    org_id: str,
    query: str,
    *,
    max_rows: int = _DEFAULTS.max_rows,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_result_bytes: int = _DEFAULTS.max_result_bytes,
    max_value_bytes: int = MAX_VALUE_BYTES,
    control: QueryControl | None = None,
) -> list[dict[str, Any]]:
    """Run one SELECT against the org's `readings` view; rows as BSON-ready dicts.

    Raises SqlRejected (caller's fault: INVALID_ARGUMENT) when the query is not allowed
    or fails to compile, and SqlLimitExceeded when it runs past its deadline or would
    answer more than `max_rows` rows or `max_result_bytes` bytes (counted as rows are
    fetched). `control` (deadline and cancel) defaults to one of `timeout_s`.
    Anything else (I/O, a locked or corrupt file) propagates as sqlite3.Error.
    Blocking: call from a worker thread.
    """
    check_shape(query)
    control = control if control is not None else QueryControl(timeout_s)
    conn = open_readonly(db_path, max_value_bytes)
    try:
        scope = install_scope(conn, org_id)
        conn.execute("PRAGMA query_only=ON")
        guard = Guard(scope, hidden_names(conn))
        conn.set_authorizer(guard)
        conn.set_progress_handler(control.progress, _PROGRESS_STEPS)
        control.attach(conn)
        try:
            cur = conn.execute(query)
            if cur.description is None:
                raise SqlRejected("only a single SELECT is allowed")
            names = column_names(cur.description)
            out: list[dict[str, Any]] = []
            size = 0
            while batch := cur.fetchmany(64):
                if len(out) + len(batch) > max_rows:
                    raise SqlLimitExceeded(
                        f"the result has more than {max_rows} rows (--query-max-rows);"
                        " add LIMIT or aggregate"
                    )
                for row in batch:
                    size += row_bytes(row)
                    if size > max_result_bytes:
                        raise SqlLimitExceeded(
                            f"the result is larger than {max_result_bytes} bytes after"
                            f" {len(out)} rows (--query-max-result-bytes); add LIMIT or"
                            " select fewer columns"
                        )
                    out.append(convert_row(names, row, len(out)))
                if control.stopped():
                    raise sqlite3.OperationalError("interrupted")
            return out
        except sqlite3.Error as err:
            raise _rejection(err, guard, control, max_value_bytes) from None
    finally:
        control.attach(None)
        conn.close()
