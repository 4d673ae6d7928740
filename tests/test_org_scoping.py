"""Organisation scoping of everything that takes an id, against a real `edged ingest`.

Two API keys of two organisations on one loopback server. Uploads may only join
datasets of their own organisation; bounding-box ids are per binary, so one
organisation's ids can neither collide with nor be dropped for another's; and every
DataService/DatasetService call that takes ids answers NOT_FOUND for the other
organisation's ids and changes nothing. Old data directories (global bbox ids, memberships
that crossed organisations) are migrated on open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct
from grpclib.const import Status

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.dataset.v1 import dataset_pb2 as spb
from edged._proto.app.dataset.v1.dataset_grpc import DatasetServiceStub
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import UploadClient, sensor_metadata, upload_metadata
from edged.errors import UploadError
from edged.ingest import IngestServer, IngestStore, catalog
from edged.ingest.storage import SCHEMA_VERSION
from tests.support.credentials import Certs, KeyFile, make_key_file
from tests.support.daemon import base_config, daemon, edged_ctl, status, write_config
from tests.support.processes import ingest_process
from tests.support.query_api import ORG, ORG2, Api, at, binary_req, status_of, two_orgs
from tests.support.waiting import wait_for

# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
async def orgs(tmp_path: Path, certs: Certs) -> AsyncIterator[tuple[IngestServer, Api, Api]]:
    async with two_orgs(tmp_path, certs) as srv:
        yield srv


async def create_dataset(api: Api, org: str, name: str) -> str:
    req = spb.CreateDatasetRequest(name=name, organization_id=org)
    return str((await api.sets.CreateDataset(req, metadata=api.md)).id)


def image_sensor(*boxes: tuple[str, str]) -> pb.SensorMetadata:
    """Sensor metadata carrying bounding boxes (id, label)."""
    sensor = sensor_metadata((at(0), at(0.25)))
    for box_id, label in boxes:
        sensor.annotations.bboxes.add(
            id=box_id, label=label, x_min_normalized=0.1, y_min_normalized=0.1,
            x_max_normalized=0.5, y_max_normalized=0.5,
        )  # fmt: skip
    return sensor


async def upload_image(
    api: Api, *, dataset_ids: list[str] | None = None, boxes: tuple[tuple[str, str], ...] = ()
) -> str:
    meta = upload_metadata(
        "part-1", pb.DATA_TYPE_BINARY_SENSOR, component_name="cam", file_extension=".jpg",
        dataset_ids=dataset_ids,
    )  # fmt: skip
    res = await api.up.upload_binary_stream(meta, image_sensor(*boxes), b"img" * 100)
    return res.binary_data_id


Upload = Callable[[Api, list[str]], Awaitable[Any]]


async def _tabular(api: Api, dataset_ids: list[str]) -> Any:
    meta = upload_metadata(
        "part-1", pb.DATA_TYPE_TABULAR_SENSOR, component_name="temp", method_name="Readings",
        dataset_ids=dataset_ids,
    )  # fmt: skip
    data = Struct()
    data.update({"t": 21.5})
    reading = pb.SensorData(metadata=sensor_metadata((at(0), at(0.5))), struct=data)
    return await api.up.upload_readings(meta, [reading.SerializeToString()])


async def _binary_unary(api: Api, dataset_ids: list[str]) -> Any:
    meta = upload_metadata(
        "part-1", pb.DATA_TYPE_BINARY_SENSOR, component_name="cam", file_extension=".jpg",
        dataset_ids=dataset_ids,
    )  # fmt: skip
    reading = pb.SensorData(metadata=sensor_metadata((at(0), at(0.5))), binary=b"jpeg")
    return await api.up.upload_readings(meta, [reading.SerializeToString()])


async def _binary_stream(api: Api, dataset_ids: list[str]) -> Any:
    return await upload_image(api, dataset_ids=dataset_ids)


async def _file(api: Api, dataset_ids: list[str]) -> Any:
    meta = upload_metadata(
        "part-1", pb.DATA_TYPE_FILE, file_name="notes", file_extension=".txt",
        dataset_ids=dataset_ids,
    )  # fmt: skip
    return await api.up.upload_file(meta, b"notes" * 1000)


UPLOADS: dict[str, tuple[Upload, str]] = {
    "tabular DataCaptureUpload": (_tabular, "metadata.dataset_ids"),
    "binary DataCaptureUpload": (_binary_unary, "metadata.dataset_ids"),
    "StreamingDataCaptureUpload": (_binary_stream, "metadata.upload_metadata.dataset_ids"),
    "FileUpload": (_file, "metadata.dataset_ids"),
}


def stored(srv: IngestServer) -> dict[str, int]:
    """Row counts of every table an upload writes to, straight from the index."""
    with contextlib.closing(sqlite3.connect(srv.store.db_path)) as db:
        return {
            t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
            for t in ("uploads", "readings", "binaries", "dataset_members", "bboxes")
        }


# -- uploads naming datasets ----------------------------------------------------------------


@pytest.mark.parametrize("call", list(UPLOADS))
async def test_upload_into_another_orgs_dataset_is_refused_naming_it(
    orgs: tuple[IngestServer, Api, Api], call: str
) -> None:
    srv, a, b = orgs
    upload, field = UPLOADS[call]
    theirs = await create_dataset(b, ORG2, "theirs")
    mine = await create_dataset(a, ORG, "mine")
    before = stored(srv)

    refused: list[str] = []
    for bad in (theirs, "no-such-dataset"):
        with pytest.raises(UploadError) as info:
            await upload(a, [mine, bad])
        assert info.value.status is Status.INVALID_ARGUMENT
        assert field in info.value.message and repr(bad) in info.value.message
        refused.append(info.value.message.replace(repr(bad), "<id>"))
    # Another organisation's dataset reads exactly like one that does not exist.
    assert refused[0] == refused[1]
    assert stored(srv) == before  # nothing stored, nothing joined

    await upload(a, [mine, ""])  # an empty id names no dataset and is ignored, as before
    after = stored(srv)
    assert after["uploads"] == before["uploads"] + 1
    if call != "tabular DataCaptureUpload":
        resp = await a.data.BinaryDataByFilter(
            binary_req(dpb.Filter(dataset_id=mine)), metadata=a.md
        )
        assert [list(d.metadata.dataset_ids) for d in resp.data] == [[mine]]
    empty = await b.data.BinaryDataByFilter(
        binary_req(dpb.Filter(dataset_id=theirs)), metadata=b.md
    )
    assert list(empty.data) == []


async def test_upload_repeat_of_an_acknowledged_item_still_answers_its_ids(
    orgs: tuple[IngestServer, Api, Api],
) -> None:
    """De-duplication comes first: a retry after the dataset was deleted is not refused."""
    srv, a, _ = orgs
    ds = await create_dataset(a, ORG, "short-lived")
    meta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="f", dataset_ids=[ds])
    first = await a.up.upload_file(meta, b"x" * 10, item_id="item-1")
    await a.sets.DeleteDataset(spb.DeleteDatasetRequest(id=ds), metadata=a.md)
    again = await a.up.upload_file(meta, b"x" * 10, item_id="item-1")
    assert again == first and stored(srv)["binaries"] == 1


# -- bounding boxes -------------------------------------------------------------------------


async def test_bbox_ids_are_per_binary_and_a_repeat_is_refused(
    orgs: tuple[IngestServer, Api, Api],
) -> None:
    srv, a, b = orgs
    mine = await upload_image(a, boxes=(("box-1", "cat"), ("box-2", "dog")))
    # The same client-chosen id in another organisation (and on another binary of ours).
    theirs = await upload_image(b, boxes=(("box-1", "car"),))
    again = await upload_image(a, boxes=(("box-1", "bird"),))

    async def boxes(api: Api, bid: str) -> list[tuple[str, str]]:
        resp = await api.data.BinaryDataByIDs(
            dpb.BinaryDataByIDsRequest(binary_data_ids=[bid]), metadata=api.md
        )
        return [(x.id, x.label) for x in resp.data[0].metadata.annotations.bboxes]

    assert await boxes(a, mine) == [("box-1", "cat"), ("box-2", "dog")]
    assert await boxes(b, theirs) == [("box-1", "car")]
    assert await boxes(a, again) == [("box-1", "bird")]

    # One upload naming an id twice: refused naming it, nothing stored.
    before = stored(srv)
    with pytest.raises(UploadError) as info:
        await upload_image(a, boxes=(("dup", "x"), ("dup", "y")))
    assert info.value.status is Status.INVALID_ARGUMENT
    assert "'dup'" in info.value.message and "bboxes[1]" in info.value.message
    meta = upload_metadata("part-1", pb.DATA_TYPE_BINARY_SENSOR, file_extension=".jpg")
    reading = pb.SensorData(metadata=image_sensor(("d", "x"), ("d", "y")), binary=b"jpeg")
    with pytest.raises(UploadError) as info:
        await a.up.upload_readings(meta, [reading.SerializeToString()])
    assert info.value.status is Status.INVALID_ARGUMENT
    assert "sensor_contents[0].metadata.annotations.bboxes[1].id 'd'" in info.value.message
    assert stored(srv) == before

    # Removing B's box-1 with A's key: NOT_FOUND, B's box stays; A's own removal is scoped
    # to the binary it names.
    status, _ = await status_of(
        a.data.RemoveBoundingBoxFromImageByID(
            dpb.RemoveBoundingBoxFromImageByIDRequest(binary_data_id=theirs, bbox_id="box-1"),
            metadata=a.md,
        )
    )
    assert status is Status.NOT_FOUND
    await a.data.RemoveBoundingBoxFromImageByID(
        dpb.RemoveBoundingBoxFromImageByIDRequest(binary_data_id=mine, bbox_id="box-1"),
        metadata=a.md,
    )
    assert await boxes(a, mine) == [("box-2", "dog")]
    assert await boxes(a, again) == [("box-1", "bird")]
    assert await boxes(b, theirs) == [("box-1", "car")]


# -- every id-taking call, across organisations ---------------------------------------------


@dataclass
class Seeded:
    bid: str  # A's image, tagged "keep", with box `bbox`, member of `ds`
    bbox: str
    ds: str
    their_bid: str  # B's image and dataset
    their_ds: str


async def seed(a: Api, b: Api) -> Seeded:
    ds = await create_dataset(a, ORG, "a-set")
    bid = await upload_image(a, dataset_ids=[ds])
    await a.data.AddTagsToBinaryDataByIDs(
        dpb.AddTagsToBinaryDataByIDsRequest(binary_data_ids=[bid], tags=["keep"]), metadata=a.md
    )
    bbox = (
        await a.data.AddBoundingBoxToImageByID(
            dpb.AddBoundingBoxToImageByIDRequest(
                binary_data_id=bid, label="cat", x_max_normalized=1, y_max_normalized=1
            ),
            metadata=a.md,
        )
    ).bbox_id
    their_ds = await create_dataset(b, ORG2, "b-set")
    return Seeded(bid, bbox, ds, await upload_image(b), their_ds)


def _legacy(s: Seeded) -> dpb.BinaryID:
    return dpb.BinaryID(file_id=s.bid, organization_id=ORG)


def _bbox(bid: str) -> dpb.AddBoundingBoxToImageByIDRequest:
    return dpb.AddBoundingBoxToImageByIDRequest(
        binary_data_id=bid, label="x", x_max_normalized=1, y_max_normalized=1
    )


# Calls made with B's key naming A's ids (alone, or next to B's own): each builds its call
# and names the id the NOT_FOUND message must carry.
CrossCall = Callable[[Seeded, Api], tuple[Awaitable[Any], str]]
CROSS: dict[str, CrossCall] = {
    "BinaryDataByIDs": lambda s, b: (
        b.data.BinaryDataByIDs(
            dpb.BinaryDataByIDsRequest(binary_data_ids=[s.their_bid, s.bid]), metadata=b.md
        ),
        s.bid,
    ),
    "BinaryDataByIDs legacy BinaryID": lambda s, b: (
        b.data.BinaryDataByIDs(dpb.BinaryDataByIDsRequest(binary_ids=[_legacy(s)]), metadata=b.md),
        s.bid,
    ),
    "DeleteBinaryDataByIDs": lambda s, b: (
        b.data.DeleteBinaryDataByIDs(
            dpb.DeleteBinaryDataByIDsRequest(binary_data_ids=[s.their_bid, s.bid]), metadata=b.md
        ),
        s.bid,
    ),
    "AddTagsToBinaryDataByIDs": lambda s, b: (
        b.data.AddTagsToBinaryDataByIDs(
            dpb.AddTagsToBinaryDataByIDsRequest(binary_data_ids=[s.their_bid, s.bid], tags=["x"]),
            metadata=b.md,
        ),
        s.bid,
    ),
    "RemoveTagsFromBinaryDataByIDs": lambda s, b: (
        b.data.RemoveTagsFromBinaryDataByIDs(
            dpb.RemoveTagsFromBinaryDataByIDsRequest(binary_data_ids=[s.bid], tags=["keep"]),
            metadata=b.md,
        ),
        s.bid,
    ),
    "AddBoundingBoxToImageByID": lambda s, b: (
        b.data.AddBoundingBoxToImageByID(_bbox(s.bid), metadata=b.md),
        s.bid,
    ),
    "RemoveBoundingBoxFromImageByID": lambda s, b: (
        b.data.RemoveBoundingBoxFromImageByID(
            dpb.RemoveBoundingBoxFromImageByIDRequest(binary_data_id=s.bid, bbox_id=s.bbox),
            metadata=b.md,
        ),
        s.bid,
    ),
    "AddBinaryDataToDatasetByIDs their dataset, our binary": lambda s, b: (
        b.data.AddBinaryDataToDatasetByIDs(
            dpb.AddBinaryDataToDatasetByIDsRequest(binary_data_ids=[s.bid], dataset_id=s.their_ds),
            metadata=b.md,
        ),
        s.bid,
    ),
    "AddBinaryDataToDatasetByIDs our dataset, their binary": lambda s, b: (
        b.data.AddBinaryDataToDatasetByIDs(
            dpb.AddBinaryDataToDatasetByIDsRequest(binary_data_ids=[s.their_bid], dataset_id=s.ds),
            metadata=b.md,
        ),
        s.ds,
    ),
    "RemoveBinaryDataFromDatasetByIDs our dataset": lambda s, b: (
        b.data.RemoveBinaryDataFromDatasetByIDs(
            dpb.RemoveBinaryDataFromDatasetByIDsRequest(binary_data_ids=[s.bid], dataset_id=s.ds),
            metadata=b.md,
        ),
        s.ds,
    ),
    "RemoveBinaryDataFromDatasetByIDs their dataset, our binary": lambda s, b: (
        b.data.RemoveBinaryDataFromDatasetByIDs(
            dpb.RemoveBinaryDataFromDatasetByIDsRequest(
                binary_data_ids=[s.bid], dataset_id=s.their_ds
            ),
            metadata=b.md,
        ),
        s.bid,
    ),
    "ListDatasetsByIDs": lambda s, b: (
        b.sets.ListDatasetsByIDs(
            spb.ListDatasetsByIDsRequest(ids=[s.their_ds, s.ds]), metadata=b.md
        ),
        s.ds,
    ),
    "RenameDataset": lambda s, b: (
        b.sets.RenameDataset(spb.RenameDatasetRequest(id=s.ds, name="pwned"), metadata=b.md),
        s.ds,
    ),
    "DeleteDataset": lambda s, b: (
        b.sets.DeleteDataset(spb.DeleteDatasetRequest(id=s.ds), metadata=b.md),
        s.ds,
    ),
}


async def a_view(srv: IngestServer, a: Api, s: Seeded) -> Any:
    """Everything of A's that B's calls could have touched."""
    resp = await a.data.BinaryDataByIDs(
        dpb.BinaryDataByIDsRequest(binary_data_ids=[s.bid], include_binary=True), metadata=a.md
    )
    [item] = resp.data
    m = item.metadata
    sets = await a.sets.ListDatasetsByOrganizationID(
        spb.ListDatasetsByOrganizationIDRequest(organization_id=ORG), metadata=a.md
    )
    members = await a.data.BinaryDataByFilter(
        binary_req(dpb.Filter(dataset_id=s.ds)), metadata=a.md
    )
    return (
        item.binary,
        list(m.capture_metadata.tags),
        [(x.id, x.label) for x in m.annotations.bboxes],
        list(m.dataset_ids),
        [(x.id, x.name) for x in sets.datasets],
        [x.metadata.binary_data_id for x in members.data],
        [x.path.exists() for x in await srv.store.binaries(ORG)],
    )


@pytest.mark.parametrize("call", list(CROSS))
async def test_other_orgs_ids_are_not_found_and_change_nothing(
    orgs: tuple[IngestServer, Api, Api], call: str
) -> None:
    srv, a, b = orgs
    s = await seed(a, b)
    before, counts = await a_view(srv, a, s), stored(srv)
    pending, named = CROSS[call](s, b)
    status, msg = await status_of(pending)
    assert status is Status.NOT_FOUND and named in msg, msg
    assert await a_view(srv, a, s) == before
    assert stored(srv) == counts  # B's own rows were not touched either


# -- the catalog gate itself ----------------------------------------------------------------


async def test_catalog_mutators_refuse_ids_of_another_org(tmp_path: Path) -> None:
    """The organisation check lives in the catalog functions, not only in their callers."""
    store = await IngestStore.open(tmp_path / "ingest", synchronous="OFF")
    try:
        meta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="f")
        blob = await store.new_blob(ORG)
        await blob.write(b"payload")
        ids = await store.store_blob(ORG, None, "file", meta, None, blob, "text/plain")
        bid = ids.binary_data_id
        ds = await store.write(lambda c: catalog.create_dataset(c, ORG, "set"))
        await store.write(lambda c: catalog.add_members(c, ORG, ds, [bid]))
        mutators: list[Callable[[catalog.Conn], object]] = [
            lambda c: catalog.delete_binaries(c, ORG2, [bid]),
            lambda c: catalog.add_tags(c, ORG2, [bid], ["x"]),
            lambda c: catalog.remove_tags(c, ORG2, [bid], ["x"]),
            lambda c: catalog.add_bbox(c, ORG2, bid, "x", (0, 0, 1, 1), None),
            lambda c: catalog.remove_bbox(c, ORG2, bid, "x"),
            lambda c: catalog.add_members(c, ORG2, ds, [bid]),
            lambda c: catalog.remove_members(c, ORG2, ds, [bid]),
            lambda c: catalog.rename_dataset(c, ORG2, ds, "x"),
            lambda c: catalog.delete_dataset(c, ORG2, ds),
        ]
        for fn in mutators:
            with pytest.raises(catalog.NotFound):
                await store.write(fn)
        [row] = await store.binaries(ORG)
        assert row.path.read_bytes() == b"payload"
        members = await store.read(lambda c: c.execute("SELECT * FROM dataset_members").fetchall())
        assert members == [(ds, bid)]
        assert (await store.read(lambda c: catalog.get_dataset(c, ORG, ds))).name == "set"
    finally:
        await store.close()


# -- migration of an older data directory ---------------------------------------------------


def _old_index(path: Path) -> tuple[str, str, str]:
    """An index as the previous release left it: bbox ids one global key, and an upload
    of org-2 that joined org-1's dataset. Returns (org-1 binary, org-2 binary, dataset)."""
    path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        from edged.ingest import storage

        old_schema = storage.SCHEMA.replace(
            storage._BBOXES.format(name="bboxes"),
            "CREATE TABLE bboxes(id TEXT PRIMARY KEY, binary_data_id TEXT NOT NULL,"
            " label TEXT NOT NULL, x_min REAL NOT NULL, y_min REAL NOT NULL,"
            " x_max REAL NOT NULL, y_max REAL NOT NULL, confidence REAL);"
            "CREATE INDEX bboxes_binary ON bboxes(binary_data_id);",
        )
        assert old_schema != storage.SCHEMA
        db.executescript(old_schema)
        mine, theirs, ds = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
        for bid, org in ((mine, ORG), (theirs, ORG2)):
            db.execute(
                "INSERT INTO binaries(binary_data_id, file_id, upload_id, org_id, kind, part_id,"
                " component_type, component_name, method_name, method_parameters, file_name,"
                " file_extension, mime_type, tags, dataset_ids, size, sha256, blob_path,"
                " received_at_ns) VALUES (?,?,?,?,'file','p','','','','{}','f','','text/plain',"
                " '[]','[]',0,'',?,1)",
                (bid, bid, bid, org, f"blobs/{bid}"),
            )
        db.execute("INSERT INTO datasets VALUES (?, ?, 'set', 1)", (ds, ORG))
        db.executemany(
            "INSERT INTO dataset_members VALUES (?, ?)",
            [(ds, mine), (ds, theirs), ("never-created", theirs)],
        )
        db.executemany(
            "INSERT INTO bboxes VALUES (?, ?, ?, 0, 0, 1, 1, NULL)",
            [("z-first", mine, "a"), ("a-second", mine, "b"), ("other", theirs, "c")],
        )
    return mine, theirs, ds


