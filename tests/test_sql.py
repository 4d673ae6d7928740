"""TabularDataBySQL engine: read-only, one SELECT, one organisation, bounded.

The database is a real ingest index with known rows (tests/support/query_index.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import bson
import pytest
from google.protobuf.struct_pb2 import Struct

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import sensor_metadata, upload_metadata
from edged.ingest.sql import (
    VIEW_COLUMNS,
    SqlRejected,
    column_names,
    convert_value,
    first_keyword,
    run_sql,
)
from edged.ingest.storage import IngestStore
from tests.support.query_index import A_ROWS, ORG_A, ORG_B, T0, build_db


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_db(tmp_path_factory.mktemp("sqldb"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- results


def test_view_shows_own_org_with_cloud_columns(db: Path) -> None:
    rows = run_sql(db, ORG_A, "SELECT * FROM readings")
    assert len(rows) == len(A_ROWS)
    assert list(rows[0]) == [name for name, _ in VIEW_COLUMNS]
    assert {r["organization_id"] for r in rows} == {ORG_A}
    first = rows[0]
    assert first["data"] == {"readings": {"temp_c": 21.5}}
    assert first["tags"] == ["indoor"]
    assert first["robot_name"] == "bot-org-a" and first["part_name"] == "name-part-1"
    assert first["time_received"] == T0  # +789 ns floors to the microsecond
    assert first["time_requested"] == T0 - dt.timedelta(microseconds=1)
    assert first["time_received"].tzinfo is dt.UTC
    assert rows[4]["time_received"] is None and rows[4]["time_requested"] is None


def test_results_survive_bson(db: Path) -> None:
    for row in run_sql(db, ORG_A, "SELECT *, json_extract(data, '$.readings') r FROM readings"):
        back: dict[str, Any] = bson.decode(
            bson.encode(row), codec_options=bson.CodecOptions(tz_aware=True)
        )
        # BSON dates carry milliseconds
        assert back["data"] == row["data"] and back["r"] == row["r"]
        if row["time_received"] is not None:
            assert abs(back["time_received"] - row["time_received"]) < dt.timedelta(milliseconds=1)


def test_aggregate_with_json_extract(db: Path) -> None:
    rows = run_sql(
        db,
        ORG_A,
        "SELECT component_name, count(*) AS n,"
        " avg(json_extract(data, '$.readings.temp_c')) AS t"
        " FROM readings WHERE component_type = 'sensor' GROUP BY 1 ORDER BY 1",
    )
    assert rows == [
        {"component_name": "temp1", "n": 2, "t": 22.0},
        {"component_name": "temp2", "n": 2, "t": 12.375},
        {"component_name": "temp3", "n": 1, "t": None},
    ]


def test_time_text_filters_and_sorts(db: Path) -> None:
    rows = run_sql(
        db,
        ORG_A,
        "SELECT component_name, time_received FROM readings"
        " WHERE time_received >= '2024-05-01T12:01' AND time_received < '2024-05-01T12:03'"
        " ORDER BY time_received DESC",
    )
    assert [r["component_name"] for r in rows] == ["temp2", "temp1"]
    latest = run_sql(
        db, ORG_A, "SELECT max(time_received) AS t, unixepoch(min(time_received)) s FROM readings"
    )
    assert latest == [
        {"t": T0 + dt.timedelta(seconds=240, microseconds=5), "s": int(T0.timestamp())}
    ]


def test_json_each_over_tags_and_objects_decoded(db: Path) -> None:
    tagged = run_sql(
        db,
        ORG_A,
        "SELECT count(*) n FROM readings, json_each(readings.tags) WHERE value = 'indoor'",
    )
    assert tagged == [{"n": 2}]
    rows = run_sql(
        db,
        ORG_A,
        "SELECT json_extract(data, '$.readings') r, json_group_array(component_name) a,"
        " ' ' || data raw FROM readings WHERE component_name = 'temp1'",
    )
    assert rows[0]["r"] == {"temp_c": 21.5}
    assert rows[0]["a"] == ["temp1", "temp1"]
    assert isinstance(rows[0]["raw"], str)  # a leading space keeps JSON as text


@pytest.mark.parametrize(
    "query",
    [
        "SELECT ';' AS s",
        "SELECT ';' AS s;",
        "select ';' as s -- trailing; comment",
        "/* lead; */ SELECT ';' AS s /* ; */ ;  -- ;",
        "WITH x AS (SELECT ';' AS s) SELECT s FROM x",
        "VALUES (';')",
    ],
)
def test_semicolons_inside_one_statement_are_fine(db: Path, query: str) -> None:
    rows = run_sql(db, ORG_A, query)
    assert len(rows) == 1 and list(rows[0].values()) == [";"]


def test_recursive_cte_and_subqueries_allowed(db: Path) -> None:
    rows = run_sql(
        db,
        ORG_A,
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3)"
        " SELECT (SELECT count(*) FROM c) AS k, (SELECT count(*) FROM (SELECT 1)) AS one,"
        " (SELECT count(*) FROM readings) AS total",
    )
    assert rows == [{"k": 3, "one": 1, "total": len(A_ROWS)}]


def test_duplicate_column_names_kept() -> None:
    assert column_names([("x",), ("x",), ("x_2",), ("y",)]) == ["x", "x_2", "x_2_2", "y"]


# ---------------------------------------------------------------- rejection


REJECTED = [
    ("", "empty"),
    ("  -- only a comment", "empty"),
    ("INSERT INTO readings(data) VALUES ('x')", "INSERT is not allowed"),
    ("UPDATE readings SET data = '{}'", "UPDATE is not allowed"),
    ("DELETE FROM readings", "DELETE is not allowed"),
    ("DROP TABLE readings", "DROP is not allowed"),
    ("CREATE TABLE t(x)", "CREATE is not allowed"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE is not allowed"),
    ("ATTACH DATABASE ':memory:' AS x", "ATTACH is not allowed"),
    ("DETACH x", "DETACH is not allowed"),
    ("PRAGMA table_info(readings)", "PRAGMA is not allowed"),
    ("PRAGMA query_only = OFF", "PRAGMA is not allowed"),
    ("BEGIN", "BEGIN is not allowed"),
    ("SAVEPOINT s", "SAVEPOINT is not allowed"),
    ("VACUUM", "VACUUM is not allowed"),
    ("VACUUM INTO '/tmp/edged-sql-test-copy.db'", "VACUUM is not allowed"),
    ("REINDEX", "REINDEX is not allowed"),
    ("ANALYZE", "ANALYZE is not allowed"),
    ("EXPLAIN SELECT 1", "EXPLAIN is not allowed"),
    ("SELECT 1; SELECT 2", "single SELECT"),
    ("SELECT 1;SELECT 2", "single SELECT"),
    ("SELECT ';'; DELETE FROM readings", "single SELECT"),
    ("SELECT 1 /* ; */; DROP TABLE readings", "single SELECT"),
    ("SELECT 1 -- x\n; SELECT 2", "single SELECT"),
    ("WITH x AS (SELECT 1) DELETE FROM readings", "writes are not allowed"),
    ("WITH x AS (SELECT 1) DELETE FROM main.readings", "DELETE is not allowed"),
    ("WITH x AS (SELECT 1) INSERT INTO readings(data) SELECT 1", "INSERT is not allowed"),
    ("WITH x AS (SELECT 1) UPDATE readings SET data = 1", "writes are not allowed"),
    ("WITH x AS (SELECT 1) UPDATE main.readings SET data = 1", "UPDATE is not allowed"),
    ("WITH x AS (SELECT 1) INSERT INTO main.uploads DEFAULT VALUES", "INSERT is not allowed"),
    ("SELECT load_extension('/tmp/evil')", "load_extension() is not allowed"),
    ("SELECT * FROM pragma_table_info('readings')", "PRAGMA is not allowed"),
    ("SELECT * FROM pragma_database_list", "PRAGMA is not allowed"),
    ("SELECT name FROM pragma_function_list", "PRAGMA is not allowed"),
    ("SELECT * FROM main.readings", "main.readings is not accessible"),
    ("SELECT count(*) FROM main.readings", "main.readings is not accessible"),
    ("SELECT (SELECT count(*) FROM main.readings)", "main.readings is not accessible"),
    (
        "SELECT * FROM readings WHERE EXISTS (SELECT 1 FROM main.readings WHERE org_id = 'org-b')",
        "main.readings is not accessible",
    ),
    (
        "WITH readings AS (SELECT * FROM main.readings) SELECT * FROM readings",
        "main.readings is not accessible",
    ),
    (
        "WITH x AS (SELECT org_id FROM main.readings) SELECT count(*) FROM x",
        "main.readings is not accessible",
    ),
    (
        "SELECT component_name FROM readings UNION SELECT component_name FROM main.readings",
        "main.readings is not accessible",
    ),
    ("SELECT * FROM sqlite_master", "main.sqlite_master is not accessible"),
    ("SELECT * FROM sqlite_schema", "is not accessible"),
    ("SELECT rowid FROM sqlite_master", "is not accessible"),
    ("SELECT * FROM sqlite_temp_master", "temp.sqlite_temp_master is not accessible"),
    ("SELECT * FROM uploads", "main.uploads is not accessible"),
    ("SELECT * FROM binaries", "main.binaries is not accessible"),
    ("SELECT nosuch FROM readings", "no such column: nosuch"),
    ("SELECT * FROM nosuch", "no such table: nosuch"),
    ("SELEC 1", "SELEC is not allowed"),
    ("SELECT length(zeroblob(1000000000))", "--query-max-value-bytes"),
    ("SELECT CAST(x'ff' AS TEXT)", "Could not decode to UTF-8"),
    ("SELECT abs(-9223372036854775808)", "integer overflow"),
    ("SELECT '\ud800'", "not valid UTF-8"),
    ("SELECT 1\x00", "null character"),
]


@pytest.mark.parametrize(("query", "reason"), REJECTED)
def test_rejected(db: Path, query: str, reason: str) -> None:
    before = digest(db)
    with pytest.raises(SqlRejected) as info:
        run_sql(db, ORG_A, query)
    assert reason in str(info.value)
    assert digest(db) == before
    assert not Path("/tmp/edged-sql-test-copy.db").exists()


def test_oversized_query_rejected(db: Path) -> None:
    with pytest.raises(SqlRejected, match="longer than"):
        run_sql(db, ORG_A, "SELECT '" + "x" * 1024 * 1024 + "'")


def test_runaway_query_is_stopped(db: Path) -> None:
    forever = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT max(n) FROM c"
    with pytest.raises(SqlRejected, match="took too long"):
        run_sql(db, ORG_A, forever, timeout_s=0.2)


def test_row_cap_raises_not_truncates(db: Path) -> None:
    assert len(run_sql(db, ORG_A, "SELECT * FROM readings", max_rows=len(A_ROWS))) == len(A_ROWS)
    with pytest.raises(SqlRejected, match=f"more than {len(A_ROWS) - 1} rows"):
        run_sql(db, ORG_A, "SELECT * FROM readings", max_rows=len(A_ROWS) - 1)


# ---------------------------------------------------------------- isolation


LEAKS = [
    "SELECT * FROM readings",
    "SELECT * FROM temp.readings",
    "SELECT * FROM readings WHERE organization_id = 'org-b'",
    "SELECT * FROM readings WHERE organization_id <> 'org-a' OR 1 = 1",
    "SELECT * FROM (SELECT * FROM readings) WHERE component_name = 'bsecret'",
    "WITH r AS (SELECT * FROM readings) SELECT * FROM r WHERE tags LIKE '%secret%'",
    "SELECT a.* FROM readings a JOIN readings b ON 1 = 1 WHERE b.component_name = 'bsecret'",
    "SELECT json_group_array(data) AS d FROM readings",
    "SELECT * FROM readings WHERE data LIKE '%1000%'",
]


def _schema_names(db: Path) -> list[str]:
    """Every table and view of the ingest schema, every internal table, every module."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
            " UNION SELECT name FROM pragma_module_list"
        ).fetchall()
    internal = ["sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"]
    return sorted({str(r[0]) for r in rows} - {"json_each", "json_tree"}) + internal


