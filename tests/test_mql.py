"""TabularDataByMQL engine: the documented stage/operator subset, pushdown, isolation.
Every test taking `db` runs on both backends: the SQLite index and PostgreSQL (the rows
read as the organisation's role, pgsql.run_pg_mql)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged.ingest.mql import (
    MqlRejected,
    decode_pipeline,
    pushdown,
    run_mql,
    run_pipeline,
)
from tests.support.pg import PgServer
from tests.support.query_index import A_ROWS, ORG_A, ORG_B, T0, MqlTarget, build_db, build_pg

Doc = dict[str, Any]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MqlTarget]:
    path = build_db(tmp_path_factory.mktemp("mqldb"))
    if request.param == "sqlite":
        yield MqlTarget("sqlite", path)
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = server.create_database()
    index = build_pg(server.url(name))
    try:
        yield MqlTarget("postgresql", path, index)
    finally:
        asyncio.run(index.close())
        server.drop_database(name)


@pytest.fixture(scope="module")
def all_docs(db: MqlTarget) -> list[Doc]:
    return db.run(ORG_A, [])


def names(docs: list[Doc]) -> list[str]:
    return [d["component_name"] for d in docs]


def at(seconds: int, micros: int = 0) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds, microseconds=micros)


# ---------------------------------------------------------------- documents


def test_document_shape(all_docs: list[Doc]) -> None:
    assert len(all_docs) == len(A_ROWS)
    first = all_docs[0]
    assert list(first) == [
        "_id",
        "organization_id",
        "location_id",
        "robot_id",
        "robot_name",
        "part_id",
        "part_name",
        "component_type",
        "component_name",
        "method_name",
        "time_requested",
        "time_received",
        "tags",
        "data",
    ]
    assert first["organization_id"] == ORG_A and first["location_id"] == "loc-org-a"
    assert first["time_received"] == T0 and first["time_requested"] == at(0, -1)
    assert first["tags"] == ["indoor"] and first["data"] == {"readings": {"temp_c": 21.5}}
    assert isinstance(first["_id"], str)
    assert all_docs[4]["time_received"] is None


def test_every_result_round_trips_through_bson(db: MqlTarget) -> None:
    pipelines: list[list[Doc]] = [
        [],
        [{"$group": {"_id": {"c": "$component_name"}, "all": {"$push": "$data"}}}],
        [{"$project": {"t": "$time_received", "d": "$data", "tags": 1}}],
    ]
    codec: bson.CodecOptions[dict[str, Any]] = bson.CodecOptions(tz_aware=True)
    for p in pipelines:
        for doc in db.run(ORG_A, p):
            back = bson.decode(bson.encode(doc), codec_options=codec)
            assert back.keys() == doc.keys()


# ---------------------------------------------------------------- $match

MATCHES: list[tuple[Doc, list[str]]] = [
    ({"component_name": "temp1"}, ["temp1", "temp1"]),
    ({"component_name": {"$eq": "temp2"}}, ["temp2", "temp2"]),
    ({"component_name": {"$ne": "temp1"}}, ["temp2", "motor1", "temp2", "temp3"]),
    ({"component_name": {"$in": ["motor1", "temp3"]}}, ["motor1", "temp3"]),
    ({"component_name": {"$nin": ["temp1", "temp2"]}}, ["motor1", "temp3"]),
    ({"component_name": {"$gt": "temp1"}}, ["temp2", "temp2", "temp3"]),
    ({"component_name": {"$gte": "temp2", "$lt": "temp3"}}, ["temp2", "temp2"]),
    ({"component_type": "motor", "method_name": "Position"}, ["motor1"]),
    ({"data.readings.temp_c": 21.5}, ["temp1"]),
    ({"data.readings.temp_c": {"$gt": 22}}, ["temp1", "temp2", "temp3"]),  # temp3 via array
    ({"data.readings.temp_c": {"$lte": 0}}, ["temp2"]),
    ({"data.readings.temp_c": {"$gt": "a"}}, []),  # type bracketing: numbers vs strings
    ({"data.readings.mode": "auto"}, ["temp2"]),
    ({"data.readings.hum": {"$exists": True}}, ["temp2"]),
    ({"data.readings.temp_c": {"$exists": False}}, ["motor1"]),
    ({"data.readings.ok": True}, ["temp1"]),
    ({"data.readings.ok": 1}, []),  # true is not 1
    ({"data.readings.hum": 40.0}, ["temp2"]),  # 40 == 40.0
    ({"data.extra": 2}, ["motor1"]),  # array contains
    ({"data.extra.1": 2}, ["motor1"]),  # array index
    ({"data.extra": [1, 2, 3]}, ["motor1"]),  # whole array
    ({"data.readings.0.temp_c": 99}, ["temp3"]),
    ({"data.nothing": None}, ["temp1", "temp1", "temp2", "motor1", "temp2", "temp3"]),
    ({"time_received": None}, ["temp2"]),
    ({"time_received": {"$ne": None}}, ["temp1", "temp1", "temp2", "motor1", "temp3"]),
    ({"tags": "indoor"}, ["temp1", "temp1"]),
    ({"tags": {"$in": ["calib", "outdoor"]}}, ["temp1", "motor1"]),
    ({"tags": []}, ["temp2", "temp2", "temp3"]),
    ({"time_received": {"$gte": at(60), "$lt": at(180)}}, ["temp1", "temp2"]),
    ({"time_received": {"$gt": at(60, 1)}}, ["temp2", "motor1", "temp3"]),  # row is at 60s+1µs
    ({"time_received": {"$gte": at(60, 1)}}, ["temp1", "temp2", "motor1", "temp3"]),
    ({"time_received": at(120, 2)}, ["temp2"]),
    ({"time_requested": {"$lte": at(0, -1)}}, ["temp1"]),
    ({"time_received": {"$gt": 5}}, []),  # dates are not numbers
    (
        {"$or": [{"component_name": "motor1"}, {"data.readings.temp_c": {"$lt": 0}}]},
        ["motor1", "temp2"],
    ),
    ({"$and": [{"component_type": "sensor"}, {"part_id": "part-2"}]}, ["temp2", "temp2"]),
    ({"$nor": [{"component_type": "sensor"}]}, ["motor1"]),
    ({"data.readings.temp_c": {"$not": {"$gt": 0}}}, ["motor1", "temp2"]),
    ({"_id": {"$in": ["1", "4"]}}, ["temp1", "motor1"]),
    ({"organization_id": ORG_B}, []),
    ({"component_name": "bsecret"}, []),
]


@pytest.mark.parametrize(("spec", "expected"), MATCHES)
def test_match(db: MqlTarget, all_docs: list[Doc], spec: Doc, expected: list[str]) -> None:
    assert names(db.run(ORG_A, [{"$match": spec}])) == expected
    # the pure evaluator over every document agrees with the pushed-down run
    assert names(list(run_pipeline(all_docs, [{"$match": spec}]))) == expected


def test_naive_datetimes_are_utc(db: MqlTarget) -> None:
    """pymongo decodes BSON dates naive by default; they mean UTC."""
    naive = T0.replace(tzinfo=None) + dt.timedelta(seconds=170)
    assert names(db.run(ORG_A, [{"$match": {"time_received": {"$gte": naive}}}])) == [
        "motor1",
        "temp3",
    ]


# ---------------------------------------------------------------- other stages


def test_project_inclusion_rename_and_literal(db: MqlTarget) -> None:
    out = db.run(
        ORG_A,
        [
            {"$match": {"component_name": "temp2"}},
            {
                "$project": {
                    "_id": 0,
                    "component_name": 1,
                    "data.readings.temp_c": True,
                    "t": "$data.readings.temp_c",
                    "k": {"$literal": "$not-a-path"},
                    "nested.when": "$time_received",
                    "gone": "$no.such.field",
                }
            },
        ],
    )
    assert out == [
        {
            "component_name": "temp2",
            "data": {"readings": {"temp_c": 30.0}},
            "t": 30.0,
            "k": "$not-a-path",
            "nested": {"when": at(120, 2)},
        },
        {
            "component_name": "temp2",
            "data": {"readings": {"temp_c": -5.25}},
            "t": -5.25,
            "k": "$not-a-path",
            "nested": {"when": None},
        },
    ]


def test_project_exclusion_and_nested_spec(db: MqlTarget) -> None:
    out = db.run(
        ORG_A,
        [{"$match": {"component_name": "motor1"}}, {"$project": {"data": {"extra": 0}, "tags": 0}}],
    )
    assert "tags" not in out[0] and out[0]["data"] == {"readings": {"position": 5}}
    assert out[0]["component_name"] == "motor1" and "_id" in out[0]
    only = db.run(
        ORG_A,
        [{"$match": {"component_name": "motor1"}}, {"$project": {"data": {"readings": 1}}}],
    )
    assert only == [{"_id": out[0]["_id"], "data": {"readings": {"position": 5}}}]


def test_add_fields_set_unset(db: MqlTarget) -> None:
    out = db.run(
        ORG_A,
        [
            {"$match": {"component_name": "temp3"}},
            {"$addFields": {"data.copy": "$data.readings.temp_c", "c": "$component_name"}},
            {"$set": {"pair": ["$c", "$nope"]}},
            {"$unset": ["tags", "data.readings", "_id"]},
            {"$project": {"data": 1, "c": 1, "pair": 1, "_id": 0}},
        ],
    )
    assert out == [{"data": {"copy": [99]}, "c": "temp3", "pair": ["temp3", None]}]


def test_sort_skip_limit(db: MqlTarget) -> None:
    out = db.run(
        ORG_A,
        [
            {"$sort": {"component_type": -1, "data.readings.temp_c": 1}},
            {"$skip": 1},
            {"$limit": 3},
        ],
    )
    # sensors first (desc); within them temp_c asc: temp3's array sorts after numbers
    assert [(d["component_name"], d["data"]["readings"]) for d in out] == [
        ("temp1", {"temp_c": 21.5}),
        ("temp1", {"temp_c": 22.5, "ok": True}),
        ("temp2", {"temp_c": 30.0, "hum": 40, "mode": "auto"}),
    ]
    assert names(db.run(ORG_A, [{"$sort": {"time_received": -1}}, {"$limit": 2}])) == [
        "temp3",
        "motor1",
    ]
    # missing/null sort first ascending; stable for ties
    asc = db.run(ORG_A, [{"$sort": {"time_received": 1}}])
    assert names(asc)[0] == "temp2" and asc[0]["time_received"] is None


def test_count(db: MqlTarget) -> None:
    assert db.run(ORG_A, [{"$match": {"component_type": "sensor"}}, {"$count": "n"}]) == [{"n": 5}]
    assert db.run(ORG_A, [{"$match": {"component_name": "zzz"}}, {"$count": "n"}]) == []


def test_group_accumulators(db: MqlTarget) -> None:
    out = db.run(
        ORG_A,
        [
            {"$match": {"component_type": "sensor"}},
            {
                "$group": {
                    "_id": "$component_name",
                    "n": {"$sum": 1},
                    "c": {"$count": {}},
                    "total": {"$sum": "$data.readings.temp_c"},
                    "avg": {"$avg": "$data.readings.temp_c"},
                    "lo": {"$min": "$data.readings.temp_c"},
                    "hi": {"$max": "$time_received"},
                    "first": {"$first": "$time_received"},
                    "last": {"$last": "$data.readings.temp_c"},
                    "tags": {"$push": "$tags"},
                    "parts": {"$addToSet": "$part_id"},
                }
            },
            {"$sort": {"_id": 1}},
        ],
    )
    assert out == [
        {
            "_id": "temp1",
            "n": 2,
            "c": 2,
            "total": 44.0,
            "avg": 22.0,
            "lo": 21.5,
            "hi": at(60, 1),
            "first": T0,
            "last": 22.5,
            "tags": [["indoor"], ["indoor", "calib"]],
            "parts": ["part-1"],
        },
        {
            "_id": "temp2",
            "n": 2,
            "c": 2,
            "total": 24.75,
            "avg": 12.375,
            "lo": -5.25,
            "hi": at(120, 2),
            "first": at(120, 2),
            "last": -5.25,
            "tags": [[], []],
            "parts": ["part-2"],
        },
        {
            "_id": "temp3",
            "n": 1,
            "c": 1,
            "total": 0,  # the array of temps is not a number
            "avg": None,
            "lo": [99],
            "hi": at(240, 5),
            "first": at(240, 5),
            "last": [99],
            "tags": [[]],
            "parts": ["part-3"],
        },
    ]


def test_group_null_and_compound_ids(db: MqlTarget) -> None:
    assert db.run(ORG_A, [{"$group": {"_id": None, "n": {"$sum": 1}}}]) == [
        {"_id": None, "n": len(A_ROWS)}
    ]
    out = db.run(
        ORG_A,
        [
            {"$group": {"_id": {"t": "$component_type", "p": "$part_id"}, "n": {"$sum": 1}}},
            {"$sort": {"n": -1, "_id.p": 1}},
            {"$limit": 2},
        ],
    )
    assert out == [
        {"_id": {"t": "sensor", "p": "part-1"}, "n": 2},
        {"_id": {"t": "sensor", "p": "part-2"}, "n": 2},
    ]


def test_result_cap_raises(db: MqlTarget) -> None:
    assert len(db.run(ORG_A, [], max_docs=len(A_ROWS))) == len(A_ROWS)
    with pytest.raises(MqlRejected, match="more than 2 documents"):
        db.run(ORG_A, [], max_docs=2)
    assert len(db.run(ORG_A, [{"$limit": 2}], max_docs=2)) == 2


def test_timeout(db: MqlTarget) -> None:
    with pytest.raises(MqlRejected, match="took too long"):
        db.run(ORG_A, [{"$count": "n"}], timeout_s=0)


# ---------------------------------------------------------------- rejection

BAD: list[tuple[Any, str]] = [
    ([{"$lookup": {"from": "x"}}], "stage $lookup is not supported; supported stages: $match"),
    ([{"$out": "x"}], "stage $out is not supported"),
    ([{"$unwind": "$tags"}], "stage $unwind is not supported"),
    ([{"$match": {"a": {"$regex": "x"}}}], "query operator $regex is not supported"),
    ([{"$match": {"$where": "1"}}], "query operator $where is not supported"),
    ([{"$match": {"a": {"$elemMatch": {}}}}], "query operator $elemMatch is not supported"),
    ([{"$match": {"a": {"$gt": 1, "b": 2}}}], "cannot mix"),
    ([{"$match": {"a": {"$in": 5}}}], "$in takes an array"),
    ([{"$match": {"a": {"$not": 5}}}], "$not takes a document"),
    ([{"$match": {"$or": []}}], "$or takes a non-empty array"),
    ([{"$match": []}], "$match takes a document"),
    ([{"$project": {"x": {"$add": [1, 2]}}}], "expression operator $add is not supported"),
    ([{"$project": {"x": "$$ROOT"}}], "variable $$ROOT is not supported"),
    ([{"$project": {"a": 1, "b": 0}}], "cannot mix inclusion and exclusion"),
    ([{"$project": {}}], "non-empty"),
    ([{"$group": {"n": {"$sum": 1}}}], "_id expression"),
    ([{"$group": {"_id": None, "n": {"$median": 1}}}], "accumulator $median is not supported"),
    ([{"$group": {"_id": None, "n": 1}}], "takes one accumulator"),
    ([{"$group": {"_id": None, "n": {"$count": 1}}}], "takes {}"),
    ([{"$sort": {"a": 2}}], "must be 1 or -1"),
    ([{"$limit": 0}], "$limit takes an integer from 1"),
    ([{"$limit": "5"}], "$limit takes an integer"),
    ([{"$skip": -1}], "$skip takes an integer from 0"),
    ([{"$count": "$n"}], "$count takes a field name"),
    ([{"$match": {}, "$limit": 1}], "exactly one $stage key"),
    ([5], "exactly one $stage key"),
    ({"$match": {}}, "list of stage documents"),
    ([{"$match": {"": 1}}], "not a valid field path"),
]


@pytest.mark.parametrize(("pipeline", "reason"), BAD)
def test_rejected(db: MqlTarget, pipeline: Any, reason: str) -> None:
    before = hashlib.sha256(db.path.read_bytes()).hexdigest()
    with pytest.raises(MqlRejected) as info:
        db.run(ORG_A, pipeline)
    assert reason in str(info.value)
    assert hashlib.sha256(db.path.read_bytes()).hexdigest() == before


def test_rejected_before_reading(tmp_path: Path) -> None:
    """Validation happens before the database is opened (a missing file is not reached)."""
    with pytest.raises(MqlRejected, match=r"\$lookup"):
        run_mql(tmp_path / "absent.sqlite3", ORG_A, [{"$match": {}}, {"$lookup": {}}])


def test_decode_pipeline() -> None:
    when = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)
    stages = decode_pipeline([bson.encode({"$match": {"time_received": {"$gte": when}}})])
    got = stages[0]["$match"]["time_received"]["$gte"]
    assert got == when and got.tzinfo is not None
    with pytest.raises(MqlRejected, match="stage 1 is not a valid BSON document"):
        decode_pipeline([bson.encode({"$limit": 1}), b"\x05\x00\x00\x00garbage"])
    with pytest.raises(MqlRejected, match="stage 0"):
        decode_pipeline([b""])


# ---------------------------------------------------------------- isolation


@pytest.mark.parametrize(
    "pipeline",
    [
        [],
        [{"$match": {"organization_id": ORG_B}}],
        [{"$match": {"$or": [{"organization_id": ORG_B}, {"organization_id": {"$ne": ORG_A}}]}}],
        [{"$match": {"tags": "secret"}}],
        [{"$group": {"_id": "$organization_id", "n": {"$sum": 1}}}],
        [{"$match": {"data.readings.temp_c": {"$gte": 1000}}}],
    ],
)
def test_other_org_never_visible(db: MqlTarget, pipeline: list[Doc]) -> None:
    text = repr(db.run(ORG_A, pipeline))
    assert "secret" not in text and ORG_B not in text and "1000" not in text


def test_postgresql_rows_are_the_orgs_by_the_engines_policy(db: MqlTarget) -> None:
    """MQL's PostgreSQL row source filters no organisation itself: the role's row-level
    policy is the only wall, and it holds for the row source's own table."""
    if db.index is None:
        pytest.skip("PostgreSQL only")
    from edged.ingest.limits import QueryControl
    from edged.ingest.pgsql import _MQL_ROWS, org_transaction

    assert "org_id =" not in _MQL_ROWS
    with org_transaction(db.index, ORG_A, QueryControl(10), "test") as conn:
        rows = conn.execute("SELECT DISTINCT org_id FROM public.readings").fetchall()
    assert rows == [(ORG_A,)]