async def test_old_data_dir_is_migrated_keeping_boxes_in_order(tmp_path: Path) -> None:
    mine, theirs, ds = _old_index(tmp_path / "ingest" / "ingest.sqlite3")
    boxes = [("z-first", mine), ("a-second", mine), ("other", theirs)]
    for _ in range(2):  # a second open finds nothing left to do
        store = await IngestStore.open(tmp_path / "ingest", synchronous="OFF")
        try:
            rows = await store.read(
                lambda c: [
                    c.execute("SELECT id, binary_data_id FROM bboxes ORDER BY rowid").fetchall(),
                    c.execute("SELECT * FROM dataset_members ORDER BY 1, 2").fetchall(),
                    c.execute("PRAGMA user_version").fetchone()[0],
                ]
            )
            assert rows == [
                boxes,
                sorted([(ds, mine), ("never-created", theirs)]),
                SCHEMA_VERSION,
            ]
            # The same box id on another binary is now its own box, not a dropped one.
            if len(boxes) == 3:
                await store.write(
                    lambda c: c.execute(
                        "INSERT INTO bboxes VALUES ('other', ?, 'd', 0, 0, 1, 1, NULL)", (mine,)
                    )
                )
                boxes.append(("other", mine))
        finally:
            await store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "ingest" / "ingest.sqlite3")) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"bboxes_binary", "bboxes_label"} <= indexes
        labels = db.execute("SELECT binary_data_id, label FROM bboxes WHERE id='other'").fetchall()
        assert sorted(labels) == sorted([(theirs, "c"), (mine, "d")])


