"""Capture files: framing, the reader against robot-made fixtures, writer round trips,
truncation at every byte, fuzzing, and a writer killed with SIGKILL mid-write."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import (
    CaptureRecord,
    CaptureWriter,
    capture_file_stem,
    capture_subdir,
    decode_varint32,
    encode_varint,
    frame,
    open_capture,
    split_legacy_images,
)
from edged.errors import CaptureFormatError
from tests.support.capture_files import copy_tree, tabular_metadata, tabular_reading
from tests.support.paths import FIXTURES, REPO
from tests.support.processes import read_line

FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,  # no example database written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(FAST, max_examples=400)

STEM_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d_\d\d_\d\d\.\d{6}(Z|[+-]\d\d_\d\d)")


# ---------------------------------------------------------------------------- helpers


@dataclass
class ReadResult:
    metadata: pb.DataCaptureMetadata
    data_offset: int
    records: list[CaptureRecord]
    truncated_at: int | None


def read_all(path: Path, chunk_size: int = 64 * 1024) -> ReadResult:
    with open_capture(path, chunk_size=chunk_size) as reader:
        records = list(reader)
        return ReadResult(reader.metadata, reader.data_offset, records, reader.truncated_at)


def to_py(value: struct_pb2.Value) -> Any:
    """A Struct value as plain Python, keeping every number a float."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return {k: to_py(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [to_py(v) for v in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def struct_to_py(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {k: to_py(v) for k, v in struct.fields.items()}


def py_value(obj: Any) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": obj})
    return holder.fields["v"]


class FakeClock:
    """Advances by `step` on every call, so names and ages are deterministic."""

    def __init__(self, tz: timezone = UTC, step: timedelta = timedelta(milliseconds=1)) -> None:
        self.now = datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC).astimezone(tz)
        self.step = step

    def __call__(self) -> datetime:
        self.now += self.step
        return self.now


def write_file(
    path: Path, metadata: pb.DataCaptureMetadata, readings: list[pb.SensorData]
) -> bytes:
    """A capture file framed by hand (independent of CaptureWriter)."""
    data = frame(metadata.SerializeToString()) + b"".join(
        frame(r.SerializeToString()) for r in readings
    )
    path.write_bytes(data)
    return data


def small_file(tmp: Path) -> tuple[Path, bytes]:
    """A file whose records have 1-, 2- and 3-byte length prefixes and an empty body."""
    readings = [tabular_reading(i, pad) for i, pad in enumerate([0, 3, 150, 1, 40])]
    readings.insert(2, pb.SensorData())  # zero-length body
    path = tmp / "small.capture"
    return path, write_file(path, tabular_metadata(), readings)


def read_is_robust(path: Path) -> ReadResult | None:
    """Read everything; only CaptureFormatError may escape (then None)."""
    try:
        result = read_all(path, chunk_size=16)
    except CaptureFormatError as exc:
        assert exc.path == str(path)
        assert exc.offset >= 0
        return None
    data = path.read_bytes()
    pos = result.data_offset
    for record in result.records:  # contiguous, and raw is the body in the file
        assert record.offset == pos
        assert data[record.end - len(record.raw) : record.end] == record.raw
        pos = record.end
    assert result.truncated_at in (None, pos)
    return result


# ---------------------------------------------------------------------------- varints


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2**21 - 1, b"\xff\xff\x7f"),
        (2**28 - 1, b"\xff\xff\xff\x7f"),
        (2**28, b"\x80\x80\x80\x80\x01"),
        (2**31 - 1, b"\xff\xff\xff\xff\x07"),
        (2**32 - 1, b"\xff\xff\xff\xff\x0f"),
    ],
)
def test_varint_round_trip(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded
    assert decode_varint32(encoded) == (value, len(encoded))
    assert decode_varint32(b"\xaa" + encoded + b"\x99", 1) == (value, len(encoded) + 1)


def test_encode_varint_beyond_32_bits_and_range() -> None:
    assert encode_varint(2**64 - 1) == b"\xff" * 9 + b"\x01"
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ValueError):
        encode_varint(2**64)


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (b"", None),
        (b"\x80", None),
        (b"\xff\xff", None),
        (b"\x80\x80\x80\x80", None),  # 4 bytes, all continued: cut, not corrupt
        (b"\x80\x80\x80\x80\x00", (0, 5)),  # non-minimal but within 5 bytes
        (b"\x81\x00", (1, 2)),
    ],
)
def test_decode_varint32_incomplete_and_lenient(
    buf: bytes, expected: tuple[int, int] | None
) -> None:
    assert decode_varint32(buf) == expected