def test_every_other_table_is_unreadable_even_without_columns(db: Path) -> None:
    """count(*), SELECT 1, EXISTS and rowid over any table but the view are refused: a
    FROM item read for no column must not answer how many rows every org has."""
    names = _schema_names(db)
    assert {"binaries", "datasets", "database_users", "uploads", "dbstat"} <= set(names)
    for name in names:
        for schema in ("", "main.", "temp."):
            if name == "readings" and schema != "main.":
                continue  # the scope view itself
            for query in (
                f"SELECT count(*) FROM {schema}{name}",
                f"SELECT 1 FROM {schema}{name}",
                f"SELECT EXISTS (SELECT 1 FROM {schema}{name})",
                f"SELECT count(*) FROM readings WHERE EXISTS (SELECT 1 FROM {schema}{name})",
                f"SELECT max(rowid) FROM {schema}{name}",
                f"SELECT count(*) FROM (SELECT 1 FROM {schema}{name})",
                f"WITH x AS (SELECT 1 FROM {schema}{name}) SELECT count(*) FROM x",
                f"SELECT count(*) FROM readings, {schema}{name}",
            ):
                with pytest.raises(SqlRejected) as info:
                    run_sql(db, ORG_A, query)
                reason = str(info.value)
                refusals = ("not accessible", "no such", "constructor", "PRAGMA")
                assert any(r in reason for r in refusals), (query, reason)


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("SELECT count(*) AS n FROM readings", [{"n": len(A_ROWS)}]),
        ("SELECT count(*) AS n FROM temp.readings", [{"n": len(A_ROWS)}]),
        ("SELECT 1 AS one FROM readings LIMIT 1", [{"one": 1}]),
        ("SELECT EXISTS (SELECT 1 FROM readings) AS e", [{"e": 1}]),
        ("WITH x AS (SELECT 1) SELECT count(*) AS n FROM x", [{"n": 1}]),
        ("WITH x AS (SELECT * FROM readings) SELECT count(*) AS n FROM x", [{"n": len(A_ROWS)}]),
        ("SELECT count(*) AS n FROM json_each('[1, 2]')", [{"n": 2}]),
    ],
)
def test_counting_the_view_and_ctes_still_works(
    db: Path, query: str, rows: list[dict[str, Any]]
) -> None:
    assert run_sql(db, ORG_A, query) == rows