def test_org_b_and_quoted_org_ids(db: MqlTarget) -> None:
    assert sorted(names(db.run(ORG_B, []))) == ["bsecret", "motor1", "temp1"]
    assert db.run("org-a' OR '1'='1", []) == []


# ---------------------------------------------------------------- pushdown


def test_pushdown_translates_top_level_fields() -> None:
    sql, args = pushdown(
        {
            "component_name": "temp1",
            "part_id": {"$in": ["a", "b"]},
            "time_received": {"$gte": T0},
            "data.readings.temp_c": {"$gt": 3},
            "tags": "x",  # not pushed: evaluated in Python
            "$or": [{"method_name": "A"}, {"robot_id": {"$ne": "r"}}],
        }
    )
    assert sql == (
        "(component_name = ?) AND (part_id IN (?, ?)) AND (time_received_ns >= ?)"
        " AND (json_extract(data, '$.readings.temp_c') > ?"
        " OR instr(data, '[') OR data_exact IS NOT NULL)"
        " AND (((method_name = ?)) OR ((robot_id <> ?)))"
    )
    assert args == ["temp1", "a", "b", int(T0.timestamp()) * 10**9, 3, "A", "r"]


def test_pushdown_in_postgresql() -> None:
    """jsonb for `data.`: strings as bytewise text, numbers as exact numerics; arrays
    and NaN-bearing rows always pass (Python decides)."""
    sql, args = pushdown(
        {
            "component_name": "temp1",
            "data.readings.temp_c": {"$gt": 3.5, "$in": ["a", 2]},
            "data.x": float("nan"),  # not translated
        },
        "postgresql",
    )
    opaque = "strpos(data, '[') > 0 OR data_exact IS NOT NULL"
    assert sql == (
        "(component_name = ?)"
        f" AND ((data::jsonb #> ?::text[]) > to_jsonb(?::numeric) OR {opaque})"
        ' AND ((data::jsonb #>> ?::text[]) COLLATE "C" = ?'
        f" OR (data::jsonb #> ?::text[]) = to_jsonb(?::numeric) OR {opaque})"
    )
    path = ["readings", "temp_c"]
    assert args == ["temp1", path, "3.5", path, "a", path, "2"]


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"tags": "x"},
        {"component_name": 5},
        {"component_name": {"$exists": True}},
        {"$or": [{"component_name": "a"}, {"tags": "x"}]},
        {"data.readings.temp_c": {"$ne": 3}},
        {"data.a-b": 1},
        {"$nor": [{"component_name": "a"}]},
    ],
)
def test_pushdown_leaves_the_rest_to_python(spec: Doc) -> None:
    assert pushdown(spec) == ("", [])