@pytest.mark.parametrize(
    "buf",
    [
        b"\x80\x80\x80\x80\x80",  # a sixth byte would follow: over 5 bytes
        b"\xff\xff\xff\xff\xff\x01",
        b"\x80\x80\x80\x80\x10",  # 2**32: 5 bytes but over 32 bits
        b"\xff\xff\xff\xff\x7f",
    ],
)
def test_decode_varint32_rejects_overlong(buf: bytes) -> None:
    with pytest.raises(ValueError):
        decode_varint32(buf)


@FAST
@given(st.integers(min_value=0, max_value=2**32 - 1), st.binary(max_size=8))
def test_varint_property(value: int, tail: bytes) -> None:
    encoded = encode_varint(value)
    assert decode_varint32(encoded + tail) == (value, len(encoded))
    assert decode_varint32(encoded[:-1]) is None


# --------------------------------------------------------------------------- fixtures

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"robot capture fixtures not found at {FIXTURES}"
)


def _manifest() -> dict[str, Any]:
    if not FIXTURES.is_dir():
        return {"files": [], "entries": []}
    manifest: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
    return manifest


MANIFEST = _manifest()


@pytest.fixture
def fixture_tree(tmp_path: Path) -> Path:
    copy_tree(FIXTURES, tmp_path / "robot-capture")
    return tmp_path / "robot-capture"


def check_entry(entry: dict[str, Any], meta: pb.DataCaptureMetadata, rec: CaptureRecord) -> None:
    assert meta.component_type == entry["component_type"]
    assert meta.component_name == entry["component_name"]
    assert meta.method_name == entry["method"]
    assert list(meta.tags) == entry["tags"]
    md = rec.reading.metadata
    assert md.time_requested.ToDatetime(tzinfo=UTC) == datetime.fromisoformat(
        entry["time_requested"]
    )
    assert md.time_received.ToDatetime(tzinfo=UTC) == datetime.fromisoformat(entry["time_received"])
    if entry["kind"] == "tabular":
        assert meta.type == pb.DATA_TYPE_TABULAR_SENSOR
        assert rec.reading.WhichOneof("data") == "struct"
        assert struct_to_py(rec.reading.struct) == entry["struct"]
    else:
        assert entry["kind"] == "binary"
        assert meta.type == pb.DATA_TYPE_BINARY_SENSOR
        assert rec.reading.WhichOneof("data") == "binary"
        assert len(rec.reading.binary) == entry["length"]
        assert hashlib.sha256(rec.reading.binary).hexdigest() == entry["sha256"]


@needs_fixtures
@pytest.mark.parametrize(
    "spec",
    MANIFEST["files"] or [{"role": "absent", "path": "-"}],
    ids=lambda f: f"{f['role']}:{f['path']}",
)
def test_fixture_file(fixture_tree: Path, spec: dict[str, Any]) -> None:
    path = fixture_tree / spec["path"]
    entries = [e for e in MANIFEST["entries"] if e["path"] == spec["path"]]
    assert len(entries) == spec["readings"]
    if spec["role"] == "corrupt":
        with pytest.raises(CaptureFormatError) as err:
            read_all(path)
        assert err.value.path == str(path)
        assert err.value.offset == 0  # its "header" is garbage
        assert "DataCaptureMetadata" in err.value.reason
        return
    result = read_all(path)
    size = path.stat().st_size
    assert len(result.records) == spec["readings"]
    for entry, record in zip(entries, result.records, strict=True):
        check_entry(entry, result.metadata, record)
    last_end = result.records[-1].end if result.records else result.data_offset
    if spec["role"] == "truncated":
        assert result.truncated_at == last_end
        assert last_end < size
    elif spec["role"] == "orphan_prog":
        assert path.suffix == ".prog"
        assert result.truncated_at in (None, last_end)
    else:  # capture, empty: clean to the last byte
        assert result.truncated_at is None
        assert last_end == size


