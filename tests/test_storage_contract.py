"""One storage contract, every backend: each test runs unchanged against the SQLite index
(`--data DIR`) and the PostgreSQL index (`--database`, a real server from conftest), as
litestream tests every replica client. A behaviour of the index belongs here."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.data.v1.data_grpc import DataServiceStub
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import UploadClient, upload_metadata
from edged.errors import UploadError
from edged.ingest import IngestServer, IngestSettings, IngestStore, catalog, retention, storage
from edged.ingest.catalog import Conn
from edged.ingest.filters import (
    Cursor,
    Where,
    binary_where,
    decode_token,
    delete_tabular_where,
    encode_token,
    reading_where,
)
from edged.ingest.retention import Expired

ORG, ORG2 = "org-a", "org-b"
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IngestStore]:
    database = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = await IngestStore.open(tmp_path / "ingest", synchronous="OFF", database=database)
    assert s.dialect == request.param
    try:
        yield s
    finally:
        await s.close()


def reading(value: float, at_s: int | None = None) -> pb.SensorData:
    r = pb.SensorData()
    r.struct.update({"v": value})
    if at_s is not None:
        r.metadata.time_requested.CopyFrom(Timestamp(seconds=at_s))
    return r


def tabular_meta(component: str = "imu", tags: list[str] | None = None) -> pb.UploadMetadata:
    return upload_metadata(
        "part-1",
        pb.DATA_TYPE_TABULAR_SENSOR,
        component_type="rdk:component:movement_sensor",
        component_name=component,
        method_name="Readings",
        method_params={"n": 3},
        tags=tags,
    )


async def put_blob(
    store: IngestStore,
    org: str,
    payload: bytes = b"bytes",
    *,
    item_id: str | None = None,
    tags: list[str] | None = None,
    mime: str = "image/jpeg",
    boxes: list[tuple[str, str]] | None = None,
    at_s: int | None = None,
    dataset_ids: list[str] | None = None,
) -> str:
    meta = upload_metadata(
        "part-1",
        pb.DATA_TYPE_BINARY_SENSOR,
        component_name="cam",
        tags=tags,
        file_name="f",
        dataset_ids=dataset_ids,
    )
    sensor = pb.SensorMetadata()
    if at_s is not None:
        sensor.time_requested.CopyFrom(Timestamp(seconds=at_s))
    for box_id, label in boxes or []:
        sensor.annotations.bboxes.add(
            id=box_id, label=label, x_min_normalized=0, y_min_normalized=0,
            x_max_normalized=1, y_max_normalized=1,
        )  # fmt: skip
    blob = await store.new_blob(org)
    try:
        await blob.write(payload)
        ids = await store.store_blob(org, item_id, "binary", meta, sensor, blob, mime)
    finally:
        await blob.discard()
    return ids.binary_data_id


def where_binaries(org: str, **fields: Any) -> Where:
    return binary_where(dpb.Filter(**fields), org)


# -- schema -----------------------------------------------------------------------------------

_COLUMNS_SQL = {
    "sqlite": 'SELECT name, "notnull" FROM pragma_table_info(?) ORDER BY cid',
    "postgresql": "SELECT column_name, is_nullable = 'NO' FROM information_schema.columns"
    " WHERE table_schema = 'public' AND table_name = ? ORDER BY ordinal_position",
}
_ROW_KEY = {
    "sqlite": {"uploads": [], "readings": ["id"], "binaries": []},
    "postgresql": {"uploads": [], "readings": ["rowid"], "binaries": ["rowid"]},
}


@pytest.mark.parametrize(
    ("table", "declared"),
    [
        ("uploads", storage.UPLOADS_COLUMNS_DDL),
        ("readings", storage.READINGS_COLUMNS_DDL),
        ("binaries", storage.BINARIES_COLUMNS_DDL),
    ],
)
async def test_upload_tables_have_the_declared_columns(
    store: IngestStore, table: str, declared: str
) -> None:
    """One declaration of the upload tables' columns: every backend holds exactly these,
    in this order, after its own row key, NOT NULL where declared."""
    lines = declared.split(",\n")
    rows = await store.read(lambda c: c.execute(_COLUMNS_SQL[store.dialect], (table,)).fetchall())
    key = _ROW_KEY[store.dialect][table]
    assert [str(r[0]) for r in rows] == key + [line.split()[0] for line in lines]
    not_null = {str(name) for name, flag in rows if flag}
    assert {line.split()[0] for line in lines if "NOT NULL" in line} <= not_null


# -- uploads and de-duplication ---------------------------------------------------------------


async def test_item_id_is_stored_once_and_answers_the_first_ids(store: IngestStore) -> None:
    first = await store.store_tabular(ORG, "item-1", tabular_meta(), [reading(1.0, 10)])
    again = await store.store_tabular(ORG, "item-1", tabular_meta(), [reading(2.0, 11)])
    other_org = await store.store_tabular(ORG2, "item-1", tabular_meta(), [reading(3.0, 12)])
    assert again == first != other_org
    assert await store.find_upload(ORG, "item-1") == first
    assert await store.find_upload(ORG, "item-2") is None
    assert [r.data for r in await store.readings(ORG)] == [{"v": 1.0}]
    assert (await store.counts())["readings"] == 2


async def test_concurrent_retries_of_one_item_store_it_once(store: IngestStore) -> None:
    """The unique constraint decides, not a check before the insert."""
    results = await asyncio.gather(
        *(store.store_tabular(ORG, "same", tabular_meta(), [reading(i, i)]) for i in range(8))
    )
    assert len(set(results)) == 1
    assert len(await store.readings(ORG)) == 1


async def test_repeated_blob_keeps_one_row_and_one_file(store: IngestStore) -> None:
    a = await put_blob(store, ORG, b"one", item_id="blob-1")
    b = await put_blob(store, ORG, b"two", item_id="blob-1")
    assert a == b
    [row] = await store.binaries(ORG)
    assert row.path.read_bytes() == b"one"
    files = [p for p in (store.root / "blobs").rglob("*") if p.is_file()]
    assert files == [row.path]


async def test_values_round_trip_exactly(store: IngestStore) -> None:
    r = pb.SensorData()
    r.struct.update({"nan": math.nan, "nested": {"list": [1, "x", None, True]}, "s": "é\u2028"})
    await store.store_tabular(ORG, None, tabular_meta(tags=["t1"]), [r])
    [got] = await store.readings(ORG)
    assert math.isnan(got.data["nan"])
    assert got.data["nested"] == {"list": [1, "x", None, True]} and got.data["s"] == "é\u2028"
    assert got.tags == ["t1"] and got.component_name == "imu"


# -- paging and filters -----------------------------------------------------------------------


async def test_pages_cover_every_reading_once_in_both_orders(store: IngestStore) -> None:
    # ties on capture time are broken by rowid; one upload per batch of equal times
    for batch in range(5):
        await store.store_tabular(
            ORG, None, tabular_meta(), [reading(batch * 10 + i, 1000 + batch) for i in range(3)]
        )
    await store.store_tabular(ORG2, None, tabular_meta(), [reading(-1, 1000)])
    where = reading_where(None, ORG)
    for order in (dpb.ORDER_ASCENDING, dpb.ORDER_DESCENDING):
        seen: list[float] = []
        token = ""
        for _ in range(20):
            page = functools.partial(
                catalog.page_readings, where=where, order=order, cursor=decode_token(token), limit=4
            )
            rows = await store.read(page)
            if not rows:
                break
            seen += [json.loads(r.data)["v"] for r in rows]
            token = encode_token(Cursor(rows[-1].time_captured_ns, rows[-1].rowid))
        expected = [float(b * 10 + i) for b in range(5) for i in range(3)]
        assert seen == (expected if order == dpb.ORDER_ASCENDING else expected[::-1])
    count, size = await store.read(lambda c: catalog.count_readings(c, where))
    assert count == 15 and size > 0


async def test_reading_filters(store: IngestStore) -> None:
    await store.store_tabular(ORG, None, tabular_meta("imu", ["a"]), [reading(1, 100)])
    await store.store_tabular(ORG, None, tabular_meta("gps", ["b", "c"]), [reading(2, 200)])
    await store.store_tabular(ORG, None, tabular_meta("gps"), [reading(3, 300)])

    async def values(f: dpb.Filter) -> list[str]:
        where = reading_where(f, ORG)
        rows = await store.read(lambda c: catalog.page_readings(c, where, 0, None, 100))
        return [r.data for r in rows]

    assert len(await values(dpb.Filter(component_name="gps"))) == 2
    iv = dpb.CaptureInterval(start=Timestamp(seconds=150), end=Timestamp(seconds=300))
    assert await values(dpb.Filter(interval=iv)) == ['{"v": 2.0}']
    by_tag = dpb.Filter(tags_filter=dpb.TagsFilter(tags=["c", "zz"]))
    assert await values(by_tag) == ['{"v": 2.0}']
    tagged = dpb.Filter(tags_filter=dpb.TagsFilter(type=dpb.TAGS_FILTER_TYPE_TAGGED))
    assert len(await values(tagged)) == 2
    untagged = dpb.Filter(tags_filter=dpb.TagsFilter(type=dpb.TAGS_FILTER_TYPE_UNTAGGED))
    assert await values(untagged) == ['{"v": 3.0}']
    assert await values(dpb.Filter(organization_ids=[ORG2])) == []
    assert await values(dpb.Filter(bbox_labels=["x"])) == []


async def test_binary_filters_tags_and_labels(store: IngestStore) -> None:
    a = await put_blob(store, ORG, tags=["b-tag", "a-tag"], boxes=[("1", "cat")], at_s=10)
    b = await put_blob(store, ORG, mime="image/png", boxes=[("1", "Dog")], at_s=20)
    await put_blob(store, ORG2, tags=["secret"], boxes=[("1", "hidden")], at_s=30)

    async def ids(where: Where) -> list[str]:
        rows = await store.read(lambda c: catalog.page_binaries(c, where, 0, None, 100))
        return [r.binary_data_id for r in rows]

    assert await ids(where_binaries(ORG)) == [a, b]
    assert await ids(where_binaries(ORG, mime_type=["image/png"])) == [b]
    assert await ids(where_binaries(ORG, bbox_labels=["cat"])) == [a]
    assert await ids(where_binaries(ORG, tags_filter=dpb.TagsFilter(tags=["a-tag"]))) == [a]
    # bytewise order on both backends: upper case before lower case
    assert await store.read(lambda c: catalog.tags_where(c, where_binaries(ORG))) == [
        "a-tag",
        "b-tag",
    ]
    labels = await store.read(lambda c: catalog.labels_where(c, where_binaries(ORG)))
    assert labels == ["Dog", "cat"]
    count, size = await store.read(lambda c: catalog.count_binaries(c, where_binaries(ORG)))
    assert (count, size) == (2, 10)


# -- curation ---------------------------------------------------------------------------------


async def test_tags_by_ids_and_by_filter(store: IngestStore) -> None:
    a = await put_blob(store, ORG, tags=["keep"])
    b = await put_blob(store, ORG, mime="image/png")
    await store.write(lambda c: catalog.add_tags(c, ORG, [a, b], ["x", "keep"]))
    removed = await store.write(lambda c: catalog.remove_tags(c, ORG, [a], ["x", "none"]))
    assert removed == 1
    png = where_binaries(ORG, mime_type=["image/png"])
    await store.write(lambda c: catalog.add_tags_where(c, png, ["png"]))
    assert await store.write(lambda c: catalog.remove_tags_where(c, png, ["x"])) == 1
    rows = await store.read(lambda c: catalog.binaries_by_ids(c, ORG, [b, a]))
    assert [(r.binary_data_id, r.tags) for r in rows] == [(b, ["keep", "png"]), (a, ["keep"])]


async def test_bounding_boxes(store: IngestStore) -> None:
    a = await put_blob(store, ORG, boxes=[("b1", "z"), ("b0", "y")])
    other = await put_blob(store, ORG, boxes=[("b1", "same id, other binary")])
    new = await store.write(lambda c: catalog.add_bbox(c, ORG, a, "x", (0, 0, 0.5, 0.5), 0.9))
    await store.write(lambda c: catalog.remove_bbox(c, ORG, a, "b0"))
    with pytest.raises(catalog.NotFound, match="bbox_id 'b0'"):
        await store.write(lambda c: catalog.remove_bbox(c, ORG, a, "b0"))
    [row, row2] = await store.read(lambda c: catalog.binaries_by_ids(c, ORG, [a, other]))
    assert row.bboxes == [("b1", "z", 0, 0, 1, 1, None), (new, "x", 0, 0, 0.5, 0.5, 0.9)]
    assert [b[0] for b in row2.bboxes] == ["b1"]


async def test_datasets_and_members(store: IngestStore) -> None:
    a = await put_blob(store, ORG)
    ds = await store.write(lambda c: catalog.create_dataset(c, ORG, "set"))
    ds2 = await store.write(lambda c: catalog.create_dataset(c, ORG, "other"))
    await store.write(lambda c: catalog.create_dataset(c, ORG2, "set"))  # per-org names
    with pytest.raises(catalog.Conflict):
        await store.write(lambda c: catalog.create_dataset(c, ORG, "set"))
    with pytest.raises(catalog.Conflict):
        await store.write(lambda c: catalog.rename_dataset(c, ORG, ds2, "set"))
    await store.write(lambda c: catalog.rename_dataset(c, ORG, ds2, "renamed"))
    listed = await store.read(lambda c: catalog.list_datasets(c, ORG))
    assert [(d.id, d.name) for d in listed] == [(ds, "set"), (ds2, "renamed")]
    b = await put_blob(store, ORG, dataset_ids=[ds])
    await store.write(lambda c: catalog.add_members(c, ORG, ds, [a, a]))
    in_ds = await store.read(
        lambda c: catalog.page_binaries(c, where_binaries(ORG, dataset_id=ds), 0, None, 10)
    )
    assert {r.binary_data_id for r in in_ds} == {a, b}
    assert all(r.dataset_ids == [ds] for r in in_ds)
    await store.write(lambda c: catalog.remove_members(c, ORG, ds, [b]))
    await store.write(lambda c: catalog.delete_dataset(c, ORG, ds))
    with pytest.raises(catalog.NotFound):
        await store.read(lambda c: catalog.get_dataset(c, ORG, ds))
    [row] = await store.read(lambda c: catalog.binaries_by_ids(c, ORG, [a]))
    assert row.dataset_ids == []


async def test_upload_into_another_orgs_dataset_is_refused(store: IngestStore) -> None:
    theirs = await store.write(lambda c: catalog.create_dataset(c, ORG2, "theirs"))
    meta = tabular_meta()
    meta.dataset_ids.append(theirs)
    with pytest.raises(catalog.NotFound, match=theirs):
        await store.store_tabular(ORG, "x", meta, [reading(1)])
    with pytest.raises(catalog.NotFound):
        await put_blob(store, ORG, dataset_ids=[theirs])
    assert await store.counts() == {"uploads": 0, "readings": 0, "binaries": 0}
    assert [p for p in (store.root / "blobs").rglob("*") if p.is_file()] == []


# -- deletes and organisation scoping ---------------------------------------------------------


async def test_deletes(store: IngestStore) -> None:
    a = await put_blob(store, ORG, tags=["t"], boxes=[("1", "l")])
    b = await put_blob(store, ORG, mime="image/png")
    c2 = await put_blob(store, ORG, mime="image/png")
    paths = await store.write(lambda c: catalog.delete_binaries(c, ORG, [a]))
    assert len(paths) == 1 and paths[0].startswith("blobs/")
    png = where_binaries(ORG, mime_type=["image/png"])
    assert len(await store.write(lambda c: catalog.delete_binaries_where(c, png))) == 2
    with pytest.raises(catalog.NotFound):
        await store.read(lambda c: catalog.binaries_by_ids(c, ORG, [b]))
    assert c2 and await store.read(lambda c: catalog.tags_where(c, where_binaries(ORG))) == []
    for at in (100, 200, 300):
        await store.store_tabular(ORG, None, tabular_meta(), [reading(at, at)])
    await store.store_tabular(ORG2, None, tabular_meta(), [reading(0, 1)])
    old = delete_tabular_where(None, ORG, 250 * 10**9)
    assert await store.write(lambda c: catalog.delete_readings_where(c, old)) == 2
    assert [r.data for r in await store.readings(ORG)] == [{"v": 300.0}]
    assert len(await store.readings(ORG2)) == 1


async def test_ids_of_another_org_are_not_found(store: IngestStore) -> None:
    theirs = await put_blob(store, ORG2)
    ds = await store.write(lambda c: catalog.create_dataset(c, ORG2, "theirs"))
    file_id = (await store.binaries(ORG2))[0].file_id
    calls = [
        lambda c: catalog.binaries_by_ids(c, ORG, [theirs]),
        lambda c: catalog.resolve_file_ids(c, ORG, [file_id]),
        lambda c: catalog.get_dataset(c, ORG, ds),
        lambda c: catalog.add_tags(c, ORG, [theirs], ["x"]),
        lambda c: catalog.delete_binaries(c, ORG, [theirs]),
        lambda c: catalog.add_members(c, ORG, ds, [theirs]),
    ]
    for call in calls:
        with pytest.raises(catalog.NotFound):
            await store.write(call)
    assert await store.read(lambda c: catalog.resolve_file_ids(c, ORG2, [file_id])) == [theirs]


async def test_database_users(store: IngestStore) -> None:
    assert not await store.read(lambda c: catalog.has_database_user(c, ORG))
    for password in ("pw-1", "pw-2"):
        salted = catalog.new_password_hash(password)
        await store.write(functools.partial(catalog.set_database_user, org_id=ORG, salted=salted))
    assert await store.read(lambda c: catalog.has_database_user(c, ORG))
    assert not await store.read(lambda c: catalog.has_database_user(c, ORG2))


async def test_a_failed_write_changes_nothing(store: IngestStore) -> None:
    def half(conn: Conn) -> None:
        catalog.create_dataset(conn, ORG, "half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.write(half)
    assert await store.read(lambda c: catalog.list_datasets(c, ORG)) == []


# -- retention ----------------------------------------------------------------------------------


def _s(year: int, month: int, day: int) -> int:
    return int(datetime(year, month, day, tzinfo=UTC).timestamp())


# A month boundary: PostgreSQL drops whole months, so both backends agree exactly there.
CUTOFF_S = _s(2026, 3, 1)
AGED = [(ORG, 1.0, _s(2026, 1, 10)), (ORG, 2.0, _s(2026, 2, 27)), (ORG2, 3.0, _s(2026, 1, 15))]
KEPT = [(ORG, 4.0, _s(2026, 3, 5)), (ORG2, 5.0, _s(2026, 4, 1))]


async def _store_aged_and_kept(store: IngestStore, as_org: str = ORG) -> None:
    for org, value, at_s in AGED + KEPT:
        owner = as_org if org == ORG else org
        await store.store_tabular(owner, None, tabular_meta(), [reading(value, at_s)])


async def _values(store: IngestStore, org: str) -> list[float]:
    return sorted(r.data["v"] for r in await store.readings(org))


async def test_retention_removes_readings_captured_before_the_cutoff(
    store: IngestStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH", 1)  # SQLite's batches: one row a transaction
    await _store_aged_and_kept(store)
    expired = await store.expire_readings(CUTOFF_S * 10**9)
    assert expired.readings == len(AGED)
    assert await _values(store, ORG) == [4.0] and await _values(store, ORG2) == [5.0]
    where = reading_where(None, ORG)
    assert (await store.read(lambda c: catalog.count_readings(c, where)))[0] == 1
    assert await store.expire_readings(CUTOFF_S * 10**9) == Expired()  # nothing left to do


@pytest.mark.parametrize("backend", BACKENDS)
async def test_retention_runs_in_the_server_on_its_clock(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """`--retention` with an injected clock (never the real date): the run is counted,
    and the filter API no longer sees the aged readings."""
    database = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    store = await IngestStore.open(tmp_path / "ingest", synchronous="OFF", database=database)
    try:
        await _store_aged_and_kept(store, as_org="")  # the open server's organisation
    finally:
        await store.close()
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        database=database,
        synchronous="OFF",
        shutdown_grace_s=1,
        retention_s=10 * 86400,
        clock=lambda: CUTOFF_S + 10 * 86400,
    )
    async with IngestServer(settings) as server:
        runs = server.metrics.retention_runs.labels("ok")
        for _ in range(3000):  # bounded: 30 s
            if runs._value.get() >= 1:
                break
            await asyncio.sleep(0.01)
        assert runs._value.get() == 1
        assert server.metrics.expired_readings._value.get() == len(AGED)
        async with UploadClient(f"127.0.0.1:{server.port}", tls=False) as up:
            got = await DataServiceStub(up.channel).TabularDataByFilter(
                dpb.TabularDataByFilterRequest(data_request=dpb.DataRequest(limit=100)),
                metadata=await up.metadata(),
            )
    assert [d.data["v"] for d in got.data] == [4.0]


# -- text no index can hold (through the services) -------------------------------------------


@pytest.fixture(params=BACKENDS)
async def open_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[int]:
    database = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    settings = IngestSettings(
        data_dir=tmp_path / "ingest", database=database, synchronous="OFF", shutdown_grace_s=1
    )
    async with IngestServer(settings) as server:
        yield server.port


async def test_nul_characters_are_refused_naming_the_field(open_server: int) -> None:
    """PostgreSQL text cannot hold U+0000: both backends refuse it up front, as the
    caller's mistake (INVALID_ARGUMENT, dead-lettered by the daemon), never a fault that
    would be retried for ever."""
    async with UploadClient(f"127.0.0.1:{open_server}", tls=False) as up:
        bad_tag = tabular_meta(tags=["ok", "a\x00b"])
        with pytest.raises(UploadError, match=r"metadata\.tags\[1\] contains a NUL") as err:
            await up.upload_readings(bad_tag, [reading(1, 1).SerializeToString()])
        assert err.value.status == Status.INVALID_ARGUMENT
        bad_part = tabular_meta()
        bad_part.component_name = "imu\x00"
        with pytest.raises(UploadError, match=r"metadata\.component_name contains a NUL"):
            await up.upload_readings(bad_part, [reading(1, 1).SerializeToString()])
        data = DataServiceStub(up.channel)
        md = await up.metadata()
        request = dpb.TabularDataByFilterRequest(
            data_request=dpb.DataRequest(filter=dpb.Filter(component_name="imu\x00"))
        )
        with pytest.raises(GRPCError) as grpc_err:
            await data.TabularDataByFilter(request, metadata=md)
        assert grpc_err.value.status == Status.INVALID_ARGUMENT
        assert await up.upload_readings(tabular_meta(), [reading(1, 1).SerializeToString()])
