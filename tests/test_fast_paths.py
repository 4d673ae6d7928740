"""The uploader's fast paths (issue #15) give exactly what the general ones gave.

- the capture reader checks a window of records in one parse (`first_unparsable`):
  the same records pass, and the same first bad one is named, as with one parse each;
- request framing and streamed chunks are written as bytes: the same bytes protobuf
  writes for the messages.
"""

from __future__ import annotations

import itertools
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureRecord, CaptureWriter, open_capture
from edged.capture.codec import encode_varint, first_unparsable, frame
from edged.client.api import encode_capture_request, file_chunk
from edged.errors import CaptureFormatError

META = pb.DataCaptureMetadata(
    component_type="rdk:component:sensor",
    component_name="fast",
    method_name="Readings",
    type=pb.DATA_TYPE_TABULAR_SENSOR,
)


def _struct(d: dict[str, Any]) -> Struct:
    s = Struct()
    s.update(d)
    return s


def _parses_alone(body: bytes) -> bool:
    try:
        pb.SensorData.FromString(body)
    except Exception:
        return False
    return True


# -- capture reader ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=12))
def test_one_parse_of_a_window_names_the_same_first_bad_record(bodies: list[bytes]) -> None:
    expected = next((i for i, b in enumerate(bodies) if not _parses_alone(b)), None)
    found = first_unparsable(bodies)
    assert (found[0] if found else None) == expected


def _ld(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + encode_varint(len(body)) + body


def _nested_body(depth: int) -> bytes:
    """SensorData{struct: {"n": {"n": ... {} }}} written by hand (upb refuses to build
    what it cannot parse)."""
    inner = b""
    for _ in range(depth):
        inner = _ld(0x0A, _ld(0x0A, b"n") + _ld(0x12, _ld(0x2A, inner)))
    return _ld(0x12, inner)


def test_a_record_only_too_deep_when_nested_still_passes() -> None:
    """Nested one level deeper for the joint parse, a body at the recursion limit fails
    there; the per-body parse must still accept it."""
    depth = 1
    while _parses_alone(_nested_body(depth + 1)):
        depth += 1
        assert depth < 1000
    body = _nested_body(depth)
    assert first_unparsable([body, body]) is None
    assert first_unparsable([body, _nested_body(depth + 1)]) is not None


def _write(tmp_path: Path, n: int) -> Path:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with CaptureWriter(tmp_path, META) as w:
        for i in range(n):
            w.write_tabular({"seq": float(i), "pad": "x" * (i % 300)}, time_requested=now)
    (path,) = tmp_path.rglob("*.capture")
    return path


def test_reader_yields_every_record_across_windows_and_names_a_corrupt_one(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, 700)  # ~100 KiB: records straddle 4 KiB windows
    with open_capture(path, chunk_size=4096) as r:
        records = list(r)
    assert [rec.reading.struct["seq"] for rec in records] == [float(i) for i in range(700)]
    assert all(a.end == b.offset for a, b in itertools.pairwise(records))
    assert records[-1].end == path.stat().st_size

    bad_at = records[333].offset
    data = bytearray(path.read_bytes())
    body = records[333].end - len(records[333].raw)
    data[body : records[333].end] = b"\xff" * len(records[333].raw)  # same length, garbage
    path.write_bytes(bytes(data))
    seen: list[CaptureRecord] = []
    with open_capture(path, chunk_size=4096) as r, pytest.raises(CaptureFormatError) as err:
        seen.extend(r)
    assert len(seen) == 333
    assert err.value.offset == bad_at


def test_a_record_bigger_than_the_window_is_read_whole(tmp_path: Path) -> None:
    big = pb.SensorData(binary=os.urandom(20_000)).SerializeToString()
    path = tmp_path / "big.capture"
    path.write_bytes(frame(META.SerializeToString()) + frame(big) + frame(big)[:100])
    with open_capture(path, chunk_size=4096) as r:
        records = list(r)
        assert r.truncated_at == records[0].end
    assert [rec.raw for rec in records] == [big]


# -- uploader request framing ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 120, 125, 126, 127, 128, 16_380, 16_381, 16_382, 70_000])
def test_request_framing_matches_protobuf(size: int) -> None:
    readings = [pb.SensorData(binary=b"b" * size), pb.SensorData(binary=b"c" * (size // 2))]
    meta = pb.UploadMetadata(part_id="p", type=pb.DATA_TYPE_BINARY_SENSOR)
    raw = encode_capture_request(meta, [r.SerializeToString() for r in readings])
    assert (
        raw
        == pb.DataCaptureUploadRequest(metadata=meta, sensor_contents=readings).SerializeToString()
    )


@pytest.mark.parametrize("size", [0, 1, 126, 127, 128, 16_383, 16_384, 65_536])
def test_stream_chunks_are_the_messages_protobuf_writes(size: int) -> None:
    chunk = os.urandom(size)
    expected = pb.FileUploadRequest(file_contents=pb.FileData(data=chunk)).SerializeToString()
    assert file_chunk(chunk).data == expected


@pytest.mark.parametrize("size", [0, 1, 127, 128, 65_536])
async def test_streamed_data_chunks_reach_the_server_whole(size: int, tmp_path: Path) -> None:
    """upload_binary_stream's chunks (written as raw bytes now) arrive as sent."""
    from edged.client import UploadClient
    from edged.ingest import IngestServer
    from edged.ingest.server import IngestSettings

    payload = os.urandom(size)
    async with IngestServer(IngestSettings(tmp_path / "d", synchronous="OFF")) as server:
        async with UploadClient(server.address, tls=False, chunk_size=100) as client:
            meta = pb.UploadMetadata(part_id="p", type=pb.DATA_TYPE_BINARY_SENSOR)
            await client.upload_binary_stream(meta, pb.SensorMetadata(), payload)
            await client.upload_file(pb.UploadMetadata(part_id="p", file_name="f"), payload)
        stored = await server.store.binaries()
    assert [b.path.read_bytes() for b in stored] == [payload, payload]