@needs_fixtures
def test_manifest_covers_every_fixture_file() -> None:
    on_disk = {
        str(p.relative_to(FIXTURES)) for p in (FIXTURES / "capture").rglob("*") if p.is_file()
    }
    assert on_disk == {f["path"] for f in MANIFEST["files"]}
    assert {e["path"] for e in MANIFEST["entries"]} <= on_disk


@needs_fixtures
def test_fixture_readings_rewritten_by_capture_writer(fixture_tree: Path, tmp_path: Path) -> None:
    """Our writer re-frames the independent implementation's readings losslessly."""
    for spec in MANIFEST["files"]:
        if spec["role"] != "capture":
            continue
        original = read_all(fixture_tree / spec["path"])
        out = tmp_path / "out" / spec["path"]
        with CaptureWriter(out, original.metadata, clock=FakeClock()) as writer:
            for record in original.records:
                writer.write(record.reading)
        again = [read_all(p) for p in writer.closed_paths]
        assert all(r.metadata == original.metadata for r in again)
        assert [rec.reading for r in again for rec in r.records] == [
            rec.reading for rec in original.records
        ]


# ----------------------------------------------------------------- reader edge cases


def test_zero_length_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "zero.capture"
    path.write_bytes(b"")
    with pytest.raises(CaptureFormatError) as err:
        open_capture(path)
    assert err.value.offset == 0
    assert "empty file" in err.value.reason


