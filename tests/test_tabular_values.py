"""Every value a protobuf Struct can hold stores and comes back exactly, through every path.

NaN, ±Inf, -0.0, subnormals and huge doubles are valid on the wire and the stock SDK
sends them. Upload must store them (never UNKNOWN); TabularDataByFilter returns the
Struct bit for bit, MQL returns BSON doubles, SQL sees NaN as null (documented), and
SQLite's json functions never fail over such rows. See edged/ingest/values.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import struct as binary
from collections.abc import AsyncIterator
from typing import Any

import bson
import pytest
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.struct_pb2 import Struct, Value
from hypothesis import given, settings

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.data.v1.data_grpc import DataServiceStub
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.cli import main
from edged.client import DataClient, connect, upload_metadata
from edged.ingest import IngestServer
from edged.ingest.sql import convert_value
from edged.ingest.values import decode_python, decode_struct, encode_struct, to_bson
from tests.support.credentials import Certs, KeyFile
from tests.support.struct_values import structs

NAN, INF = float("nan"), float("inf")
ODD: dict[str, Any] = {
    "nan": NAN,
    "inf": INF,
    "ninf": -INF,
    "nzero": -0.0,
    "max": 1.7976931348623157e308,
    "tiny": 5e-324,
    "big_int": float(2**63 + 2**11),
    "ok": 21.5,
    "list": [NAN, INF, -INF, 1.0, "NaN", None, True],
    "nested": {"deep": {"nan": NAN, "s": 'quote " and Infinity -Infinity NaN'}},
    "NaN": "a key named NaN",
}


def _bits(x: float) -> bytes:
    return binary.pack("<d", x)


def _same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN and -0.0 differs from 0.0 (bit-level for floats)."""
    if isinstance(a, float) and isinstance(b, float):
        return _bits(a) == _bits(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _no_nul(v: Any) -> Any:
    """What BSON results carry for a key with NUL in it (a C string cannot)."""
    if isinstance(v, dict):
        return {k.replace("\x00", "\ufffd"): _no_nul(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_nul(x) for x in v]
    return v


def _struct(d: dict[str, Any]) -> Struct:
    s = Struct()
    s.update(d)
    return s


# -- the stored form, over arbitrary Struct values -------------------------------------------


@settings(max_examples=300, deadline=None)
@given(structs())
def test_every_struct_round_trips_and_its_json_is_strict(data: dict[str, Any]) -> None:
    original = _struct(data)
    text, exact = encode_struct(original)

    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token} in {text}")

    json.loads(text, parse_constant=refuse)
    back = decode_struct(text, exact)
    assert back.SerializeToString(deterministic=True) == original.SerializeToString(
        deterministic=True
    )
    assert _same(decode_python(text, exact), data)
    db = sqlite3.connect(":memory:")
    try:
        assert db.execute("SELECT json_valid(?)", (text,)).fetchone() == (1,)
        db.execute("SELECT count(*) FROM json_tree(?)", (text,)).fetchone()
    finally:
        db.close()
    assert _same(bson.decode(to_bson({"data": decode_python(text, exact)}))["data"], _no_nul(data))
    bson.decode(to_bson({"data": convert_value(text)}))


def test_only_nan_keeps_exact_bytes_and_infinities_stay_numbers_for_sql() -> None:
    text, exact = encode_struct(_struct({"inf": INF, "ninf": -INF, "nzero": -0.0}))
    assert exact is None
    assert json.loads(text) == {"inf": INF, "ninf": -INF, "nzero": -0.0}
    _, exact = encode_struct(_struct({"s": "NaN Infinity", "x": [1.0]}))
    assert exact is None
    text, exact = encode_struct(_struct({"nan": NAN}))
    assert (text, exact is not None) == ('{"nan": null}', True)


# -- every query path, against a real server -------------------------------------------------


@pytest.fixture
async def dc(ingest: IngestServer, key: KeyFile, certs: Certs) -> AsyncIterator[DataClient]:
    async with connect(
        ingest.address, api_key_id=key.key_id, api_key=key.secret, ca_file=certs.ca_file
    ) as client:
        yield client


async def _upload_odd(dc: DataClient) -> None:
    await dc.tabular_data_capture_upload(
        [ODD, {"ok": 1.0}],
        "part-1",
        "rdk:component:sensor",
        "odd",
        "Readings",
        method_parameters={"threshold": NAN},
    )


async def test_odd_values_upload_and_come_back_through_filter(dc: DataClient) -> None:
    await _upload_odd(dc)
    rows, count, _ = await dc.tabular_data_by_filter()
    assert count == 2
    assert _same(rows[0].data, ODD)
    assert _same(rows[1].data, {"ok": 1.0})
    params = rows[0].metadata.method_parameters["threshold"]
    value = Value()
    assert params.Unpack(value) and math.isnan(value.number_value)


async def test_odd_values_in_sql_nan_is_null_and_json_functions_work(dc: DataClient) -> None:
    await _upload_odd(dc)
    rows = await dc.tabular_data_by_sql(
        "org-1",
        "SELECT data, json_extract(data, '$.nan') AS nan, json_extract(data, '$.inf') AS inf,"
        " json_extract(data, '$.ninf') AS ninf, json_extract(data, '$.nzero') AS nzero,"
        " json_type(data, '$.nested.deep.nan') AS t FROM readings WHERE component_name = 'odd'"
        " AND json_extract(data, '$.ok') = 21.5",
    )
    assert len(rows) == 1
    row = rows[0]
    assert row["nan"] is None and row["t"] == "null"
    assert (row["inf"], row["ninf"]) == (INF, -INF)
    assert _bits(row["nzero"]) == _bits(-0.0)
    expected = json.loads(json.dumps(ODD).replace("NaN,", "null,").replace("NaN}", "null}"))
    assert _same(row["data"], expected)
    total = await dc.tabular_data_by_sql(
        "org-1", "SELECT count(*) AS n FROM readings, json_tree(readings.data)"
    )
    assert total[0]["n"] > 0


async def test_odd_values_in_mql_are_bson_doubles(dc: DataClient) -> None:
    await _upload_odd(dc)
    stages: list[dict[str, Any]] = [
        {"$match": {"data.ok": {"$gt": 21}}},
        {"$project": {"data": 1, "_id": 0}},
    ]
    docs = await dc.tabular_data_by_mql("org-1", stages)
    assert len(docs) == 1 and _same(docs[0]["data"], ODD)
    docs = await dc.tabular_data_by_mql("org-1", [{"$match": {"data.inf": {"$gt": 1e308}}}])
    assert len(docs) == 1
    docs = await dc.tabular_data_by_mql("org-1", [{"$match": {"data.nan": NAN}}])
    assert len(docs) == 1  # MongoDB: NaN matches NaN
    await _upload_odd(dc)
    stages = [
        {"$match": {"data.nan": {"$exists": True}}},
        {"$group": {"_id": "$data.nan", "n": {"$sum": 1}}},
    ]
    docs = await dc.tabular_data_by_mql("org-1", stages)
    assert len(docs) == 1 and math.isnan(docs[0]["_id"]) and docs[0]["n"] == 2


async def test_odd_values_in_the_tabular_export(
    dc: DataClient, ingest: IngestServer, key: KeyFile, certs: Certs,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    await _upload_odd(dc)
    argv = [
        "query", "tabular", "--address", ingest.address, "--api-key-id", key.key_id,
        "--api-key-file", str(key.path), "--ca-file", str(certs.ca_file), "--json",
    ]  # fmt: skip
    assert await asyncio.to_thread(main, argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert _same(rows[0]["data"], ODD)


async def test_method_parameters_the_wire_allows_are_stored_as_sent(
    dc: DataClient,
) -> None:
    odd = {
        "corrupt": AnyPb(type_url="type.googleapis.com/google.protobuf.Struct", value=b"\xff"),
        "bad_utf8": AnyPb(
            type_url="type.googleapis.com/google.protobuf.StringValue", value=b"\x0a\x01\xff"
        ),
        "unknown": AnyPb(type_url="example.com/nope", value=b"\x01\x02"),
    }
    meta = upload_metadata("part-1", pb.DATA_TYPE_TABULAR_SENSOR, component_name="params")
    for k, v in odd.items():
        meta.method_parameters[k].CopyFrom(v)
    reading = pb.SensorData(struct=_struct({"x": 1.0}))
    await dc.upload_readings(meta, [reading.SerializeToString()])
    stub = DataServiceStub(dc.channel)
    resp = await stub.TabularDataByFilter(
        dpb.TabularDataByFilterRequest(data_request=dpb.DataRequest()), metadata=await dc.metadata()
    )
    assert dict(resp.metadata[0].method_parameters) == odd
