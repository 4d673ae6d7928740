"""The upload client against a real `edged ingest` (TLS, API key) on loopback.

Table-driven: every call, what it must store, and that de-duplication by item id
turns a repeat into a no-op that returns the first upload's ids.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import FileSlice, UploadClient, sensor_metadata, upload_metadata
from edged.ingest import IngestServer, catalog

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(milliseconds=7)
T0_NS = int(T0.timestamp()) * 10**9 + 123456000
T1_NS = T0_NS + 7_000_000
PAYLOAD = bytes(range(256)) * 1500  # 384000 bytes: several 64 KiB chunks


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[UploadClient, Path], Awaitable[str]]
    kind: str  # "tabular" | "binary" | "file"
    payload: bytes = b""
    file_name: str = ""
    file_extension: str = ""


async def _tabular(c: UploadClient, _: Path) -> str:
    return await c.tabular_data_capture_upload(
        [{"temp_c": 21.5, "ok": True}, {"temp_c": 22.0, "ok": False, "nested": {"a": [1, "x"]}}],
        "part-1",
        "rdk:component:sensor",
        "temp1",
        "Readings",
        method_parameters={"unit": "C"},
        tags=["t1", "t2"],
        data_request_times=[(T0, T1), (T0, T1)],
    )


async def _binary(c: UploadClient, _: Path) -> str:
    return await c.binary_data_capture_upload(
        PAYLOAD[:20000],
        "part-1",
        "rdk:component:camera",
        "cam1",
        "ReadImage",
        ".jpg",
        tags=["t1"],
        data_request_times=(T0, T1),
    )


async def _streaming(c: UploadClient, _: Path) -> str:
    return await c.streaming_data_capture_upload(
        PAYLOAD,
        "part-1",
        ".pcd",
        "rdk:component:camera",
        "lidar",
        "NextPointCloud",
        data_request_times=(T0, T1),
        tags=["t1"],
    )


async def _file(c: UploadClient, _: Path) -> str:
    return await c.file_upload(
        "part-1", PAYLOAD, file_name="notes", file_extension=".txt", tags=["t1"]
    )


async def _file_path(c: UploadClient, tmp: Path) -> str:
    path = tmp / "video.mp4"
    path.write_bytes(PAYLOAD)
    return await c.file_upload_from_path(str(path), "part-1", tags=["t1"])


async def _file_slice(c: UploadClient, tmp: Path) -> str:
    path = tmp / "spool.bin"
    path.write_bytes(b"HEAD" + PAYLOAD + b"TAIL")
    meta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="slice", tags=["t1"])
    result = await c.upload_file(meta, FileSlice(path, 4, len(PAYLOAD)))
    return result.binary_data_id


async def _async_source(c: UploadClient, _: Path) -> str:
    async def gen() -> AsyncIterator[bytes]:
        for start in range(0, len(PAYLOAD), 100_000):  # uneven pieces, re-chunked to 64 KiB
            yield PAYLOAD[start : start + 100_000]

    meta = upload_metadata(
        "part-1",
        pb.DATA_TYPE_BINARY_SENSOR,
        component_type="rdk:component:camera",
        component_name="cam1",
        method_name="ReadImage",
        file_extension=".png",
        tags=["t1"],
    )
    result = await c.upload_binary_stream(meta, sensor_metadata((T0, T1)), gen)
    return result.binary_data_id


CASES = [
    Case("tabular_data_capture_upload", _tabular, "tabular"),
    Case("binary_data_capture_upload", _binary, "binary", PAYLOAD[:20000], "", ".jpg"),
    Case("streaming_data_capture_upload", _streaming, "binary", PAYLOAD, "", ".pcd"),
    Case("file_upload", _file, "file", PAYLOAD, "notes", ".txt"),
    Case("file_upload_from_path", _file_path, "file", PAYLOAD, "video", ".mp4"),
    Case("upload_file(FileSlice)", _file_slice, "file", PAYLOAD, "slice", ""),
    Case("upload_binary_stream(async source)", _async_source, "binary", PAYLOAD, "", ".png"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_every_call_stores_what_was_sent(
    case: Case, client: UploadClient, ingest: IngestServer, tmp_path: Path
) -> None:
    returned_id = await case.call(client, tmp_path)
    assert returned_id
    if case.kind == "tabular":
        rows = await ingest.store.readings()
        assert [r.data for r in rows] == [
            {"temp_c": 21.5, "ok": True},
            {"temp_c": 22.0, "ok": False, "nested": {"a": [1, "x"]}},
        ]
        for r in rows:
            assert (r.part_id, r.component_type, r.component_name, r.method_name) == (
                "part-1",
                "rdk:component:sensor",
                "temp1",
                "Readings",
            )
            assert r.tags == ["t1", "t2"]
            assert (r.time_requested_ns, r.time_received_ns) == (T0_NS, T1_NS)
            assert r.upload_id == returned_id
        return
    [stored] = await ingest.store.binaries()
    assert stored.binary_data_id == returned_id
    assert stored.kind == case.kind
    assert stored.part_id == "part-1"
    assert stored.tags == ["t1"]
    assert stored.size == len(case.payload)
    assert stored.sha256 == hashlib.sha256(case.payload).hexdigest()
    assert stored.path.read_bytes() == case.payload
    assert (stored.file_name, stored.file_extension) == (case.file_name, case.file_extension)
    if case.kind == "binary":
        assert (stored.time_requested_ns, stored.time_received_ns) == (T0_NS, T1_NS)


async def test_pre_encoded_readings_batch(client: UploadClient, ingest: IngestServer) -> None:
    ds = await ingest.store.write(lambda c: catalog.create_dataset(c, "org-1", "ds1"))
    blobs = []
    for i in range(1000):
        reading = pb.SensorData(metadata=sensor_metadata((T0, T1)))
        reading.struct.update({"seq": i})
        blobs.append(reading.SerializeToString())
    meta = upload_metadata(
        "part-9",
        pb.DATA_TYPE_TABULAR_SENSOR,
        component_type="rdk:component:sensor",
        component_name="s",
        method_name="Readings",
        dataset_ids=[ds],
    )
    result = await client.upload_readings(meta, blobs, item_id="batch-1")
    rows = await ingest.store.readings()
    assert [r.data["seq"] for r in rows] == list(range(1000))
    assert {r.upload_id for r in rows} == {result.file_id}
    assert rows[0].dataset_ids == [ds]


async def _dedup_tabular(c: UploadClient, _: Path, item: str) -> str:
    reading = pb.SensorData(metadata=sensor_metadata((T0, T1)))
    reading.struct.update({"v": 1})
    meta = upload_metadata("p", pb.DATA_TYPE_TABULAR_SENSOR, component_name="s")
    return (await c.upload_readings(meta, [reading.SerializeToString()], item_id=item)).file_id


async def _dedup_binary(c: UploadClient, _: Path, item: str) -> str:
    reading = pb.SensorData(metadata=sensor_metadata((T0, T1)), binary=b"img")
    meta = upload_metadata("p", pb.DATA_TYPE_BINARY_SENSOR, component_name="cam")
    res = await c.upload_readings(meta, [reading.SerializeToString()], item_id=item)
    return res.binary_data_id


async def _dedup_stream(c: UploadClient, _: Path, item: str) -> str:
    meta = upload_metadata("p", pb.DATA_TYPE_BINARY_SENSOR, component_name="cam")
    res = await c.upload_binary_stream(meta, sensor_metadata(None), PAYLOAD, item_id=item)
    return res.binary_data_id


async def _dedup_file(c: UploadClient, tmp: Path, item: str) -> str:
    path = tmp / "f.bin"
    path.write_bytes(PAYLOAD)
    meta = upload_metadata("p", pb.DATA_TYPE_FILE, file_name="f")
    return (await c.upload_file(meta, path, item_id=item)).binary_data_id


@pytest.mark.parametrize(
    "call",
    [_dedup_tabular, _dedup_binary, _dedup_stream, _dedup_file],
    ids=["tabular", "binary", "stream", "file"],
)
async def test_repeat_item_id_returns_first_ids_and_stores_once(
    call: Callable[[UploadClient, Path, str], Awaitable[str]],
    client: UploadClient,
    ingest: IngestServer,
    tmp_path: Path,
) -> None:
    first = await call(client, tmp_path, "item-42")
    again = await call(client, tmp_path, "item-42")
    other = await call(client, tmp_path, "item-43")
    assert first == again
    assert other != first
    counts = await ingest.store.counts()
    assert counts["uploads"] == 2
    assert counts["readings"] + counts["binaries"] == 2