@pytest.mark.parametrize(
    "data",
    [
        b"\x80",  # header prefix cut
        b"\x10abc",  # header length past the end
        b"\x80\x80\x80\x80\x80\x01",  # header prefix over 5 bytes
        b"\x02\xff\xff",  # header body does not parse
    ],
)
def test_bad_header_is_corrupt(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.capture"
    path.write_bytes(data)
    with pytest.raises(CaptureFormatError) as err:
        open_capture(path)
    assert err.value.offset == 0
    assert err.value.path == str(path)


def test_header_only_file_has_no_readings(tmp_path: Path) -> None:
    path = tmp_path / "h.capture"
    write_file(path, tabular_metadata(), [])
    result = read_all(path)
    assert result.records == []
    assert result.truncated_at is None
    assert result.metadata == tabular_metadata()


def test_corrupt_record_after_good_ones(tmp_path: Path) -> None:
    path, data = small_file(tmp_path)
    good = read_all(path).records
    for garbage in (b"\x03\xff\xff\xff", b"\x80\x80\x80\x80\x80\x00"):
        path.write_bytes(data + garbage + frame(tabular_reading(99).SerializeToString()))
        seen: list[CaptureRecord] = []
        with open_capture(path) as reader, pytest.raises(CaptureFormatError) as err:
            seen.extend(reader)
        assert err.value.offset == len(data)
        assert seen == good  # everything before the bad record was delivered


def test_huge_length_prefix_is_truncation_without_allocating(tmp_path: Path) -> None:
    path, data = small_file(tmp_path)
    path.write_bytes(data + b"\xff\xff\xff\xff\x0f" + b"tail")
    tracemalloc.start()
    try:
        result = read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.truncated_at == len(data)
    assert peak < 4 * 1024 * 1024


def test_read_from_resumes_at_every_boundary(tmp_path: Path) -> None:
    path, _ = small_file(tmp_path)
    with open_capture(path, chunk_size=8) as reader:
        records = list(reader)
        assert list(reader) == records  # iterating again reads the same
        for i, record in enumerate(records):
            assert list(reader.read_from(record.offset)) == records[i:]
            assert list(reader.read_from(record.end)) == records[i + 1 :]
        with pytest.raises(ValueError):
            reader.read_from(reader.data_offset - 1)
        with pytest.raises(CaptureFormatError):
            reader.read_from(path.stat().st_size + 1)


def test_reader_follows_a_growing_file(tmp_path: Path) -> None:
    path, _ = small_file(tmp_path)
    extra = [tabular_reading(100 + i, 5000) for i in range(3)]
    with open_capture(path) as reader:
        before = len(list(reader))
        iterator = reader.read_from(reader.data_offset)  # file size noted now
        with path.open("ab") as f:
            for reading in extra:
                f.write(frame(reading.SerializeToString()))
        records = list(iterator)
    assert len(records) == before + len(extra)
    assert [r.reading for r in records[before:]] == extra
    assert reader.truncated_at is None


@pytest.mark.parametrize("chunk_size", [1, 7, 64 * 1024])
def test_cut_at_every_byte(tmp_path: Path, chunk_size: int) -> None:
    """Cut a valid file anywhere: exactly the records wholly before the cut come back."""
    path, data = small_file(tmp_path)
    full = read_all(path)
    boundaries = {full.data_offset} | {r.end for r in full.records}
    for cut in range(len(data), -1, -1):
        os.truncate(path, cut)
        if cut < full.data_offset:
            with pytest.raises(CaptureFormatError) as err:
                read_all(path, chunk_size)
            assert err.value.offset == 0
            continue
        result = read_all(path, chunk_size)
        whole = [r for r in full.records if r.end <= cut]
        assert result.records == whole
        last = whole[-1].end if whole else full.data_offset
        assert result.truncated_at == (None if cut in boundaries else last)


@FAST
@given(
    payloads=st.lists(st.binary(max_size=70_000), min_size=1, max_size=3),
    data=st.data(),
)
def test_cut_large_binary_file(payloads: list[bytes], data: st.DataObject) -> None:
    """Multi-chunk bodies and multi-byte prefixes, cut where hypothesis likes."""
    meta = tabular_metadata(type=pb.DATA_TYPE_BINARY_SENSOR, file_extension=".bin")
    readings = [pb.SensorData(binary=p) for p in payloads]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.capture"
        content = write_file(path, meta, readings)
        full = read_all(path)
        assert [r.reading for r in full.records] == readings
        cut = data.draw(st.integers(min_value=full.data_offset, max_value=len(content)))
        os.truncate(path, cut)
        result = read_all(path)
        whole = [r for r in full.records if r.end <= cut]
        assert result.records == whole
        ends = {full.data_offset} | {r.end for r in full.records}
        last = whole[-1].end if whole else full.data_offset
        assert result.truncated_at == (None if cut in ends else last)


# ------------------------------------------------------------------------------ fuzz


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.capture"
        path.write_bytes(blob)
        read_is_robust(path)
        header = frame(tabular_metadata().SerializeToString())
        path.write_bytes(header + blob)  # reach the record loop more often
        read_is_robust(path)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 8)),
)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=6))
def test_fuzz_mutated_valid_file(ops: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, original = small_file(Path(tmp))
        data = bytearray(original)
        for op, where, arg in ops:
            i = where % (len(data) + 1)
            if op == "flip" and i < len(data):
                data[i] ^= arg
            elif op == "insert":
                data[i:i] = bytes([arg])
            elif op == "delete":
                del data[i : i + arg]
        path.write_bytes(bytes(data))
        read_is_robust(path)


# ---------------------------------------------------------------------------- writer


@pytest.mark.parametrize(
    ("when", "stem"),
    [
        (datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC), "2026-11-24T10_00_00.123456Z"),
        (
            datetime(2026, 11, 24, 11, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1))),
            "2026-11-24T11_00_00.123456+01_00",
        ),
        (
            datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
            "2026-01-02T03_04_05.000000-05_30",
        ),
        (
            datetime(2026, 1, 2, 3, 4, 5, 7, tzinfo=timezone(timedelta(0))),
            "2026-01-02T03_04_05.000007Z",
        ),
    ],
)
def test_capture_file_stem(when: datetime, stem: str) -> None:
    assert capture_file_stem(when) == stem


