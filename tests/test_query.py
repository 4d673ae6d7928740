"""The query API (DataService + DatasetService) against a real `edged ingest` on loopback.

Data goes in through `UploadClient` exactly as the daemon sends it, and comes back out
through the generated grpclib stubs with the same bearer-token handshake. Two API keys
of two organisations prove the isolation: the second sees nothing of the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import bson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.const import Status

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.dataset.v1 import dataset_pb2 as spb
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import sensor_metadata, upload_metadata
from edged.ingest import IngestServer, IngestStore
from tests.support.credentials import Certs
from tests.support.query_api import (
    LOC,
    ORG,
    ORG2,
    Api,
    at,
    binary_req,
    status_of,
    tabular_req,
    two_orgs,
)


@pytest.fixture
async def server(tmp_path: Path, certs: Certs) -> AsyncIterator[tuple[IngestServer, Api, Api]]:
    async with two_orgs(tmp_path, certs, location=LOC) as srv:
        yield srv


@pytest.fixture(params=["sqlite", "postgresql"])
async def either(
    request: pytest.FixtureRequest, tmp_path: Path, certs: Certs
) -> AsyncIterator[tuple[IngestServer, Api, Api]]:
    """`server` on either index: for the SQL/MQL calls, whose engines differ by backend."""
    database = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    async with two_orgs(tmp_path, certs, location=LOC, database=database) as srv:
        yield srv


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(at(seconds))
    return t


async def upload_readings(
    api: Api, component: str, seqs: range, *, tags: list[str] | None = None
) -> str:
    return await api.up.tabular_data_capture_upload(
        [{"seq": i} for i in seqs],
        "part-1",
        "rdk:component:sensor",
        component,
        "Readings",
        method_parameters={"unit": "C"},
        tags=tags,
        data_request_times=[(at(i), at(i + 0.5)) for i in seqs],
    )


async def upload_image(
    api: Api,
    n: int,
    *,
    component: str = "cam",
    tags: list[str] | None = None,
    dataset_ids: list[str] | None = None,
) -> str:
    meta = upload_metadata(
        "part-1",
        pb.DATA_TYPE_BINARY_SENSOR,
        component_type="rdk:component:camera",
        component_name=component,
        method_name="GetImages",
        file_extension=".jpg",
        tags=tags,
        dataset_ids=dataset_ids,
    )
    sensor = sensor_metadata((at(n), at(n + 0.25)))
    sensor.annotations.classifications.add(label="scene", confidence=0.5)
    res = await api.up.upload_binary_stream(meta, sensor, f"image-{n}".encode() * 100)
    return res.binary_data_id


# -- tabular --------------------------------------------------------------------------------


async def test_tabular_by_filter_returns_contents_in_order(
    server: tuple[IngestServer, Api, Api],
) -> None:
    _, a, _ = server
    await upload_readings(a, "temp", range(0, 5), tags=["hot"])
    await upload_readings(a, "hum", range(5, 8))

    resp = await a.data.TabularDataByFilter(tabular_req(), metadata=a.md)
    assert [d.data["seq"] for d in resp.data] == list(range(8))
    assert resp.count == 8
    assert len(resp.metadata) == 2  # shared per distinct capture metadata
    first = resp.metadata[resp.data[0].metadata_index]
    assert (first.organization_id, first.location_id, first.part_id) == (ORG, LOC, "part-1")
    assert (first.component_type, first.component_name, first.method_name) == (
        "rdk:component:sensor",
        "temp",
        "Readings",
    )
    assert list(first.tags) == ["hot"]
    assert "unit" in first.method_parameters
    assert resp.data[0].time_requested.ToDatetime(dt.UTC) == at(0)
    assert resp.data[0].time_received.ToDatetime(dt.UTC) == at(0.5)

    desc = await a.data.TabularDataByFilter(tabular_req(order=dpb.ORDER_DESCENDING), metadata=a.md)
    assert [d.data["seq"] for d in desc.data] == list(range(7, -1, -1))

    f = dpb.Filter(component_name="temp", interval=dpb.CaptureInterval(start=ts(1), end=ts(3)))
    some = await a.data.TabularDataByFilter(tabular_req(f), metadata=a.md)
    assert [d.data["seq"] for d in some.data] == [1, 2]

    tagged = dpb.Filter(tags_filter=dpb.TagsFilter(type=dpb.TAGS_FILTER_TYPE_UNTAGGED))
    untagged = await a.data.TabularDataByFilter(tabular_req(tagged), metadata=a.md)
    assert [d.data["seq"] for d in untagged.data] == [5, 6, 7]

    only = await a.data.TabularDataByFilter(tabular_req(count_only=True), metadata=a.md)
    assert (only.count, len(only.data)) == (8, 0)
    assert only.total_size_bytes > 0


async def test_paging_with_last_while_uploads_continue(
    server: tuple[IngestServer, Api, Api],
) -> None:
    _, a, _ = server
    await upload_readings(a, "temp", range(100))
    stop = asyncio.Event()

    async def keep_uploading() -> None:
        n = 1000
        while not stop.is_set():  # readings both before and after the cursor's position
            await upload_readings(a, "temp", range(n, n + 3))
            await upload_readings(a, "temp", range(-n - 3, -n))
            n += 3

    task = asyncio.create_task(keep_uploading())
    seen: list[int] = []
    last = ""
    try:
        while True:
            resp = await a.data.TabularDataByFilter(tabular_req(limit=7, last=last), metadata=a.md)
            if not resp.data and task.done():
                break
            if not resp.data or len(seen) > 1000:
                stop.set()  # caught up (or long enough): let the uploader finish, then drain
                await task
            assert resp.count == len(resp.data) <= 7
            seen += [int(d.data["seq"]) for d in resp.data]  # type: ignore[arg-type]
            last = resp.last or last
            await asyncio.sleep(0)
    finally:
        stop.set()
        await task
    assert any(s >= 1000 for s in seen), "no upload landed while paging"
    assert len(seen) == len(set(seen)), "a reading came twice"
    assert set(range(100)) <= set(seen), "a reading stored before paging began was skipped"
    captured = [s for s in seen if s >= 0]
    assert captured == sorted(captured)
    # An empty page echoes the token, so the SDK's `while data` loop ends cleanly.
    again = await a.data.TabularDataByFilter(tabular_req(limit=7, last=last), metadata=a.md)
    assert (len(again.data), again.last) == (0, last)


async def test_delete_tabular_data(server: tuple[IngestServer, Api, Api]) -> None:
    srv, a, b = server
    await upload_readings(a, "temp", range(3))
    await upload_readings(a, "hum", range(3))
    await upload_readings(b, "temp", range(3))
    # Captured in 2026-03: "older than 100 000 days" matches nothing.
    keep = dpb.DeleteTabularDataRequest(organization_id=ORG, delete_older_than_days=100_000)
    assert (await a.data.DeleteTabularData(keep, metadata=a.md)).deleted_count == 0
    only_temp = dpb.DeleteTabularDataRequest(
        organization_id=ORG, filter=dpb.DeleteTabularFilter(component_name="temp")
    )
    assert (await a.data.DeleteTabularData(only_temp, metadata=a.md)).deleted_count == 3
    everything = dpb.DeleteTabularDataRequest(organization_id=ORG, delete_older_than_days=0)
    assert (await a.data.DeleteTabularData(everything, metadata=a.md)).deleted_count == 3
    assert len(await srv.store.readings(ORG2)) == 3  # the other org's data is untouched
    other = dpb.DeleteTabularDataRequest(organization_id=ORG2)
    status, msg = await status_of(a.data.DeleteTabularData(other, metadata=a.md))
    assert status is Status.PERMISSION_DENIED and "organization_id" in msg


# -- binary ---------------------------------------------------------------------------------


async def test_binary_by_filter_and_ids(server: tuple[IngestServer, Api, Api]) -> None:
    _, a, _ = server
    uploaded = await a.sets.CreateDataset(
        spb.CreateDatasetRequest(name="uploaded", organization_id=ORG), metadata=a.md
    )
    ids = [await upload_image(a, n, dataset_ids=[uploaded.id]) for n in range(5)]
    file_id = await a.up.file_upload(
        "part-1", b"notes" * 10, file_name="notes", file_extension=".txt", tags=["doc"]
    )

    resp = await a.data.BinaryDataByFilter(binary_req(include_binary=True), metadata=a.md)
    got = {d.metadata.binary_data_id: d for d in resp.data}
    assert set(got) == {*ids, file_id}
    img = got[ids[2]]
    assert img.binary == b"image-2" * 100
    m = img.metadata
    assert (m.id, m.file_ext, m.file_name, m.file_size_bytes, m.uri) == (
        ids[2],
        ".jpg",
        "",
        700,
        "",
    )
    cm = m.capture_metadata
    assert (cm.organization_id, cm.location_id, cm.component_name, cm.mime_type) == (
        ORG,
        LOC,
        "cam",
        "image/jpeg",
    )
    assert list(m.dataset_ids) == [uploaded.id]
    assert [c.label for c in m.annotations.classifications] == ["scene"]
    assert m.time_requested.ToDatetime(dt.UTC) == at(2)
    doc = got[file_id].metadata
    assert (doc.file_name, doc.file_ext, doc.capture_metadata.mime_type) == (
        "notes",
        ".txt",
        "text/plain",
    )
    assert list(doc.capture_metadata.tags) == ["doc"]

    no_bytes = await a.data.BinaryDataByFilter(binary_req(include_binary=False), metadata=a.md)
    assert all(d.binary == b"" for d in no_bytes.data)

    f = dpb.Filter(mime_type=["image/jpeg"], interval=dpb.CaptureInterval(start=ts(1)))
    pages: list[str] = []
    last = ""
    while True:
        page = await a.data.BinaryDataByFilter(binary_req(f, limit=2, last=last), metadata=a.md)
        if not page.data:
            break
        pages += [d.metadata.binary_data_id for d in page.data]
        last = page.last
    assert pages == ids[1:]
    count = await a.data.BinaryDataByFilter(binary_req(f, count_only=True), metadata=a.md)
    assert (count.count, count.total_size_bytes) == (4, 4 * 700)

    by_ids = await a.data.BinaryDataByIDs(
        dpb.BinaryDataByIDsRequest(binary_data_ids=[ids[3], ids[0]], include_binary=True),
        metadata=a.md,
    )
    assert [d.metadata.binary_data_id for d in by_ids.data] == [ids[3], ids[0]]
    assert by_ids.data[0].binary == b"image-3" * 100
    legacy = await a.data.BinaryDataByIDs(
        dpb.BinaryDataByIDsRequest(
            binary_ids=[dpb.BinaryID(file_id=ids[1], organization_id=ORG, location_id=LOC)]
        ),
        metadata=a.md,
    )
    assert [d.metadata.binary_data_id for d in legacy.data] == [ids[1]]
    assert legacy.data[0].binary == b""


async def test_delete_binaries_removes_blob_files(server: tuple[IngestServer, Api, Api]) -> None:
    srv, a, _ = server
    ids = [await upload_image(a, n, component="cam" if n < 3 else "other") for n in range(5)]
    paths = {b.binary_data_id: b.path for b in await srv.store.binaries()}
    assert all(p.exists() for p in paths.values())

    req = dpb.DeleteBinaryDataByIDsRequest(binary_data_ids=[ids[0]])
    assert (await a.data.DeleteBinaryDataByIDs(req, metadata=a.md)).deleted_count == 1
    assert not paths[ids[0]].exists()
    status, msg = await status_of(a.data.DeleteBinaryDataByIDs(req, metadata=a.md))
    assert status is Status.NOT_FOUND and ids[0] in msg

    by_filter = dpb.DeleteBinaryDataByFilterRequest(filter=dpb.Filter(component_name="cam"))
    assert (await a.data.DeleteBinaryDataByFilter(by_filter, metadata=a.md)).deleted_count == 2
    assert [p.exists() for p in paths.values()] == [False, False, False, True, True]
    left = await a.data.BinaryDataByFilter(binary_req(), metadata=a.md)
    assert [d.metadata.binary_data_id for d in left.data] == ids[3:]


# -- tags -----------------------------------------------------------------------------------


async def test_tags_add_remove_and_list(server: tuple[IngestServer, Api, Api]) -> None:
    _, a, _ = server
    ids = [await upload_image(a, n, tags=["raw"] if n == 0 else None) for n in range(4)]

    await a.data.AddTagsToBinaryDataByIDs(
        dpb.AddTagsToBinaryDataByIDsRequest(binary_data_ids=ids[:2], tags=["good", "day"]),
        metadata=a.md,
    )
    await a.data.AddTagsToBinaryDataByFilter(
        dpb.AddTagsToBinaryDataByFilterRequest(
            filter=dpb.Filter(interval=dpb.CaptureInterval(start=ts(1))), tags=["late"]
        ),
        metadata=a.md,
    )
    listed = await a.data.TagsByFilter(dpb.TagsByFilterRequest(), metadata=a.md)
    assert list(listed.tags) == ["day", "good", "late", "raw"]

    def filt(kind: int, *tags: str) -> dpb.Filter:
        return dpb.Filter(tags_filter=dpb.TagsFilter(type=kind, tags=list(tags)))  # type: ignore[arg-type]

    async def ids_of(f: dpb.Filter) -> list[str]:
        resp = await a.data.BinaryDataByFilter(binary_req(f), metadata=a.md)
        return [d.metadata.binary_data_id for d in resp.data]

    assert await ids_of(filt(dpb.TAGS_FILTER_TYPE_MATCH_BY_OR, "good", "raw")) == ids[:2]
    assert await ids_of(filt(dpb.TAGS_FILTER_TYPE_UNTAGGED)) == []
    resp = await a.data.BinaryDataByIDs(
        dpb.BinaryDataByIDsRequest(binary_data_ids=[ids[1]]), metadata=a.md
    )
    assert list(resp.data[0].metadata.capture_metadata.tags) == ["day", "good", "late"]

    removed = await a.data.RemoveTagsFromBinaryDataByIDs(
        dpb.RemoveTagsFromBinaryDataByIDsRequest(binary_data_ids=ids[:2], tags=["good", "nope"]),
        metadata=a.md,
    )
    assert removed.deleted_count == 2
    removed_f = await a.data.RemoveTagsFromBinaryDataByFilter(
        dpb.RemoveTagsFromBinaryDataByFilterRequest(filter=dpb.Filter(), tags=["late", "day"]),
        metadata=a.md,
    )
    assert removed_f.deleted_count == 3 + 2
    assert await ids_of(filt(dpb.TAGS_FILTER_TYPE_UNTAGGED)) == ids[1:]
    assert await ids_of(filt(dpb.TAGS_FILTER_TYPE_TAGGED)) == ids[:1]

    status, msg = await status_of(
        a.data.AddTagsToBinaryDataByIDs(
            dpb.AddTagsToBinaryDataByIDsRequest(binary_data_ids=ids[:1]), metadata=a.md
        )
    )
    assert status is Status.INVALID_ARGUMENT and "tags" in msg


# -- bounding boxes -------------------------------------------------------------------------


async def test_bounding_boxes(server: tuple[IngestServer, Api, Api]) -> None:
    _, a, _ = server
    ids = [await upload_image(a, n) for n in range(3)]

    async def add(bid: str, label: str, conf: float | None = None) -> str:
        req = dpb.AddBoundingBoxToImageByIDRequest(
            binary_data_id=bid,
            label=label,
            x_min_normalized=0.1,
            y_min_normalized=0.2,
            x_max_normalized=0.5,
            y_max_normalized=0.9,
        )
        if conf is not None:
            req.confidence = conf
        return (await a.data.AddBoundingBoxToImageByID(req, metadata=a.md)).bbox_id

    cat = await add(ids[0], "cat", 0.75)
    await add(ids[0], "dog")
    await add(ids[1], "cat")
    labels = await a.data.BoundingBoxLabelsByFilter(
        dpb.BoundingBoxLabelsByFilterRequest(), metadata=a.md
    )
    assert list(labels.labels) == ["cat", "dog"]

    resp = await a.data.BinaryDataByIDs(
        dpb.BinaryDataByIDsRequest(binary_data_ids=[ids[0]]), metadata=a.md
    )
    boxes = {b.id: b for b in resp.data[0].metadata.annotations.bboxes}
    assert boxes[cat].label == "cat"
    assert (boxes[cat].x_min_normalized, boxes[cat].y_max_normalized) == (0.1, 0.9)
    assert boxes[cat].confidence == 0.75

    f = dpb.Filter(bbox_labels=["cat"])
    with_cat = await a.data.BinaryDataByFilter(binary_req(f), metadata=a.md)
    assert [d.metadata.binary_data_id for d in with_cat.data] == ids[:2]

    await a.data.RemoveBoundingBoxFromImageByID(
        dpb.RemoveBoundingBoxFromImageByIDRequest(binary_data_id=ids[0], bbox_id=cat),
        metadata=a.md,
    )
    with_cat = await a.data.BinaryDataByFilter(binary_req(f), metadata=a.md)
    assert [d.metadata.binary_data_id for d in with_cat.data] == ids[1:2]
    status, msg = await status_of(
        a.data.RemoveBoundingBoxFromImageByID(
            dpb.RemoveBoundingBoxFromImageByIDRequest(binary_data_id=ids[0], bbox_id=cat),
            metadata=a.md,
        )
    )
    assert status is Status.NOT_FOUND and cat in msg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"x_min_normalized": -0.1}, "x_min_normalized"),
        ({"y_max_normalized": 1.5}, "y_max_normalized"),
        ({"x_min_normalized": 0.6}, "x_min_normalized must be less than x_max_normalized"),
        ({"y_min_normalized": 0.9}, "y_min_normalized must be less than y_max_normalized"),
        ({"label": ""}, "label"),
        ({"confidence": 2.0}, "confidence"),
        ({"binary_data_id": ""}, "binary_data_id"),
    ],
)
async def test_bad_bounding_box_is_invalid_argument(
    server: tuple[IngestServer, Api, Api], change: dict[str, Any], field: str
) -> None:
    _, a, _ = server
    bid = await upload_image(a, 0)
    fields: dict[str, Any] = dict(
        binary_data_id=bid,
        label="cat",
        x_min_normalized=0.1,
        y_min_normalized=0.2,
        x_max_normalized=0.5,
        y_max_normalized=0.9,
    )
    fields.update(change)
    req = dpb.AddBoundingBoxToImageByIDRequest(**fields)
    status, msg = await status_of(a.data.AddBoundingBoxToImageByID(req, metadata=a.md))
    assert status is Status.INVALID_ARGUMENT and field in msg


# -- datasets -------------------------------------------------------------------------------


async def test_datasets(server: tuple[IngestServer, Api, Api]) -> None:
    _, a, b = server
    ids = [await upload_image(a, n) for n in range(3)]
    ds = (
        await a.sets.CreateDataset(
            spb.CreateDatasetRequest(name="train", organization_id=ORG), metadata=a.md
        )
    ).id
    status, _ = await status_of(
        a.sets.CreateDataset(
            spb.CreateDatasetRequest(name="train", organization_id=ORG), metadata=a.md
        )
    )
    assert status is Status.ALREADY_EXISTS
    other = (
        await a.sets.CreateDataset(
            spb.CreateDatasetRequest(name="val", organization_id=ORG), metadata=a.md
        )
    ).id

    listed = await a.sets.ListDatasetsByOrganizationID(
        spb.ListDatasetsByOrganizationIDRequest(organization_id=ORG), metadata=a.md
    )
    assert [(d.id, d.name, d.organization_id) for d in listed.datasets] == [
        (ds, "train", ORG),
        (other, "val", ORG),
    ]
    assert listed.datasets[0].time_created.seconds > 0

    await a.sets.RenameDataset(spb.RenameDatasetRequest(id=ds, name="train-v2"), metadata=a.md)
    by_ids = await a.sets.ListDatasetsByIDs(spb.ListDatasetsByIDsRequest(ids=[ds]), metadata=a.md)
    assert [d.name for d in by_ids.datasets] == ["train-v2"]
    status, _ = await status_of(
        a.sets.RenameDataset(spb.RenameDatasetRequest(id=other, name="train-v2"), metadata=a.md)
    )
    assert status is Status.ALREADY_EXISTS

    await a.data.AddBinaryDataToDatasetByIDs(
        dpb.AddBinaryDataToDatasetByIDsRequest(binary_data_ids=ids[:2], dataset_id=ds),
        metadata=a.md,
    )

    async def members(dataset_id: str) -> list[str]:
        resp = await a.data.BinaryDataByFilter(
            binary_req(dpb.Filter(dataset_id=dataset_id)), metadata=a.md
        )
        return [d.metadata.binary_data_id for d in resp.data]

    assert await members(ds) == ids[:2]
    await a.data.RemoveBinaryDataFromDatasetByIDs(
        dpb.RemoveBinaryDataFromDatasetByIDsRequest(binary_data_ids=[ids[0]], dataset_id=ds),
        metadata=a.md,
    )
    assert await members(ds) == ids[1:2]
    resp = await a.data.BinaryDataByIDs(
        dpb.BinaryDataByIDsRequest(binary_data_ids=[ids[1]]), metadata=a.md
    )
    assert list(resp.data[0].metadata.dataset_ids) == [ds]

    # Another organisation: NOT_FOUND for our ids, PERMISSION_DENIED for our org id.
    for call in (
        b.sets.ListDatasetsByIDs(spb.ListDatasetsByIDsRequest(ids=[ds]), metadata=b.md),
        b.sets.RenameDataset(spb.RenameDatasetRequest(id=ds, name="x"), metadata=b.md),
        b.sets.DeleteDataset(spb.DeleteDatasetRequest(id=ds), metadata=b.md),
        b.data.AddBinaryDataToDatasetByIDs(
            dpb.AddBinaryDataToDatasetByIDsRequest(binary_data_ids=ids[:1], dataset_id=ds),
            metadata=b.md,
        ),
    ):
        status, msg = await status_of(call)
        assert status is Status.NOT_FOUND and ds in msg
    status, _ = await status_of(
        b.sets.ListDatasetsByOrganizationID(
            spb.ListDatasetsByOrganizationIDRequest(organization_id=ORG), metadata=b.md
        )
    )
    assert status is Status.PERMISSION_DENIED
    mine = await b.sets.ListDatasetsByOrganizationID(
        spb.ListDatasetsByOrganizationIDRequest(organization_id=ORG2), metadata=b.md
    )
    assert list(mine.datasets) == []

    await a.sets.DeleteDataset(spb.DeleteDatasetRequest(id=ds), metadata=a.md)
    assert await members(ds) == []
    status, _ = await status_of(
        a.sets.ListDatasetsByIDs(spb.ListDatasetsByIDsRequest(ids=[ds]), metadata=a.md)
    )
    assert status is Status.NOT_FOUND


# -- isolation, bad input, database user, engines -------------------------------------------


async def test_another_org_sees_nothing(either: tuple[IngestServer, Api, Api]) -> None:
    srv, a, b = either
    await upload_readings(a, "temp", range(3))
    ids = [await upload_image(a, n, tags=["mine"]) for n in range(2)]
    await a.data.AddBoundingBoxToImageByID(
        dpb.AddBoundingBoxToImageByIDRequest(
            binary_data_id=ids[0], label="cat", x_max_normalized=1, y_max_normalized=1
        ),
        metadata=a.md,
    )

    named = dpb.Filter(organization_ids=[ORG])
    assert list((await b.data.TabularDataByFilter(tabular_req(named), metadata=b.md)).data) == []
    assert list((await b.data.BinaryDataByFilter(binary_req(named), metadata=b.md)).data) == []
    assert list((await b.data.TagsByFilter(dpb.TagsByFilterRequest(), metadata=b.md)).tags) == []
    labels = await b.data.BoundingBoxLabelsByFilter(
        dpb.BoundingBoxLabelsByFilterRequest(), metadata=b.md
    )
    assert list(labels.labels) == []
    # A's own key also sees nothing when it names only B's organisation.
    other = dpb.Filter(organization_ids=[ORG2])
    assert list((await a.data.BinaryDataByFilter(binary_req(other), metadata=a.md)).data) == []

    for call in (
        b.data.BinaryDataByIDs(dpb.BinaryDataByIDsRequest(binary_data_ids=ids), metadata=b.md),
        b.data.BinaryDataByIDs(
            dpb.BinaryDataByIDsRequest(binary_ids=[dpb.BinaryID(file_id=ids[0])]), metadata=b.md
        ),
        b.data.DeleteBinaryDataByIDs(
            dpb.DeleteBinaryDataByIDsRequest(binary_data_ids=ids), metadata=b.md
        ),
        b.data.AddTagsToBinaryDataByIDs(
            dpb.AddTagsToBinaryDataByIDsRequest(binary_data_ids=ids, tags=["x"]), metadata=b.md
        ),
        b.data.AddBoundingBoxToImageByID(
            dpb.AddBoundingBoxToImageByIDRequest(
                binary_data_id=ids[0], label="x", x_max_normalized=1, y_max_normalized=1
            ),
            metadata=b.md,
        ),
    ):
        status, msg = await status_of(call)
        assert status is Status.NOT_FOUND and ids[0] in msg, msg
    # Legacy BinaryID naming the right file but the wrong organisation.
    status, _ = await status_of(
        a.data.BinaryDataByIDs(
            dpb.BinaryDataByIDsRequest(
                binary_ids=[dpb.BinaryID(file_id=ids[0], organization_id=ORG2)]
            ),
            metadata=a.md,
        )
    )
    assert status is Status.NOT_FOUND

    wipe = dpb.DeleteBinaryDataByFilterRequest(filter=dpb.Filter())
    assert (await b.data.DeleteBinaryDataByFilter(wipe, metadata=b.md)).deleted_count == 0
    assert len(await srv.store.binaries(ORG)) == 2
    tags = await a.data.TagsByFilter(dpb.TagsByFilterRequest(), metadata=a.md)
    assert list(tags.tags) == ["mine"]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda d, md: d.TabularDataByFilter(tabular_req(last="garbage"), metadata=md), "last"),
        (
            lambda d, md: d.BinaryDataByFilter(
                binary_req(dpb.Filter(interval=dpb.CaptureInterval(start=ts(5), end=ts(1)))),
                metadata=md,
            ),
            "filter.interval",
        ),
        (lambda d, md: d.TabularDataByFilter(tabular_req(order=9), metadata=md), "sort_order"),
        (
            lambda d, md: d.BinaryDataByIDs(dpb.BinaryDataByIDsRequest(), metadata=md),
            "binary_data_ids",
        ),
        (
            lambda d, md: d.RemoveTagsFromBinaryDataByFilter(
                dpb.RemoveTagsFromBinaryDataByFilterRequest(), metadata=md
            ),
            "tags",
        ),
        (
            lambda d, md: d.ConfigureDatabaseUser(
                dpb.ConfigureDatabaseUserRequest(organization_id=ORG), metadata=md
            ),
            "password",
        ),
        (
            lambda d, md: d.TabularDataByMQL(
                dpb.TabularDataByMQLRequest(organization_id=ORG, mql_binary=[b"\x05nope"]),
                metadata=md,
            ),
            "mql_binary[0]",
        ),
        (
            lambda d, md: d.TabularDataBySQL(
                dpb.TabularDataBySQLRequest(organization_id=ORG), metadata=md
            ),
            "sql_query",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    either: tuple[IngestServer, Api, Api], call: Any, field: str
) -> None:
    _, a, _ = either
    status, msg = await status_of(call(a.data, a.md))
    assert status is Status.INVALID_ARGUMENT and field in msg, msg


async def test_database_connection_and_user(server: tuple[IngestServer, Api, Api]) -> None:
    srv, a, b = server
    get = dpb.GetDatabaseConnectionRequest(organization_id=ORG)
    conn = await a.data.GetDatabaseConnection(get, metadata=a.md)
    assert (conn.hostname, conn.mongodb_uri, conn.has_database_user) == (srv.address, "", False)
    password = "s3cret-Passw0rd-unique"
    await a.data.ConfigureDatabaseUser(
        dpb.ConfigureDatabaseUserRequest(organization_id=ORG, password=password), metadata=a.md
    )
    assert (await a.data.GetDatabaseConnection(get, metadata=a.md)).has_database_user
    other = dpb.GetDatabaseConnectionRequest(organization_id=ORG2)
    assert not (await b.data.GetDatabaseConnection(other, metadata=b.md)).has_database_user
    status, _ = await status_of(b.data.GetDatabaseConnection(get, metadata=b.md))
    assert status is Status.PERMISSION_DENIED
    with contextlib.closing(sqlite3.connect(srv.store.db_path)) as db:
        stored = db.execute("SELECT salt, password_hash FROM database_users").fetchall()
    assert len(stored) == 1 and len(stored[0][1]) == 32
    for path in srv.store.root.glob("ingest.sqlite3*"):
        assert password.encode() not in path.read_bytes()


def _engine_available(name: str) -> bool:
    return importlib.util.find_spec(f"edged.ingest.{name}") is not None


async def test_sql_and_mql_delegate_to_the_engines(either: tuple[IngestServer, Api, Api]) -> None:
    _, a, b = either
    await upload_readings(a, "temp", range(3))
    await upload_readings(b, "temp", range(10, 12))
    sql = dpb.TabularDataBySQLRequest(
        organization_id=ORG, sql_query="SELECT component_name FROM readings"
    )
    mql = dpb.TabularDataByMQLRequest(
        organization_id=ORG, mql_binary=[bson.encode({"$match": {"component_name": "temp"}})]
    )
    if _engine_available("sql"):
        rows = [
            bson.decode(r) for r in (await a.data.TabularDataBySQL(sql, metadata=a.md)).raw_data
        ]
        assert [r["component_name"] for r in rows] == ["temp"] * 3
    else:
        status, _ = await status_of(a.data.TabularDataBySQL(sql, metadata=a.md))
        assert status is Status.UNIMPLEMENTED
    if _engine_available("mql"):
        rows = [
            bson.decode(r) for r in (await a.data.TabularDataByMQL(mql, metadata=a.md)).raw_data
        ]
        assert len(rows) == 3
    else:
        status, _ = await status_of(a.data.TabularDataByMQL(mql, metadata=a.md))
        assert status is Status.UNIMPLEMENTED
    denied = dpb.TabularDataBySQLRequest(organization_id=ORG, sql_query="SELECT 1")
    status, _ = await status_of(b.data.TabularDataBySQL(denied, metadata=b.md))
    assert status is Status.PERMISSION_DENIED


async def test_auth_and_unimplemented(server: tuple[IngestServer, Api, Api]) -> None:
    _, a, _ = server
    status, _ = await status_of(a.data.TagsByFilter(dpb.TagsByFilterRequest()))
    assert status is Status.UNAUTHENTICATED
    status, msg = await status_of(
        a.data.GetLatestTabularData(dpb.GetLatestTabularDataRequest(), metadata=a.md)
    )
    assert status is Status.UNIMPLEMENTED and "GetLatestTabularData" in msg


async def test_an_index_from_before_the_query_api_is_upgraded(tmp_path: Path) -> None:
    """Columns and tables the query API added are ALTERed into an older index."""
    root = tmp_path / "old"
    root.mkdir()
    with contextlib.closing(sqlite3.connect(root / "ingest.sqlite3")) as db:
        db.executescript(
            "CREATE TABLE readings(id INTEGER PRIMARY KEY, upload_id TEXT NOT NULL,"
            " org_id TEXT NOT NULL, part_id TEXT NOT NULL, component_type TEXT NOT NULL,"
            " component_name TEXT NOT NULL, method_name TEXT NOT NULL,"
            " method_parameters TEXT NOT NULL, tags TEXT NOT NULL, dataset_ids TEXT NOT NULL,"
            " time_requested_ns INTEGER, time_received_ns INTEGER, data TEXT NOT NULL,"
            " received_at_ns INTEGER NOT NULL);"
            "INSERT INTO readings VALUES (1,'u','o','p','t','c','m','{}','[]','[]',NULL,7,'{}',9);"
        )
    store = await IngestStore.open(root)
    try:
        got = await store.read(
            lambda c: c.execute(
                "SELECT time_captured_ns, location_id, data_exact FROM readings"
            ).fetchall()
        )
        assert got == [(7, "", None)]
    finally:
        await store.close()


async def test_a_store_opened_on_a_relative_path_serves_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Library callers may pass a relative data_dir too (the CLI resolves its own)."""
    monkeypatch.chdir(tmp_path)
    store = await IngestStore.open(Path("rel") / "ingest")
    try:
        assert store.root.is_absolute()
        assert await store.read(lambda c: c.execute("SELECT count(*) FROM readings").fetchone())
    finally:
        await store.close()