# -- the daemon: a `dataset=<id>` directory naming another organisation's dataset -----------


async def _datasets_via(port: int, key: KeyFile, org: str, name: str) -> str:
    async with UploadClient(
        f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
    ) as up:
        req = spb.CreateDatasetRequest(name=name, organization_id=org)
        resp = await DatasetServiceStub(up.channel).CreateDataset(req, metadata=await up.metadata())
        return str(resp.id)


def test_daemon_dead_letters_a_file_naming_another_orgs_dataset(tmp_path: Path) -> None:
    k1, k2 = make_key_file(tmp_path), make_key_file(tmp_path)
    keys = [
        *("--api-key-id", k1.key_id, "--api-key-file", str(k1.path), "--org-id", ORG),
        *("--api-key-id", k2.key_id, "--api-key-file", str(k2.path), "--org-id", ORG2),
    ]
    with ingest_process(tmp_path / "ingest", keys) as (_, port):
        theirs = asyncio.run(_datasets_via(port, k2, ORG2, "theirs"))
        mine = asyncio.run(_datasets_via(port, k1, ORG, "mine"))
        foreign = tmp_path / "uploads" / f"dataset={theirs}" / "run1.bag"
        own = tmp_path / "uploads" / f"dataset={mine}" / "run2.bag"
        for path in (foreign, own):
            path.parent.mkdir(parents=True)
            path.write_bytes(path.name.encode() * 1000)
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, k1))
        with daemon(cfg) as proc:
            wait_for("status socket", (tmp_path / "edged.sock").exists)
            wait_for("dead letter", lambda: status(cfg)["dead_letters"] == 1)
            wait_for("own file uploaded", lambda: not own.exists())
            [dead] = json.loads(edged_ctl(cfg, "dead-letters", "--json").stdout)
            assert dead["status"] == "INVALID_ARGUMENT"
            assert repr(theirs) in dead["message"] and "dataset_ids" in dead["message"]
            assert foreign.read_bytes() == b"run1.bag" * 1000  # kept: nothing lost
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    db = sqlite3.connect(f"file:{tmp_path / 'ingest' / 'ingest.sqlite3'}?mode=ro", uri=True)
    with contextlib.closing(db):
        members = db.execute("SELECT dataset_id FROM dataset_members").fetchall()
        files = db.execute("SELECT org_id, file_name FROM binaries").fetchall()
    assert members == [(mine,)]  # joined our dataset, never theirs
    assert [org for org, _ in files] == [ORG]