def test_capture_subdir_layout_and_bad_names(tmp_path: Path) -> None:
    meta = tabular_metadata(component_name="temp:1")
    assert capture_subdir(tmp_path / "c:d", meta) == (
        tmp_path / "c:d" / "rdk_component_sensor" / "temp_1" / "Readings"
    )
    for bad in ("", "..", "a/b", "x\x00"):
        with pytest.raises(ValueError):
            capture_subdir(tmp_path, tabular_metadata(component_name=bad))


def test_writer_layout_names_and_permissions(tmp_path: Path) -> None:
    capture_dir = tmp_path / "capture"
    clock = FakeClock(timezone(timedelta(hours=1)))
    with CaptureWriter(capture_dir, tabular_metadata(), clock=clock) as writer:
        assert writer.path is None  # nothing on disk before the first reading
        taken = clock()  # 11:00:00.124456+01:00; the file opens one tick later
        writer.write_tabular({"seq": 1}, time_requested=taken, time_received=taken)
        prog = writer.path
        assert prog is not None and prog.suffix == ".prog"
        assert prog.stat().st_size == 0  # still in the 4 KiB buffer
        writer.flush()
        assert prog.stat().st_size > 0
        writer.sync()
    assert not prog.exists()
    (final,) = writer.closed_paths
    assert final.relative_to(capture_dir).parts == (
        "rdk_component_sensor",
        "temp1",
        "Readings",
        "2026-11-24T11_00_00.125456+01_00.capture",
    )
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    for d in (capture_dir, *final.relative_to(capture_dir).parents):
        assert stat.S_IMODE((capture_dir / d).stat().st_mode) == 0o700
    result = read_all(final)
    assert struct_to_py(result.records[0].reading.struct) == {"seq": 1.0}
    assert result.records[0].reading.metadata.time_requested.ToDatetime(tzinfo=UTC) == taken


def test_writer_rotates_by_size_age_and_count(tmp_path: Path) -> None:
    by_size = CaptureWriter(
        tmp_path / "s", tabular_metadata(), max_file_bytes=500, clock=FakeClock()
    )
    with by_size:
        for i in range(40):
            by_size.write(tabular_reading(i, 20))
    assert len(by_size.closed_paths) > 3
    got = [r.reading for p in by_size.closed_paths for r in read_all(p).records]
    assert got == [tabular_reading(i, 20) for i in range(40)]
    assert [p.name for p in by_size.closed_paths] == sorted(p.name for p in by_size.closed_paths)

    clock = FakeClock(step=timedelta(seconds=1))
    with CaptureWriter(tmp_path / "a", tabular_metadata(), max_file_age_s=3.5, clock=clock) as w:
        for i in range(10):
            w.write(tabular_reading(i))
    assert [len(read_all(p).records) for p in w.closed_paths] == [4, 4, 2]

    binary = tabular_metadata(type=pb.DATA_TYPE_BINARY_SENSOR, file_extension=".jpeg")
    with CaptureWriter(tmp_path / "b", binary, clock=FakeClock()) as w:
        for i in range(3):
            w.write_binary(bytes([i]) * 10, mime_type=pb.MIME_TYPE_IMAGE_JPEG)
        assert w.rotate() is not None
        assert w.rotate() is None
    assert len(w.closed_paths) == 3  # one reading per binary file, as the robot writes
    assert [read_all(p).records[0].reading.binary for p in w.closed_paths] == [
        bytes([i]) * 10 for i in range(3)
    ]


