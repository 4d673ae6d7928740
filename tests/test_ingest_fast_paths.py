"""The ingest's fast paths (issue #15) store what the general ones stored.

- the stored JSON is read straight from a Struct's wire bytes (`struct_json`): the
  same document as `json.dumps` of the parsed Struct, NaN/Inf rules included;
- concurrent tabular uploads share one transaction (group commit), each in its own
  savepoint: one that fails takes no other upload's rows with it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from google.protobuf.struct_pb2 import Struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture.codec import encode_varint
from edged.ingest import catalog
from edged.ingest.datasync import GroupCommit
from edged.ingest.storage import IngestStore, UploadIds
from edged.ingest.values import (
    BYTES_ONLY,
    _encode_struct_general,
    decode_python,
    decode_struct,
    encode_struct,
    stored_json,
    struct_json,
)
from tests.support.struct_values import TEXT, structs

_char = st.characters(exclude_categories=["Cs"])
# Short texts, and long ones (over 127 bytes: multi-byte length prefixes) built as repeats.
_structs = structs(TEXT | st.builds(lambda c, n: c * n, _char, st.integers(120, 300)))
# Long strings on a busy machine: generation may be slow, which says nothing about the code.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]


def _struct(d: dict[str, Any]) -> Struct:
    s = Struct()
    s.update(d)
    return s


def _ld(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + encode_varint(len(body)) + body


# -- ingest stored form ----------------------------------------------------------------------


def _canonical(text: str) -> str:
    """The JSON with its keys sorted: a Struct is a map, its key order means nothing
    (the fast reader keeps the wire order, the general path upb's map order)."""
    return json.dumps(json.loads(text), sort_keys=True)


def _same_stored(fast: tuple[str, bytes | None], general: tuple[str, bytes | None]) -> None:
    assert _canonical(fast[0]) == _canonical(general[0])
    assert fast[1] == general[1]


@settings(max_examples=400, deadline=None, suppress_health_check=_SLOW_OK)
@given(_structs)
def test_struct_json_writes_what_the_general_path_writes(data: dict[str, Any]) -> None:
    s = _struct(data)
    fast = encode_struct(s)
    _same_stored(fast, _encode_struct_general(s))
    assert decode_struct(*fast).SerializeToString(deterministic=True) == s.SerializeToString(
        deterministic=True
    )


@settings(max_examples=300, deadline=None, suppress_health_check=_SLOW_OK)
@given(st.binary(max_size=60))
def test_struct_json_on_any_struct_bytes_agrees_or_steps_aside(raw: bytes) -> None:
    try:
        s = Struct.FromString(raw)
    except Exception:
        return  # the server never reaches here with bytes upb refused
    try:
        text, nan = struct_json(s.SerializeToString())
    except Exception as exc:
        assert type(exc).__name__ == "_Unusual"
        return
    general_text, exact = _encode_struct_general(s)
    assert (_canonical(text), nan) == (_canonical(general_text), exact is not None)


def test_unusual_shapes_fall_back_to_the_general_path() -> None:
    def entry(k: bytes, v: bytes) -> bytes:
        return _ld(0x0A, _ld(0x0A, k) + _ld(0x12, v))

    repeated = entry(b"a", b"\x11" + b"\0" * 8) + entry(b"a", b"\x20\x01")
    unset = entry(b"a", b"")
    for raw in (repeated, unset):
        s = Struct.FromString(raw)
        _same_stored(encode_struct(s), _encode_struct_general(s))


# -- ingest group commit ---------------------------------------------------------------------


def _upload(seq: int, dataset_ids: tuple[str, ...] = ()) -> tuple[pb.UploadMetadata, list[Any]]:
    meta = pb.UploadMetadata(
        part_id="p",
        component_name="c",
        type=pb.DATA_TYPE_TABULAR_SENSOR,
        dataset_ids=list(dataset_ids),
    )
    reading = pb.SensorData(struct=_struct({"seq": float(seq)}))
    return meta, [reading, reading]


async def test_concurrent_tabular_uploads_share_transactions_and_fail_alone(
    tmp_path: Path,
) -> None:
    store = await IngestStore.open(tmp_path / "ingest")
    writes = 0
    real_write = store.write

    async def counting_write(fn: Any) -> Any:  # the real write, counted
        nonlocal writes
        writes += 1
        return await real_write(fn)

    store.write = counting_write  # type: ignore[method-assign]
    try:
        group = GroupCommit(store)
        calls = []
        for i in range(12):
            meta, readings = _upload(i, ("no-such-dataset",) if i == 5 else ())
            calls.append(group.run(await store.tabular_writer("org", f"item-{i}", meta, readings)))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[5], catalog.NotFound)
        assert all(isinstance(r, UploadIds) for i, r in enumerate(results) if i != 5)
        assert writes < 12  # the eleven good calls did not each commit on their own
        stored = await store.readings("org")
        assert sorted({r.data["seq"] for r in stored}) == [float(i) for i in range(12) if i != 5]
        assert len(stored) == 22
        # A repeat of an item id inside one group stores nothing twice.
        meta, readings = _upload(0)
        again = await asyncio.gather(
            group.run(await store.tabular_writer("org", "item-0", meta, readings)),
            group.run(await store.tabular_writer("org", "item-0", meta, readings)),
        )
        assert again[0] == again[1] == results[0]
        assert len(await store.readings("org")) == 22
    finally:
        await store.close()


