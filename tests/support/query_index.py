"""A real ingest index (schema from IngestStore.open) holding known rows of two
organisations; rows are inserted with sqlite3 for control over every column. The SQL
and MQL engine tests query it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

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
        for i, (org, ctype, cname, method, part, tags, secs, data) in enumerate(ROWS):
            t = None if secs is None else ns(T0 + dt.timedelta(seconds=secs, microseconds=i))
            conn.execute(
                "INSERT INTO readings(upload_id, org_id, location_id, robot_id, robot_name,"
                " part_name, part_id, component_type, component_name, method_name,"
                " method_parameters, tags, dataset_ids, time_requested_ns, time_received_ns,"
                " data, received_at_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                ),
            )
    return db