def test_writer_unique_names_with_a_stopped_clock(tmp_path: Path) -> None:
    frozen = datetime(2026, 1, 1, tzinfo=UTC)
    with CaptureWriter(tmp_path, tabular_metadata(), clock=lambda: frozen) as w:
        for i in range(3):
            w.write(tabular_reading(i))
            w.rotate()
    names = [p.name for p in w.closed_paths]
    assert names == [
        "2026-01-01T00_00_00.000000Z.capture",
        "2026-01-01T00_00_00.000001Z.capture",
        "2026-01-01T00_00_00.000002Z.capture",
    ]


def test_writer_refuses_mismatched_readings_and_writes_after_close(tmp_path: Path) -> None:
    w = CaptureWriter(tmp_path, tabular_metadata(), clock=FakeClock())
    with pytest.raises(ValueError):
        w.write(pb.SensorData(binary=b"x"))
    assert w.close() is None
    with pytest.raises(ValueError):
        w.write(tabular_reading(1))


safe_text = st.text(st.characters(codec="utf-8"), max_size=8)
segment = st.text(
    st.characters(categories=("L", "N"), include_characters=":._- "), min_size=1, max_size=10
).filter(lambda s: s.replace(":", "_") not in (".", ".."))
json_value = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | safe_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=8,
)
stamps = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def capture_sets(draw: st.DrawFn) -> tuple[pb.DataCaptureMetadata, list[pb.SensorData]]:
    tabular = draw(st.booleans())
    meta = pb.DataCaptureMetadata(
        component_type=draw(segment),
        component_name=draw(segment),
        method_name=draw(segment),
        type=pb.DATA_TYPE_TABULAR_SENSOR if tabular else pb.DATA_TYPE_BINARY_SENSOR,
        file_extension=draw(st.sampled_from([".dat", ".jpeg", ".pcd", ""])),
        tags=draw(st.lists(safe_text, max_size=3)),
        mime_type=draw(st.sampled_from(["", "image/jpeg"])),
    )
    for key, value in draw(st.dictionaries(safe_text, json_value, max_size=3)).items():
        meta.method_parameters[key].Pack(py_value(value))
    readings: list[pb.SensorData] = []
    for _ in range(draw(st.integers(1, 12))):
        reading = pb.SensorData()
        if tabular:
            reading.struct.SetInParent()  # an empty dict is still a (struct) reading
            reading.struct.update(draw(st.dictionaries(safe_text, json_value, max_size=4)))
        else:
            reading.binary = draw(st.binary(max_size=3000))
            reading.metadata.mime_type = draw(
                st.sampled_from(
                    [pb.MIME_TYPE_UNSPECIFIED, pb.MIME_TYPE_IMAGE_JPEG, pb.MIME_TYPE_IMAGE_PNG]
                )
            )
        reading.metadata.time_requested.FromDatetime(draw(stamps))
        reading.metadata.time_received.FromDatetime(draw(stamps))
        readings.append(reading)
    return meta, readings