NAMES = st.sampled_from(["temp1", "temp2", "temp3", "motor1", "temp0", "zzz", "Temp1", ""])
# Row i is stored at T0 + secs + i µs (received +789 ns, requested -1 µs): probe the edges.
ROW_TIMES = [at(secs, i) for i, (*_, secs, _) in enumerate(A_ROWS) if secs is not None]
TIMES = st.one_of(
    st.builds(
        lambda t, d: t + dt.timedelta(microseconds=d),
        st.sampled_from(ROW_TIMES),
        st.integers(-2, 2),
    ),
    st.integers(min_value=-10, max_value=300).map(at),
)
NUMBERS = st.sampled_from([21.5, 22, 30.0, -5.25, 99, 2, 0, 40, 1000])
TYPED: dict[str, st.SearchStrategy[Any]] = {
    "component_name": NAMES,
    "component_type": st.sampled_from(["sensor", "motor", "x"]),
    "part_id": st.sampled_from(["part-1", "part-2", "part-3", "part-b"]),
    "method_name": st.sampled_from(["Readings", "Position", "readings"]),
    "time_received": TIMES,
    "time_requested": TIMES,
    "data.readings.temp_c": NUMBERS,
    "data.readings.mode": st.sampled_from(["auto", "manual"]),
    "data.extra": NUMBERS,
    "tags": st.sampled_from(["indoor", "calib", "outdoor", "secret"]),
    "_id": st.sampled_from(["1", "2", "4", "9"]),
}
ANY_VALUE = st.one_of(NAMES, NUMBERS, TIMES, st.none(), st.booleans(), st.text(max_size=3))
OPS = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists"])


