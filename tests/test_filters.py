"""Filter -> SQL translation, table-tested against a small in-memory index.

Each case runs the generated WHERE clause on real rows, so what is checked is which
rows match (the contract), not the SQL text.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged.ingest import filters
from edged.ingest.storage import SCHEMA, migrate

S = 1_000_000_000

# name, org, location, part, component type/name, method, tags, datasets, captured (s)
READINGS = [
    ("r1", "org-1", "loc-a", "p1", "sensor", "temp", "Readings", ["a"], ["ds1"], 10),
    ("r2", "org-1", "loc-b", "p1", "sensor", "hum", "Readings", ["a", "b"], [], 20),
    ("r3", "org-1", "loc-a", "p2", "movement", "imu", "Position", [], [], 30),
    ("r4", "org-2", "loc-a", "p1", "sensor", "temp", "Readings", ["a"], ["ds1"], 40),
]
# name, org, part, component, mime, live tags, bbox labels, datasets, captured (s)
BINARIES = [
    ("b1", "org-1", "p1", "cam", "image/jpeg", ["x"], ["cat"], ["ds1"], 10),
    ("b2", "org-1", "p1", "cam", "image/png", ["x", "y"], ["dog", "cat"], [], 20),
    ("b3", "org-1", "p2", "lidar", "pointcloud/pcd", [], [], ["ds2"], 30),
    ("b4", "org-2", "p1", "cam", "image/jpeg", ["x"], ["cat"], ["ds1"], 40),
]


@pytest.fixture(scope="module")
def db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:")
    conn.executescript(SCHEMA)
    migrate(conn)
    for name, org, loc, part, ctype, cname, method, tags, dss, t in READINGS:
        conn.execute(
            "INSERT INTO readings(upload_id, org_id, location_id, part_id, component_type,"
            " component_name, method_name, method_parameters, tags, dataset_ids,"
            " time_requested_ns, data, received_at_ns, time_captured_ns)"
            " VALUES (?,?,?,?,?,?,?,'{}',?,?,?,?,0,?)",
            (name, org, loc, part, ctype, cname, method, json.dumps(tags), json.dumps(dss),
             t * S, "{}", t * S),
        )  # fmt: skip
    for name, org, part, cname, mime, tags, labels, dss, t in BINARIES:
        conn.execute(
            "INSERT INTO binaries(binary_data_id, file_id, upload_id, org_id, kind, part_id,"
            " component_type, component_name, method_name, method_parameters, file_name,"
            " file_extension, mime_type, tags, dataset_ids, size, sha256, blob_path,"
            " received_at_ns, time_captured_ns)"
            " VALUES (?,?,?,?,'binary',?,'camera',?,'GetImages','{}','','',?,'[]','[]',0,'',"
            " '',0,?)",
            (name, name, name, org, part, cname, mime, t * S),
        )
        conn.executemany("INSERT INTO binary_tags VALUES (?,?)", [(name, x) for x in tags])
        conn.executemany(
            "INSERT INTO bboxes VALUES (?,?,?,0,0,1,1,NULL)",
            [(f"{name}-{x}", name, x) for x in labels],
        )
        conn.executemany("INSERT INTO dataset_members VALUES (?,?)", [(d, name) for d in dss])
    yield conn
    conn.close()


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def tags(kind: int, *values: str) -> dpb.TagsFilter:
    return dpb.TagsFilter(type=kind, tags=list(values))  # type: ignore[arg-type]


READING_CASES: list[tuple[str, dpb.Filter, set[str]]] = [
    ("empty filter = the whole org", dpb.Filter(), {"r1", "r2", "r3"}),
    ("component_name", dpb.Filter(component_name="temp"), {"r1"}),
    ("component_type", dpb.Filter(component_type="sensor"), {"r1", "r2"}),
    ("method", dpb.Filter(method="Position"), {"r3"}),
    ("part_id", dpb.Filter(part_id="p1"), {"r1", "r2"}),
    ("location_ids", dpb.Filter(location_ids=["loc-b", "loc-x"]), {"r2"}),
    ("own org named", dpb.Filter(organization_ids=["org-1"]), {"r1", "r2", "r3"}),
    ("other org named", dpb.Filter(organization_ids=["org-2"]), set()),
    (
        "interval [start, end)",
        dpb.Filter(interval=dpb.CaptureInterval(start=_ts(10), end=_ts(30))),
        {"r1", "r2"},
    ),
    ("interval start only", dpb.Filter(interval=dpb.CaptureInterval(start=_ts(20))), {"r2", "r3"}),
    ("tags by OR", dpb.Filter(tags_filter=tags(1, "b", "zz")), {"r2"}),
    ("tags unspecified with tags = OR", dpb.Filter(tags_filter=tags(0, "a")), {"r1", "r2"}),
    ("tags unspecified without tags = any", dpb.Filter(tags_filter=tags(0)), {"r1", "r2", "r3"}),
    ("tagged", dpb.Filter(tags_filter=tags(2)), {"r1", "r2"}),
    ("untagged", dpb.Filter(tags_filter=tags(3)), {"r3"}),
    ("dataset_id", dpb.Filter(dataset_id="ds1"), {"r1"}),
    ("bbox labels never match readings", dpb.Filter(bbox_labels=["cat"]), set()),
    (
        "mime types are ignored for readings",
        dpb.Filter(mime_type=["image/png"]),
        {"r1", "r2", "r3"},
    ),
    ("combined", dpb.Filter(component_type="sensor", tags_filter=tags(1, "b")), {"r2"}),
]

BINARY_CASES: list[tuple[str, dpb.Filter, set[str]]] = [
    ("empty filter = the whole org", dpb.Filter(), {"b1", "b2", "b3"}),
    ("component_name", dpb.Filter(component_name="cam"), {"b1", "b2"}),
    ("mime_type", dpb.Filter(mime_type=["image/png", "pointcloud/pcd"]), {"b2", "b3"}),
    ("tags by OR", dpb.Filter(tags_filter=tags(1, "y")), {"b2"}),
    ("tagged", dpb.Filter(tags_filter=tags(2)), {"b1", "b2"}),
    ("untagged", dpb.Filter(tags_filter=tags(3)), {"b3"}),
    ("bbox_labels", dpb.Filter(bbox_labels=["dog"]), {"b2"}),
    ("bbox_labels any of", dpb.Filter(bbox_labels=["cat", "dog"]), {"b1", "b2"}),
    ("dataset_id", dpb.Filter(dataset_id="ds1"), {"b1"}),
    ("other org named", dpb.Filter(organization_ids=["org-2"]), set()),
    ("interval end", dpb.Filter(interval=dpb.CaptureInterval(end=_ts(20))), {"b1"}),
]


@pytest.mark.parametrize(("name", "f", "want"), READING_CASES, ids=[c[0] for c in READING_CASES])
def test_reading_filters(db: sqlite3.Connection, name: str, f: dpb.Filter, want: set[str]) -> None:
    w = filters.reading_where(f, "org-1")
    got = {r[0] for r in db.execute(f"SELECT upload_id FROM readings WHERE {w.sql}", w.params)}
    assert got == want


@pytest.mark.parametrize(("name", "f", "want"), BINARY_CASES, ids=[c[0] for c in BINARY_CASES])
def test_binary_filters(db: sqlite3.Connection, name: str, f: dpb.Filter, want: set[str]) -> None:
    w = filters.binary_where(f, "org-1")
    sql = f"SELECT binary_data_id FROM binaries WHERE {w.sql}"
    assert {r[0] for r in db.execute(sql, w.params)} == want


def test_org_scope_comes_from_the_caller_not_the_filter(db: sqlite3.Connection) -> None:
    w = filters.binary_where(dpb.Filter(organization_ids=["org-1", "org-2"]), "org-2")
    sql = f"SELECT binary_data_id FROM binaries WHERE {w.sql}"
    assert {r[0] for r in db.execute(sql, w.params)} == {"b4"}
    assert filters.binary_where(None, "org-1") == filters.binary_where(dpb.Filter(), "org-1")


def test_delete_tabular_filter(db: sqlite3.Connection) -> None:
    f = dpb.DeleteTabularFilter(component_type="sensor", tags_filter=tags(1, "a"))
    w = filters.delete_tabular_where(f, "org-1", 15 * S)
    got = {r[0] for r in db.execute(f"SELECT upload_id FROM readings WHERE {w.sql}", w.params)}
    assert got == {"r1"}
    w = filters.delete_tabular_where(None, "org-1", None)
    assert len(db.execute(f"SELECT * FROM readings WHERE {w.sql}", w.params).fetchall()) == 3


@pytest.mark.parametrize(
    ("f", "field"),
    [
        (dpb.Filter(interval=dpb.CaptureInterval(start=_ts(5), end=_ts(5))), "filter.interval"),
        (dpb.Filter(tags_filter=tags(9)), "filter.tags_filter.type"),
    ],
)
def test_bad_filters_name_the_field(f: dpb.Filter, field: str) -> None:
    with pytest.raises(filters.FilterError, match=field.replace(".", r"\.")):
        filters.reading_where(f, "org-1")


def test_page_tokens_round_trip_and_reject_forgeries() -> None:
    c = filters.Cursor(1_714_979_289_123_456_789, 42)
    assert filters.decode_token(filters.encode_token(c)) == c
    assert filters.decode_token("") is None
    for bad in ("42", "e1.!!!", "e1." + "bm90LWEtY3Vyc29y"):
        with pytest.raises(filters.FilterError, match=r"data_request\.last"):
            filters.decode_token(bad)


@pytest.mark.parametrize(
    "order", [dpb.ORDER_UNSPECIFIED, dpb.ORDER_ASCENDING, dpb.ORDER_DESCENDING]
)
def test_paging_visits_every_row_once(db: sqlite3.Connection, order: int) -> None:
    w = filters.reading_where(None, "org-1")
    seen: list[str] = []
    cursor: filters.Cursor | None = None
    while True:
        extra, params, order_by = filters.page_clause("readings", order, cursor)
        sql = f"SELECT upload_id, time_captured_ns, rowid FROM readings WHERE {w.sql}"
        sql += f" AND {extra}" if extra else ""
        rows = db.execute(f"{sql} ORDER BY {order_by} LIMIT 2", (*w.params, *params)).fetchall()
        if not rows:
            break
        seen += [r[0] for r in rows]
        cursor = filters.Cursor(rows[-1][1], rows[-1][2])
    want = ["r1", "r2", "r3"]
    assert seen == (want[::-1] if order == dpb.ORDER_DESCENDING else want)
    with pytest.raises(filters.FilterError, match="sort_order"):
        filters.page_clause("readings", 7, None)
