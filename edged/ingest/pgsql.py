"""TabularDataBySQL and TabularDataByMQL on the PostgreSQL index: isolation enforced by
the engine.

The caller's SQL runs in PostgreSQL itself, on a connection that logs in as its
organisation's own role (never `SET ROLE`: a role switched to can switch back to whatever
the session's login user may, e.g. with `set_config('role', ...)` inside a SELECT):
- the role may read one view, `edged_sql.readings` (its search_path), and through it the
  columns of `readings` that the view shows, nothing else; a row-level-security policy
  per role lets it see its organisation's rows only, so `public.readings`, joins, CTEs
  and functions all meet the same wall;
- the transaction is READ ONLY; the text must start like a SELECT (sql.check_shape) and
  is sent prepared (extended protocol), which refuses a second statement;
- `statement_timeout` and a timer that cancels the backend bound its time (the role
  could raise its own statement_timeout, never stop the cancel);
- rows come back as one JSON text each (row_to_json) through a cursor, 64 at a time,
  with their length computed by PostgreSQL first: a value past --query-max-value-bytes,
  more than --query-max-rows rows or --query-max-result-bytes in all stop the query
  before those bytes reach this process.
Role passwords derive from a random secret only the ingest's user can read
(`edged_sql_secret`), so every replica computes the same one. The database's
pg_hba.conf must let these roles (`edged_org_*`) log in with a password.
Queries see the SQLite view's columns; the dialect is PostgreSQL's. MQL (`run_pg_mql`)
reads `public.readings` on the same kind of connection (granted also `rowid` and
`data_exact`, the rest of a document) and evaluates the pipeline with mql.evaluate.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

from edged.ingest import mql
from edged.ingest.limits import QueryControl
from edged.ingest.pg import PgIndex, pg_sql
from edged.ingest.sql import SqlLimitExceeded, SqlRejected, check_shape

_BATCH = 64
_ORG_LOCK = 0x6564676564_03
# Columns of `readings` the view reads: the only ones an organisation role may select.
_VIEW_SOURCE_COLUMNS = (
    "org_id", "location_id", "robot_id", "robot_name", "part_id", "part_name",
    "component_type", "component_name", "method_name", "time_requested_ns",
    "time_received_ns", "tags", "data",
)  # fmt: skip
# ... and what MQL's row source reads besides (pgsql.run_pg_mql): the same rows.
_MQL_SOURCE_COLUMNS = ("rowid", "data_exact")


def role_name(org_id: str) -> str:
    """The role an organisation's SQL logs in as (a digest: any org id makes a safe name)."""
    return "edged_org_" + hashlib.sha256(org_id.encode()).hexdigest()[:32]


def role_password(secret: bytes, org_id: str) -> str:
    return hmac.new(secret, org_id.encode(), hashlib.sha256).hexdigest()


def _grant_org(conn: psycopg.Connection[Any], org_id: str) -> str:
    """Role, password, grants and RLS policy of one organisation (idempotent; replicas
    may race: an advisory lock serialises them); the role's password."""
    name = role_name(org_id)
    role = pgsql.Identifier(name)
    with conn.transaction():
        conn.execute("SET LOCAL lock_timeout = '10s'")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ORG_LOCK,))
        conn.execute(
            "INSERT INTO edged_sql_secret(k) SELECT %s WHERE NOT EXISTS"
            " (SELECT 1 FROM edged_sql_secret)",
            (secrets.token_bytes(32),),
        )
        row = conn.execute("SELECT k FROM edged_sql_secret").fetchone()
        assert row is not None
        password = role_password(bytes(row[0]), org_id)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            pgsql.SQL(
                verb + " ROLE {} LOGIN NOINHERIT NOCREATEDB NOCREATEROLE CONNECTION LIMIT 8"
                " PASSWORD {}"
            ).format(role, pgsql.Literal(password))
        )
        conn.execute(pgsql.SQL("GRANT USAGE ON SCHEMA edged_sql TO {}").format(role))
        conn.execute(pgsql.SQL("GRANT SELECT ON edged_sql.readings TO {}").format(role))
        cols = pgsql.SQL(", ").join(
            pgsql.Identifier(c) for c in _VIEW_SOURCE_COLUMNS + _MQL_SOURCE_COLUMNS
        )
        conn.execute(pgsql.SQL("GRANT SELECT ({}) ON public.readings TO {}").format(cols, role))
        have = conn.execute(
            "SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = 'readings'"
            " AND policyname = %s",
            (name,),
        ).fetchone()
        if have is None:
            conn.execute(
                pgsql.SQL(
                    "CREATE POLICY {} ON public.readings FOR SELECT TO {} USING (org_id = {})"
                ).format(role, role, pgsql.Literal(org_id))
            )
    return password