@pytest.mark.parametrize("query", LEAKS)
def test_other_org_never_visible(db: Path, query: str) -> None:
    text = json.dumps(run_sql(db, ORG_A, query), default=str)
    assert "secret" not in text and "org-b" not in text and "1000" not in text


def test_org_b_sees_only_its_rows(db: Path) -> None:
    rows = run_sql(db, ORG_B, "SELECT component_name FROM readings ORDER BY 1")
    assert [r["component_name"] for r in rows] == ["bsecret", "motor1", "temp1"]


@pytest.mark.parametrize("org", ["nobody", "org-a' OR '1'='1", "org-a'--", "", "org-a\\"])
def test_strange_org_ids_see_nothing(db: Path, org: str) -> None:
    assert run_sql(db, org, "SELECT count(*) AS n FROM readings") == [{"n": 0}]


def test_nul_in_org_id_rejected(db: Path) -> None:
    with pytest.raises(SqlRejected, match="NUL"):
        run_sql(db, "org-a\x00", "SELECT 1")


async def test_reads_alongside_a_live_store(tmp_path: Path) -> None:
    """The ingest keeps the database open in WAL mode; committed uploads are visible."""
    store = await IngestStore.open(tmp_path)
    try:
        reading = pb.SensorData(metadata=sensor_metadata((T0, T0)))
        reading.struct.CopyFrom(Struct())
        reading.struct.update({"readings": {"temp_c": 19.0}})
        meta = upload_metadata(
            "part-live", pb.DATA_TYPE_TABULAR_SENSOR, component_name="live", tags=["t"]
        )
        await store.store_tabular(ORG_A, "item-1", meta, [reading])
        db = tmp_path / "ingest.sqlite3"
        rows = await asyncio.to_thread(
            run_sql, db, ORG_A, "SELECT component_name, data, tags, time_received FROM readings"
        )
        assert rows == [
            {
                "component_name": "live",
                "data": {"readings": {"temp_c": 19.0}},
                "tags": ["t"],
                "time_received": T0,
            }
        ]
        assert await asyncio.to_thread(run_sql, db, ORG_B, "SELECT * FROM readings") == []
    finally:
        await store.close()


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("query", "word"),
    [
        ("select 1", "SELECT"),
        ("  -- c\n /* d */ With x", "WITH"),
        ("/* unterminated", None),
        ("", None),
        ("(SELECT 1)", "("),
        ("pragma x", "PRAGMA"),
    ],
)
def test_first_keyword(query: str, word: str | None) -> None:
    assert first_keyword(query) == word


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("[not json", "[not json"),
        ("{", "{"),
        ("[18446744073709551616]", [1.8446744073709552e19]),  # beyond int64: float
        (
            "2024-05-01T12:00:00.000001Z",
            dt.datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=dt.UTC),
        ),
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00Z"),
        ("2024-13-01T12:00:00.000001Z", "2024-13-01T12:00:00.000001Z"),
        ("plain", "plain"),
        ("", ""),
        (3, 3),
        (2.5, 2.5),
        (None, None),
        (b"\x00", b"\x00"),
    ],
)
def test_convert_value(value: Any, expected: Any) -> None:
    assert convert_value(value) == expected
