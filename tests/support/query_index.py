"""A real ingest index (schema from IngestStore.open, or PostgreSQL's migration) holding
known rows of two organisations; rows are inserted with plain SQL for control over every
column. The SQL and MQL engine tests query it; `MqlTarget` runs MQL on either backend."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged.ingest import pg
from edged.ingest.limits import QueryControl, QueryLimits
from edged.ingest.mql import run_mql
from edged.ingest.sql import DEFAULT_TIMEOUT_S
from edged.ingest.storage import IngestStore

ORG_A = "org-a"
ORG_B = "org-b"
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


def ns(t: dt.datetime) -> int:
    return int((t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) / dt.timedelta(microseconds=1)) * 1000


# (org, component_type, component_name, method, part, tags, seconds after T0 or None, data)
ROWS: list[tuple[str, str, str, str, str, list[str], int | None, dict[str, Any]]] = [
    (ORG_A, "sensor", "temp1", "Readings", "part-1", ["indoor"], 0, {"readings": {"temp_c": 21.5}}),
    (
        ORG_A,
        "sensor",
        "temp1",
        "Readings",
        "part-1",
        ["indoor", "calib"],
        60,
        {"readings": {"temp_c": 22.5, "ok": True}},
    ),
    (
        ORG_A,
        "sensor",
        "temp2",
        "Readings",
        "part-2",
        [],
        120,
        {"readings": {"temp_c": 30.0, "hum": 40, "mode": "auto"}},
    ),
    (
        ORG_A,
        "motor",
        "motor1",
        "Position",
        "part-2",
        ["outdoor"],
        180,
        {"readings": {"position": 5}, "extra": [1, 2, 3]},
    ),
    (ORG_A, "sensor", "temp2", "Readings", "part-2", [], None, {"readings": {"temp_c": -5.25}}),
    (ORG_A, "sensor", "temp3", "Readings", "part-3", [], 240, {"readings": [{"temp_c": 99}]}),
    (ORG_B, "sensor", "temp1", "Readings", "part-b", ["secret"], 0, {"readings": {"temp_c": 1000}}),
    (ORG_B, "sensor", "bsecret", "Readings", "part-b", ["secret"], 30, {"readings": {"x": 1}}),
    (ORG_B, "motor", "motor1", "Position", "part-b", ["secret"], 300, {"readings": {"temp_c": 7}}),
]
A_ROWS = [r for r in ROWS if r[0] == ORG_A]


_INSERT = (
    "INSERT INTO readings(upload_id, org_id, location_id, robot_id, robot_name,"
    " part_name, part_id, component_type, component_name, method_name,"
    " method_parameters, tags, dataset_ids, time_requested_ns, time_received_ns,"
    " data, received_at_ns, time_captured_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)


def _values() -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for i, (org, ctype, cname, method, part, tags, secs, data) in enumerate(ROWS):
        t = None if secs is None else ns(T0 + dt.timedelta(seconds=secs, microseconds=i))
        out.append(
            (
                f"u{i}",
                org,
                f"loc-{org}",
                f"robot-{org}",
                f"bot-{org}",
                f"name-{part}",
                part,
                ctype,
                cname,
                method,
                "{}",
                json.dumps(tags),
                "[]",
                None if t is None else t - 1000,
                None if t is None else t + 789,  # sub-microsecond part must floor away
                json.dumps(data),
                ns(T0),
                0,
            )
        )
    return out


def build_db(root: Path) -> Path:
    """A real ingest index holding ROWS; returns the database path."""

    async def create() -> None:
        store = await IngestStore.open(root)
        await store.close()

    asyncio.run(create())
    db = root / "ingest.sqlite3"
    # closing(): `with connect()` only commits; a connection closed later by the garbage
    # collector checkpoints the WAL into the file mid-test (and changes its digest).
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(_INSERT, _values())
    return db


def build_pg(url: str) -> pg.PgIndex:
    """The same ROWS in a migrated PostgreSQL database (ids 1.. in the same order)."""
    with pg.connect(url) as conn:
        pg.migrate(conn)
        with conn.transaction():
            pg.PgConn(conn).executemany(_INSERT, _values())
    return pg.PgIndex(url, pool_size=2)


@dataclass
class MqlTarget:
    """One backend's MQL engine over ROWS: `run` takes run_mql's arguments."""

    backend: str  # "sqlite" | "postgresql"
    path: Path
    index: pg.PgIndex | None = None

    def run(
        self, org: str, pipeline: Any, *, timeout_s: float = DEFAULT_TIMEOUT_S, **kw: Any
    ) -> list[Any]:
        if self.index is None:
            return run_mql(self.path, org, pipeline, timeout_s=timeout_s, **kw)
        from edged.ingest.pgsql import run_pg_mql

        lim = QueryLimits()
        limits = {
            "max_docs": lim.max_rows,
            "max_result_bytes": lim.max_result_bytes,
            "max_doc_bytes": lim.max_value_bytes,
            "max_nodes": lim.max_pipeline_nodes,
        } | kw
        return run_pg_mql(self.index, org, pipeline, control=QueryControl(timeout_s), **limits)