@FAST
@given(
    case=capture_sets(),
    max_bytes=st.integers(1, 4096),
    tz=st.sampled_from(
        [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-9, minutes=-30))]
    ),
)
def test_writer_round_trip(
    case: tuple[pb.DataCaptureMetadata, list[pb.SensorData]], max_bytes: int, tz: timezone
) -> None:
    meta, readings = case
    with tempfile.TemporaryDirectory() as tmp:
        capture_dir = Path(tmp) / "capture"
        with CaptureWriter(capture_dir, meta, max_file_bytes=max_bytes, clock=FakeClock(tz)) as w:
            for reading in readings:
                w.write(reading)
        expected_dir = capture_subdir(capture_dir, meta)
        assert not list(capture_dir.rglob("*.prog"))
        assert sorted(capture_dir.rglob("*.capture")) == sorted(w.closed_paths)
        got: list[pb.SensorData] = []
        for i, path in enumerate(w.closed_paths):
            assert path.parent == expected_dir
            assert STEM_RE.fullmatch(path.name.removesuffix(".capture"))
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            result = read_all(path)
            assert result.metadata == meta
            assert result.truncated_at is None
            assert result.records
            for record in result.records[1:]:  # each later reading began below the bound
                assert record.offset < max_bytes
            if i < len(w.closed_paths) - 1 and meta.type == pb.DATA_TYPE_TABULAR_SENSOR:
                assert path.stat().st_size >= max_bytes  # rotated only once past it
            got.extend(r.reading for r in result.records)
        assert got == readings
        if meta.type == pb.DATA_TYPE_BINARY_SENSOR:
            assert len(w.closed_paths) == len(readings)
        for d in [expected_dir, *expected_dir.relative_to(capture_dir).parents]:
            assert stat.S_IMODE((capture_dir / d).stat().st_mode) == 0o700


# ---------------------------------------------------------------------------- legacy


def _legacy_reading(images: Any) -> pb.SensorData:
    reading = pb.SensorData()
    reading.struct.update({"images": images, "response_metadata": {"captured_at": "x"}})
    return reading


def test_split_legacy_images(tmp_path: Path) -> None:
    binary = tabular_metadata(type=pb.DATA_TYPE_BINARY_SENSOR, method_name="GetImages")
    jpeg, png, depth = b"\xff\xd8jpeg", b"\x89PNGpng?", b"\x00\x01\xfb\xff"
    reading = _legacy_reading(
        [
            {
                "source_name": "left",
                "format": "FORMAT_JPEG",
                "image": base64.b64encode(jpeg).decode(),
            },
            {"mimeType": "image/png", "image": base64.b64encode(png).decode()},
            {
                "sourceName": "depth",
                "format": 2,
                "image": base64.urlsafe_b64encode(depth).decode().rstrip("="),
            },
        ]
    )
    # The reader hands such a reading over as is; the split is the uploader's step.
    path = tmp_path / "legacy.capture"
    write_file(path, binary, [reading])
    (record,) = read_all(path).records
    images = split_legacy_images(binary, record.reading)
    assert images is not None
    assert [(i.data, i.mime_type, i.source_name) for i in images] == [
        (jpeg, "image/jpeg", "left"),
        (png, "image/png", ""),
        (depth, "image/vnd.viam.dep", "depth"),
    ]
    assert [i.mime_type_enum for i in images] == [
        pb.MIME_TYPE_IMAGE_JPEG,
        pb.MIME_TYPE_IMAGE_PNG,
        pb.MIME_TYPE_UNSPECIFIED,
    ]
    assert split_legacy_images(binary, _legacy_reading([])) == []
    assert split_legacy_images(binary, pb.SensorData(binary=b"x")) is None
    assert split_legacy_images(binary, pb.SensorData()) is None
    assert split_legacy_images(tabular_metadata(), reading) is None


@pytest.mark.parametrize(
    "images",
    [None, "not a list", [1], [{"format": "FORMAT_PNG"}], [{"image": "!!not base64!!"}]],
)
def test_split_legacy_images_unsplittable(images: Any) -> None:
    binary = tabular_metadata(type=pb.DATA_TYPE_BINARY_SENSOR, method_name="GetImages")
    reading = pb.SensorData()
    reading.struct.SetInParent()
    reading.struct.update({} if images is None else {"images": images})
    with pytest.raises(ValueError):
        split_legacy_images(binary, reading)


# ------------------------------------------------------------------------- SIGKILL

CHILD = """
import sys
from datetime import datetime, timezone
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter

meta = pb.DataCaptureMetadata(
    component_type="rdk:component:sensor", component_name="s1", method_name="Readings",
    type=pb.DATA_TYPE_TABULAR_SENSOR, file_extension=".dat",
)
writer = CaptureWriter(sys.argv[1], meta, max_file_bytes=1 << 40)
t = datetime(2026, 1, 1, tzinfo=timezone.utc)
for i in range(50_000_000):
    writer.write_tabular({"seq": i, "pad": "x" * (i % 97)}, time_requested=t, time_received=t)
    if i % 401 == 0:
        writer.flush()
"""