class _Canceller:
    """QueryControl's handle on a PostgreSQL query: cancel it from another thread (the
    cancel request is a network round trip, so never on the event loop)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def interrupt(self) -> None:
        threading.Thread(target=self._cancel, name="pg-cancel", daemon=True).start()

    def _cancel(self) -> None:
        with contextlib.suppress(psycopg.Error):  # it ended meanwhile, or the server is gone
            self._conn.cancel_safe(timeout=10)


def _org_password(index: PgIndex, org_id: str) -> str:
    password = index.org_passwords.get(org_id)
    if password is None:
        admin = index.borrow()
        try:
            password = _grant_org(admin, org_id)
        finally:
            index.give_back(admin)
        index.org_passwords[org_id] = password
    return password


@contextlib.contextmanager
def org_transaction(
    index: PgIndex, org_id: str, control: QueryControl, application: str
) -> Iterator[psycopg.Connection[Any]]:
    """The one way SQL and MQL reach the readings: a connection logged in as the
    organisation's role, in a READ ONLY transaction (always rolled back) whose
    statement_timeout is what is left of the control's deadline, and which the control
    can cancel from another thread."""
    conninfo = make_conninfo(
        index.url,
        user=role_name(org_id),
        password=_org_password(index, org_id),
        application_name=application,
    )
    timeout_ms = max(1, int((control.deadline - time.monotonic()) * 1000))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        control.attach(_Canceller(conn))
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(f"SET LOCAL statement_timeout = {timeout_ms}")
                conn.execute("SET LOCAL search_path = edged_sql")
                yield conn
        finally:
            control.attach(None)


def run_pg_sql(
    index: PgIndex,
    org_id: str,
    query: str,
    *,
    max_rows: int,
    max_result_bytes: int,
    max_value_bytes: int,
    control: QueryControl,
) -> list[dict[str, Any]]:
    """Run one SELECT as the organisation's role; rows as dicts (JSON values). Blocking."""
    check_shape(query)
    wrapped = (
        "DECLARE edged_q NO SCROLL CURSOR FOR SELECT octet_length(j), CASE WHEN"
        f" octet_length(j) <= {int(max_value_bytes)} THEN j END FROM (SELECT"
        f" row_to_json(q)::text AS j FROM (\n{query.rstrip().rstrip(';')}\n) AS q) AS rows"
    )
    try:
        with org_transaction(index, org_id, control, "edged-sql") as conn:
            # no parameters: psycopg sends the text as is; prepared: one statement only
            conn.execute(wrapped, prepare=True)
            return _fetch(conn, max_rows, max_result_bytes, max_value_bytes, control)
    except psycopg.errors.QueryCanceled:
        raise control.too_long("add a WHERE on time or LIMIT") from None
    except (psycopg.errors.InsufficientResources, psycopg.errors.ProgramLimitExceeded) as exc:
        raise SqlLimitExceeded(_first_line(exc)) from None
    except psycopg.Error as exc:
        if exc.sqlstate is None or exc.sqlstate.startswith("08"):
            raise  # the connection failed: ours to fix, not the caller's query
        raise SqlRejected(_first_line(exc)) from None


# The MQL row source: mql._ROW_COLUMNS of `public.readings` (the role's column grants),
# `data` withheld past --query-max-value-bytes. No org filter: the policy is the only one.
_MQL_ROWS = (
    "SELECT rowid, org_id, location_id, robot_id, robot_name, part_id, part_name,"
    " component_type, component_name, method_name, time_requested_ns, time_received_ns,"
    " tags, CASE WHEN octet_length(data) <= {max} THEN data END, data_exact"
    " FROM public.readings{where} ORDER BY rowid"
)


def run_pg_mql(
    index: PgIndex,
    org_id: str,
    pipeline: list[dict[str, Any]],
    *,
    max_docs: int,
    max_result_bytes: int,
    max_doc_bytes: int,
    max_nodes: int,
    control: QueryControl,
) -> list[dict[str, Any]]:
    """TabularDataByMQL over the PostgreSQL index: mql.evaluate, as on SQLite, reading
    the org's rows as its role (org_transaction), its leading $match pushed down in
    PostgreSQL's dialect. Blocking."""
    opened = contextlib.ExitStack()  # entered once rows are asked for: after validation

    def read_rows(where: str, args: list[Any]) -> Iterator[tuple[Any, ...]]:
        sql = _MQL_ROWS.format(max=int(max_doc_bytes), where=f" WHERE {where}" if where else "")
        conn = opened.enter_context(org_transaction(index, org_id, control, "edged-mql"))
        cur = opened.enter_context(conn.cursor(name="edged_mql"))
        cur.itersize = _BATCH
        cur.execute(pg_sql(sql), args)
        for row in cur:
            if row[13] is None:
                raise mql.stored_too_big(max_doc_bytes)
            yield row

    try:
        with opened:
            return mql.evaluate(
                pipeline,
                read_rows,
                dialect="postgresql",
                control=control,
                max_docs=max_docs,
                max_result_bytes=max_result_bytes,
                max_doc_bytes=max_doc_bytes,
                max_nodes=max_nodes,
            )
    except psycopg.errors.QueryCanceled:
        if control.cancelled and not control.timed_out:
            raise mql.MqlRejected("query cancelled") from None
        raise mql.too_long(control) from None
    except (psycopg.errors.InsufficientResources, psycopg.errors.ProgramLimitExceeded) as exc:
        raise mql.MqlLimitExceeded(_first_line(exc)) from None


def _fetch(
    conn: psycopg.Connection[Any],
    max_rows: int,
    max_result_bytes: int,
    max_value_bytes: int,
    control: QueryControl,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    size = 0
    while True:
        batch = conn.execute(f"FETCH {_BATCH} FROM edged_q").fetchall()
        if not batch:
            return out
        if len(out) + len(batch) > max_rows:
            raise SqlLimitExceeded(
                f"the result has more than {max_rows} rows (--query-max-rows); add LIMIT or"
                " aggregate"
            )
        for length, text in batch:
            if text is None:
                raise SqlLimitExceeded(
                    f"row {len(out)} of the result is {length} bytes, over the limit of"
                    f" {max_value_bytes} (--query-max-value-bytes)"
                )
            size += int(length)
            if size > max_result_bytes:
                raise SqlLimitExceeded(
                    f"the result is larger than {max_result_bytes} bytes after {len(out)}"
                    " rows (--query-max-result-bytes); add LIMIT or select fewer columns"
                )
            try:
                out.append(json.loads(text))
            except RecursionError:
                raise SqlLimitExceeded(
                    f"result row {len(out)} holds JSON nested too deeply"
                ) from None
        if control.stopped():
            raise control.too_long("add a WHERE on time or LIMIT")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
