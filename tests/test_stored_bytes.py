"""Readings kept as Struct bytes answer every query as the JSON rows did (issue #15).

Since schema 2 the SQLite index stores a reading's Struct bytes (`data` = BYTES_ONLY)
instead of writing its JSON at upload; an older index holds JSON rows. The same readings
are queried in both forms (the rows rewritten in place to what the JSON writer stored)
and every read path must give the same answer, byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sqlite3
from pathlib import Path
from typing import Any

from google.protobuf.struct_pb2 import Struct

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.ingest import catalog
from edged.ingest.catalog import Conn
from edged.ingest.filters import reading_where
from edged.ingest.mql import run_mql
from edged.ingest.sql import run_sql
from edged.ingest.storage import INDEX_FILE, READING_COLUMNS, IngestStore
from edged.ingest.values import BYTES_ONLY, stored_json, to_bson

ORG = "org-bytes"


def _readings() -> list[pb.SensorData]:
    shapes: list[dict[str, Any]] = [
        {"x": 1.5, "s": 'h\u00e9llo \x00 "q" [', "n": None, "b": True},
        {"l": [1.0, "a", [2.0, {"k": False}]], "st": {"inner": -0.0, "big": 1e300}},
        {"nan": math.nan, "x": 2.0},
        {"inf": math.inf, "ninf": -math.inf, "x": -1.0},
        {},
    ]
    out = []
    for i, shape in enumerate(shapes):
        r = pb.SensorData()
        r.struct.update(shape)
        r.metadata.time_requested.FromNanoseconds(1_000 + i)
        out.append(r)
    unusual = pb.SensorData()  # a Value with no kind: the general writer's case
    unusual.struct.fields.get_or_create("unset")
    unusual.struct.fields["x"].number_value = 3.0
    out.append(unusual)
    return out


async def _answers(store: IngestStore) -> list[str]:
    """Every read path's answer, as text that tells NaN, -0.0 and key order apart."""
    where = reading_where(None, ORG)

    def rows(conn: Conn) -> list[Any]:
        page = catalog.page_readings(conn, where, 0, None, 100)
        return [catalog.count_readings(conn, where), [(r.data, r.data_exact) for r in page]]

    sql = run_sql(
        store.db_path,
        ORG,
        "SELECT *, json_extract(data, '$.x') x, length(data) n, json_type(data, '$.l') t"
        " FROM readings ORDER BY time_requested",
    )
    mql = run_mql(store.db_path, ORG, [{"$match": {"data.x": {"$gt": 0}}}])
    everything = run_mql(store.db_path, ORG, [{"$match": {}}])
    return [
        repr(await store.readings(ORG)),
        repr(await store.read(rows)),
        repr(sql),
        repr([to_bson(d) for d in sql]),
        repr(mql),
        repr([to_bson(d) for d in everything]),
    ]


def _rewrite_as_json(conn: Conn) -> int:
    """What the JSON writer (schema 1) stored for each row."""
    rows = conn.execute("SELECT id, data, data_exact FROM readings").fetchall()
    for rid, data, exact in rows:
        assert data == BYTES_ONLY and exact is not None
        conn.execute(
            "UPDATE readings SET data = ?, data_exact = ? WHERE id = ?", (*stored_json(exact), rid)
        )
    return len(rows)


async def test_bytes_rows_answer_as_json_rows_did(tmp_path: Path) -> None:
    store = await IngestStore.open(tmp_path / "ingest", synchronous="OFF")
    try:
        meta = pb.UploadMetadata(
            part_id="p", component_name="c", type=pb.DATA_TYPE_TABULAR_SENSOR, tags=["t"]
        )
        await store.store_tabular(ORG, None, meta, _readings())
        as_bytes = await _answers(store)
        assert await store.write(_rewrite_as_json) == len(_readings())
        as_json = await _answers(store)
    finally:
        await store.close()
    assert as_bytes == as_json
    assert "nan" in as_bytes[0] and "-0.0" in as_bytes[0]  # the cases that matter got stored


def test_the_sql_function_never_fails_a_query() -> None:
    from edged.ingest.values import _sql_data

    assert _sql_data(BYTES_ONLY, b"\xff\xff not a struct") is None
    assert _sql_data(BYTES_ONLY, 7) is None
    assert _sql_data('{"a": 1.0}', None) == '{"a": 1.0}'
    s = Struct()
    s.update({"a": 1.0})
    assert _sql_data(BYTES_ONLY, s.SerializeToString()) == '{"a": 1.0}'


async def test_rows_insert_in_order_whatever_they_share(tmp_path: Path) -> None:
    """SQLite inserts one upload's readings in multi-row chunks (shared columns bound
    once); rows of several uploads go one by one. Either way: every row, in order."""
    store = await IngestStore.open(tmp_path / "ingest", synchronous="OFF")

    def row(upload: str, i: int) -> tuple[Any, ...]:
        common = (upload, ORG, "", "p", "t", "c", "m", "{}", "[]", "[]")
        return (*common, i, None if i % 3 else i, BYTES_ONLY, bytes([i % 256]), 7, i)

    one_upload = [row("u1", i) for i in range(1999)]  # 1000 + 500 + 200 + ... + 2 + 2
    mixed = [row("u2" if i % 2 else "u3", i) for i in range(5)]
    try:
        for rows in (one_upload, mixed, one_upload[:1]):
            await store.write(functools.partial(store.index.insert_readings, rows=rows))
        got = await store.read(
            lambda c: c.execute(f"SELECT {READING_COLUMNS} FROM readings ORDER BY id").fetchall()
        )
    finally:
        await store.close()
    assert got == [*one_upload, *mixed, *one_upload[:1]]


async def test_a_schema_1_index_migrates_to_2_and_its_json_rows_answer_the_same(
    tmp_path: Path,
) -> None:
    """An index an edged before Struct-bytes rows wrote (JSON rows, user_version 1)."""
    root = tmp_path / "ingest"
    store = await IngestStore.open(root, synchronous="OFF")
    try:
        meta = pb.UploadMetadata(part_id="p", component_name="c", type=pb.DATA_TYPE_TABULAR_SENSOR)
        await store.store_tabular(ORG, None, meta, _readings())
        await store.write(_rewrite_as_json)
        before = await _answers(store)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(root / INDEX_FILE)) as db:
        db.execute("PRAGMA user_version = 1")
    store = await IngestStore.open(root, synchronous="OFF")
    try:
        assert await store.read(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == 2
        assert await _answers(store) == before
    finally:
        await store.close()