def _wait_for_prog(capture_dir: Path, proc: subprocess.Popen[bytes], min_size: int) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"writer exited early: {proc.stderr and proc.stderr.read()!r}"
        progs = list(capture_dir.rglob("*.prog"))
        if progs and progs[0].stat().st_size >= min_size:
            return progs[0]
        time.sleep(0.005)  # polling interval, not synchronisation: the loop checks the state
    raise AssertionError("writer did not produce a .prog file in time")


def test_sigkill_mid_write_leaves_a_readable_prog(tmp_path: Path) -> None:
    capture_dir = tmp_path / "capture"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(capture_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        prog = _wait_for_prog(capture_dir, proc, min_size=200 * 1024)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert not list(capture_dir.rglob("*.capture"))
    result = read_all(prog)
    seqs = [int(r.reading.struct.fields["seq"].number_value) for r in result.records]
    assert len(seqs) > 100
    assert seqs == list(range(len(seqs)))  # what reached the file, in order, nothing else
    pads = [r.reading.struct.fields["pad"].string_value for r in result.records]
    assert pads == ["x" * (i % 97) for i in range(len(seqs))]
    last_end = result.records[-1].end
    assert result.truncated_at in (None, last_end)
    if result.truncated_at is None:
        assert last_end == prog.stat().st_size


def test_writer_empty_tabular_reading_and_idle_sync(tmp_path: Path) -> None:
    with CaptureWriter(tmp_path, tabular_metadata(), clock=FakeClock()) as w:
        w.sync()  # nothing open yet: no file is created
        w.flush()
        assert not list(tmp_path.rglob("*.*"))
        w.write_tabular({})
    (record,) = read_all(w.closed_paths[0]).records
    assert record.reading.WhichOneof("data") == "struct"
    assert struct_to_py(record.reading.struct) == {}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_robot_finishes_its_files_on_a_stop_signal(tmp_path: Path, sig: int) -> None:
    """`make run` ends the demo with SIGTERM (Ctrl-C: SIGINT); a `.prog` left behind
    would be "recovered" (or, still empty, reported) by the next run."""
    out = tmp_path / "capture"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged.daemon.demo", str(out), "--hz", "50"], stdout=subprocess.PIPE
    )
    try:
        read_line(proc, 30)  # "demo robot writing ..."
        deadline = time.monotonic() + 30
        while not list(out.rglob("*.prog")):
            assert time.monotonic() < deadline, "the demo opened no capture file"
            time.sleep(0.02)
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert list(out.rglob("*.prog")) == []
    finished = list(out.rglob("*.capture"))
    assert finished
    for path in finished:
        with open_capture(path) as reader:
            assert sum(1 for _ in reader) >= 1


def test_writer_can_share_its_files_with_a_daemon_group(tmp_path: Path) -> None:
    """A robot writer sharing with a daemon that runs as its own user (the dedicated-user
    drop-in): group-readable files in setgid, group-writable directories, exactly, with
    a restrictive umask in force."""
    old = os.umask(0o077)
    try:
        with CaptureWriter(
            tmp_path / "cap", tabular_metadata(), file_mode=0o640, dir_mode=0o2770
        ) as writer:
            writer.write(tabular_reading(0))
    finally:
        os.umask(old)
    (final,) = writer.closed_paths
    assert stat.S_IMODE(final.stat().st_mode) == 0o640
    for d in final.relative_to(tmp_path / "cap").parents:
        assert stat.S_IMODE((tmp_path / "cap" / d).stat().st_mode) == 0o2770
    with pytest.raises(ValueError, match="permission bits"):
        CaptureWriter(tmp_path / "x", tabular_metadata(), file_mode=0o10000)