@st.composite
def conditions(draw: st.DrawFn) -> Doc:
    """One field condition; values mostly of the field's own type so filters bite."""
    field = draw(st.sampled_from(sorted(TYPED)))

    def value() -> Any:
        return draw(ANY_VALUE if draw(st.integers(0, 4)) == 0 else TYPED[field])

    op = draw(OPS)
    if op in ("$in", "$nin"):
        arg: Any = [value() for _ in range(draw(st.integers(0, 3)))]
    elif op == "$exists":
        arg = draw(st.booleans())
    else:
        arg = value()
    if op == "$eq" and draw(st.booleans()):
        return {field: arg}
    cond: Doc = {op: arg}
    if draw(st.integers(0, 4)) == 0:
        cond = {"$not": cond}
    return {field: cond}


filters = st.recursive(
    conditions(),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"$and": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"$or": xs}),
        st.lists(inner, min_size=1, max_size=2).map(lambda xs: {"$nor": xs}),
        st.lists(inner, min_size=1, max_size=3).map(
            lambda xs: {k: v for x in xs for k, v in x.items()}
        ),
    ),
    max_leaves=5,
)


conjunctions = st.lists(conditions(), min_size=1, max_size=3).map(
    lambda xs: {k: v for x in xs for k, v in x.items()}
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.one_of(conjunctions, filters))
def test_pushdown_never_changes_answers(db: MqlTarget, all_docs: list[Doc], spec: Doc) -> None:
    """SQL may only narrow: the pushed-down run equals the pure evaluator over all docs."""
    pipeline = [{"$match": spec}]
    assert db.run(ORG_A, pipeline) == list(run_pipeline(all_docs, pipeline))


def test_time_pushdown_exact_at_microsecond_edges(db: MqlTarget, all_docs: list[Doc]) -> None:
    """Stored ns floor to µs; every bound around every stored instant must agree."""
    for field in ("time_received", "time_requested"):
        for base in ROW_TIMES:
            for delta in range(-2, 3):
                when = base + dt.timedelta(microseconds=delta)
                for op in ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte"):
                    pipeline = [{"$match": {field: {op: when}}}]
                    want = list(run_pipeline(all_docs, pipeline))
                    assert db.run(ORG_A, pipeline) == want, (field, op, when)