def test_key_cache_holds_only_short_keys() -> None:
    """Keys are cached by their bytes; a caller sending huge keys must not grow it."""
    from edged.ingest import values

    huge = "k" * 100_000
    text, _ = encode_struct(_struct({huge: 1.0, "short": 2.0}))
    assert json.loads(text) == {huge: 1.0, "short": 2.0}
    assert huge.encode() not in values._KEY_TEXT
    assert b"short" in values._KEY_TEXT


# -- reading a row kept as Struct bytes ------------------------------------------------------


def _both_ways(raw: bytes) -> None:
    """A row stored as bytes decodes exactly as the JSON row the writer made of them did
    (key order, -0.0 and NaN included: compared as repr)."""
    assert repr(decode_python(BYTES_ONLY, raw)) == repr(decode_python(*stored_json(raw)))
    got = decode_struct(BYTES_ONLY, raw).SerializeToString()
    assert got == decode_struct(*stored_json(raw)).SerializeToString()


@settings(max_examples=400, deadline=None, suppress_health_check=_SLOW_OK)
@given(_structs)
def test_bytes_rows_decode_as_their_json_rows(data: dict[str, Any]) -> None:
    _both_ways(_struct(data).SerializeToString())


@settings(max_examples=300, deadline=None, suppress_health_check=_SLOW_OK)
@given(st.binary(max_size=60))
def test_bytes_rows_of_any_struct_bytes_decode_as_their_json_rows(raw: bytes) -> None:
    try:
        s = Struct.FromString(raw)
    except Exception:
        return  # the server never stores bytes upb refused
    _both_ways(s.SerializeToString())
    _both_ways(raw)  # as received, when that parses


def test_bytes_rows_with_nan_and_unusual_shapes_decode_as_their_json_rows() -> None:
    def entry(k: bytes, v: bytes) -> bytes:
        return _ld(0x0A, _ld(0x0A, k) + _ld(0x12, v))

    nan = entry(b"n", b"\x11" + bytes.fromhex("000000000000f87f"))
    for raw in (
        entry(b"a", b"\x11" + b"\0" * 8) + entry(b"a", b"\x20\x01"),  # a repeated key
        entry(b"a", b""),  # a Value with no kind
        nan,
        entry(b"s", _ld(0x2A, nan)),  # NaN one level down
        entry(b"l", _ld(0x32, _ld(0x0A, b"\x11" + bytes.fromhex("000000000000f0ff")))),
    ):
        _both_ways(raw)
