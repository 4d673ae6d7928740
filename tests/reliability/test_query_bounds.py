"""What one tenant's queries may cost everyone else, against real servers.

Memory and starvation run `edged ingest` as a subprocess (peak RSS from /proc); status
mapping runs an in-process server. Bounds are generous: they separate "bounded" from
"unbounded" (GiBs, minutes), not fast from slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import bson
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.data.v1.data_grpc import DataServiceStub
from edged._proto.app.dataset.v1.dataset_grpc import DatasetServiceStub
from edged.client import UploadClient
from edged.ingest import ApiKey, IngestServer, IngestSettings
from edged.ingest.limits import QueryLimits
from tests.support.credentials import KeyFile, make_key_file
from tests.support.processes import ingest_process, peak_rss_bytes

MiB = 1 << 20
ORG_A, ORG_B = "org-a", "org-b"

# 16 rows of 15 MB: 240 MB if answered whole (the old server peaked near 1 GiB on it).
SQL_16_BLOBS = (
    "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 16)"
    " SELECT randomblob(15000000) AS b FROM c"
)
SQL_60MB_VALUES = SQL_16_BLOBS.replace("15000000", "60000000")
# Many expensive VM steps between progress checks: outran the old deadline by minutes.
SQL_SLOW_STEPS = (
    "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 10000000)"
    " SELECT max(length(randomblob(10000000))) AS m FROM c"
)


def amplifying_pipeline(levels: int = 10, fan: int = 8) -> list[bytes]:
    """Each stage lists the previous field `fan` times: fan**levels values when encoded."""
    stages: list[dict[str, Any]] = [{"$limit": 1}, {"$addFields": {"f0": "$data"}}]
    stages += [{"$addFields": {f"f{k}": [f"$f{k - 1}"] * fan}} for k in range(1, levels + 1)]
    return [bson.encode(s) for s in stages]


def _keys(tmp_path: Path) -> tuple[KeyFile, KeyFile]:
    return make_key_file(tmp_path), make_key_file(tmp_path)


def _args(a: KeyFile, b: KeyFile, *extra: str) -> list[str]:
    return [
        *("--api-key-id", a.key_id, "--api-key-file", str(a.path), "--org-id", ORG_A),
        *("--api-key-id", b.key_id, "--api-key-file", str(b.path), "--org-id", ORG_B),
        *extra,
    ]


class Caller:
    """One organisation's upload client and DataService stub on a plaintext channel."""

    def __init__(self, port: int, key: KeyFile) -> None:
        self.up = UploadClient(
            f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
        )
        self.data = DataServiceStub(self.up.channel)
        self.sets = DatasetServiceStub(self.up.channel)
        self.md: dict[str, str] = {}

    async def __aenter__(self) -> Caller:
        self.md = await self.up.metadata()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.up.close()

    async def sql(self, query: str, timeout: float = 120) -> list[dict[str, Any]]:
        resp = await self.data.TabularDataBySQL(
            dpb.TabularDataBySQLRequest(sql_query=query), metadata=self.md, timeout=timeout
        )
        return [bson.decode(r) for r in resp.raw_data]

    async def mql(self, stages: list[bytes], timeout: float = 120) -> list[dict[str, Any]]:
        resp = await self.data.TabularDataByMQL(
            dpb.TabularDataByMQLRequest(mql_binary=stages), metadata=self.md, timeout=timeout
        )
        return [bson.decode(r) for r in resp.raw_data]

    async def reading(self, value: int) -> str:
        return await self.up.tabular_data_capture_upload(
            [{"v": value, "pad": "x" * 100}], "part", "rdk:component:sensor", "s", "Readings"
        )


async def status_of(call: Awaitable[Any]) -> tuple[Status, str]:
    with pytest.raises(GRPCError) as info:
        await call
    return info.value.status, info.value.message or ""


# ---------------------------------------------------------------- memory (items 3, 4)


async def test_heavy_answers_are_refused_within_bounded_memory(tmp_path: Path) -> None:
    a, b = _keys(tmp_path)
    with ingest_process(tmp_path / "ingest", _args(a, b)) as (server, port):
        async with Caller(port, a) as org_a:
            await org_a.reading(1)
            status, msg = await status_of(org_a.sql(SQL_16_BLOBS))
            assert status is Status.RESOURCE_EXHAUSTED and "--query-max-result-bytes" in msg
            status, msg = await status_of(org_a.sql(SQL_60MB_VALUES))
            assert status is Status.RESOURCE_EXHAUSTED and "--query-max-value-bytes" in msg
            status, msg = await status_of(org_a.mql(amplifying_pipeline()))
            assert status is Status.RESOURCE_EXHAUSTED and "--query-max-value-bytes" in msg
            assert await org_a.sql("SELECT count(*) AS n FROM readings") == [{"n": 1}]
        peak = peak_rss_bytes(server.pid)
    print(f"\nedged ingest peak RSS {peak / MiB:.0f} MiB")
    assert peak < 450 * MiB


# ---------------------------------------------------------------- starvation (item 3)


async def test_heavy_queries_starve_neither_uploads_nor_other_orgs(tmp_path: Path) -> None:
    """More slow queries than the default thread pool has threads: another org's upload
    and query still finish, extra queries are refused, and a disconnect frees the slot."""
    a, b = _keys(tmp_path)
    many = min(32, (os.cpu_count() or 1) + 4)  # fills asyncio's default pool
    extra = ("--query-timeout", "600")  # only the disconnect can stop them in this test
    with ingest_process(tmp_path / "ingest", _args(a, b, *extra)) as (_, port):
        async with Caller(port, a) as org_a, Caller(port, b) as org_b:
            heavy = [asyncio.ensure_future(org_a.sql(SQL_SLOW_STEPS)) for _ in range(many)]
            try:
                # All but the organisation's two slots are refused after the queue wait.
                done, _ = await asyncio.wait(heavy, timeout=60, return_when="FIRST_COMPLETED")
                refused = await _refusals(heavy, many - 2)
                assert len(refused) == many - 2
                assert all("--query-max-per-org" in m for m in refused)
                assert done
                await asyncio.wait_for(org_b.reading(7), 10)
                rows = await asyncio.wait_for(org_b.sql("SELECT count(*) AS n FROM readings"), 10)
                assert rows == [{"n": 1}]
            finally:
                for task in heavy:
                    task.cancel()
                await asyncio.gather(*heavy, return_exceptions=True)
            # The cancelled calls were interrupted: org A gets a slot again long before
            # its 600 s timeout would have ended them.
            rows = await _retry_until_admitted(org_a, "SELECT 1 AS one", 30)
            assert rows == [{"one": 1}]


async def _refusals(tasks: Sequence[asyncio.Future[Any]], want: int) -> list[str]:
    """Messages of the RESOURCE_EXHAUSTED tasks once `want` have finished (bounded wait)."""
    async with asyncio.timeout(60):
        while sum(t.done() for t in tasks) < want:
            await asyncio.wait([t for t in tasks if not t.done()], return_when="FIRST_COMPLETED")
    out = []
    for t in tasks:
        if t.done() and isinstance(t.exception(), GRPCError):
            err = t.exception()
            assert isinstance(err, GRPCError)
            if err.status is Status.RESOURCE_EXHAUSTED:
                out.append(err.message or "")
    return out


async def _retry_until_admitted(caller: Caller, query: str, within: float) -> Any:
    async with asyncio.timeout(within):
        while True:
            try:
                return await caller.sql(query)
            except GRPCError as err:
                if err.status is not Status.RESOURCE_EXHAUSTED:
                    raise


# ---------------------------------------------------------------- in-process server

LIMITS = QueryLimits(max_page_binary_bytes=1000)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[IngestServer, Caller]]:
    a, b = _keys(tmp_path)
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(ApiKey(a.key_id, a.secret, ORG_A), ApiKey(b.key_id, b.secret, ORG_B)),
        synchronous="OFF",
        query_limits=LIMITS,
    )
    async with IngestServer(settings) as srv, Caller(srv.port, a) as org_a:
        yield srv, org_a


async def _image(caller: Caller, size: int) -> str:
    return await caller.up.binary_data_capture_upload(
        b"\xff" * size, "part", "rdk:component:camera", "cam", "GetImages", ".jpg"
    )


async def test_binary_by_ids_keeps_the_page_byte_budget(
    served: tuple[IngestServer, Caller],
) -> None:
    _, org_a = served
    ids = [await _image(org_a, 600) for _ in range(3)]

    def by_ids(these: list[str], binary: bool = True) -> Any:
        req = dpb.BinaryDataByIDsRequest(binary_data_ids=these, include_binary=binary)
        return org_a.data.BinaryDataByIDs(req, metadata=org_a.md)

    status, msg = await status_of(by_ids(ids))
    assert status is Status.RESOURCE_EXHAUSTED
    assert "limit of 1000 bytes" in msg and "the first 1 fit" in msg
    one = await by_ids(ids[:1])
    assert len(one.data) == 1 and len(one.data[0].binary) == 600
    meta_only = await by_ids(ids, binary=False)
    assert meta_only.count == 3
    page = await org_a.data.BinaryDataByFilter(
        dpb.BinaryDataByFilterRequest(include_binary=True), metadata=org_a.md
    )
    assert page.count == 1  # same budget, same "at least one item"


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def _deep_bson(depth: int) -> bytes:
    raw = b""
    for _ in range(depth):
        body = b"\x03a\x00" + raw if raw else b""
        raw = (len(body) + 5).to_bytes(4, "little") + body + b"\x00"
    return raw


async def test_hostile_values_are_refused_naming_the_field(
    served: tuple[IngestServer, Caller],
) -> None:
    _, org_a = served
    await org_a.reading(1)
    d, md = org_a.data, org_a.md
    deep_json = (
        "SELECT replace(hex(zeroblob(50000)), '0', '[')"
        " || replace(hex(zeroblob(50000)), '0', ']') AS j"
    )
    # Factories, not coroutines: a failing case must leave no un-awaited call behind.
    # A BSON document nested 3000 deep is refused by the decoder (INVALID_ARGUMENT) or,
    # where the C decoder manages it (Python 3.13), by the depth bound (RESOURCE_EXHAUSTED).
    either = {Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED}
    cases: list[tuple[Callable[[], Awaitable[Any]], set[Status], str]] = [
        (lambda: org_a.sql(deep_json), {Status.RESOURCE_EXHAUSTED}, "column 'j'"),
        (lambda: org_a.mql([_deep_bson(3000)]), either, "mql_binary[0]"),
        (
            lambda: org_a.mql([bson.encode(_nested_match(200))]),
            {Status.RESOURCE_EXHAUSTED},
            "nests deeper",
        ),
        (
            lambda: org_a.mql([bson.encode({"$limit": 1})] * 5000),
            {Status.RESOURCE_EXHAUSTED},
            "stages",
        ),
        (lambda: org_a.mql([bson.encode({"$limit": 1e300})]), {Status.INVALID_ARGUMENT}, "$limit"),
        (
            lambda: org_a.mql([bson.encode({"$limit": float("inf")})]),
            {Status.INVALID_ARGUMENT},
            "$limit",
        ),
        (
            lambda: d.TabularDataByFilter(
                dpb.TabularDataByFilterRequest(
                    data_request=dpb.DataRequest(
                        filter=dpb.Filter(interval=dpb.CaptureInterval(start=_ts(2**62)))
                    )
                ),
                metadata=md,
            ),
            {Status.INVALID_ARGUMENT},
            "filter.interval.start",
        ),
        (
            lambda: d.TabularDataByFilter(
                dpb.TabularDataByFilterRequest(
                    data_request=dpb.DataRequest(last="e1." + _token(2**70, 1))
                ),
                metadata=md,
            ),
            {Status.INVALID_ARGUMENT},
            "data_request.last",
        ),
    ]
    for call, want, field in cases:
        status, msg = await status_of(call())
        assert (status in want, field in msg) == (True, True), (field, status, msg)
    # 2**32 - 1 days is before anything: nothing deleted, no error.
    deleted = await d.DeleteTabularData(
        dpb.DeleteTabularDataRequest(delete_older_than_days=2**32 - 1), metadata=md
    )
    assert deleted.deleted_count == 0
    assert await org_a.sql("SELECT count(*) AS n FROM readings") == [{"n": 1}]


def _nested_match(depth: int) -> dict[str, Any]:
    cond: dict[str, Any] = {"a": 1}
    for _ in range(depth):
        cond = {"$and": [cond]}
    return {"$match": cond}


def _token(when: int, rowid: int) -> str:
    import base64

    return base64.urlsafe_b64encode(f"{when}:{rowid}".encode()).decode().rstrip("=")


# ---------------------------------------------------------------- garbage requests


class _RawCodec(ProtoCodec):
    """Sends request bytes as given; responses decode as usual."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message if isinstance(message, bytes) else super().encode(message, message_type)


QUERY_METHODS = [
    (f"/viam.app.data.v1.DataService/{m.name}", m)
    for m in dpb.DESCRIPTOR.services_by_name["DataService"].methods
] + [
    (f"/viam.app.dataset.v1.DatasetService/{m.name}", m)
    for m in __import__("edged._proto.app.dataset.v1.dataset_pb2", fromlist=["DESCRIPTOR"])
    .DESCRIPTOR.services_by_name["DatasetService"]
    .methods
]


@pytest.fixture(scope="module")
def garbage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    tmp = tmp_path_factory.mktemp("garbage")
    a, b = _keys(tmp)
    with ingest_process(tmp / "ingest", _args(a, b)) as (_, port):

        async def token() -> dict[str, str]:
            async with Caller(port, a) as caller:
                await caller.reading(1)
                return caller.md

        md = asyncio.run(token())
        yield port, md["authorization"]


async def _raw_call(port: int, auth: str, path: str, body: bytes) -> Status:
    channel = Channel("127.0.0.1", port, codec=_RawCodec())
    try:
        async with channel.request(
            path,
            Cardinality.UNARY_UNARY,
            bytes,
            _Any,
            timeout=30,
            metadata={"authorization": auth},
        ) as stream:
            await stream.send_message(body, end=True)
            try:
                await stream.recv_message()
            except GRPCError as err:
                return err.status
            with contextlib.suppress(GRPCError):
                await stream.recv_trailing_metadata()
        return Status.OK
    finally:
        channel.close()


class _Any:
    """A response type that accepts any bytes (we only look at the status)."""

    @classmethod
    def FromString(cls, data: bytes) -> _Any:
        return cls()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(QUERY_METHODS),
    body=st.one_of(st.binary(max_size=64), st.binary(min_size=1, max_size=8).map(lambda b: b * 9)),
)
def test_garbage_request_bytes_never_answer_unknown(
    garbage_server: tuple[int, str], method: tuple[str, Any], body: bytes
) -> None:
    port, auth = garbage_server
    status = asyncio.run(_raw_call(port, auth, method[0], body))
    assert status not in (Status.UNKNOWN, Status.INTERNAL), (method[0], body, status)


async def test_a_request_that_is_not_a_message_is_invalid_argument(
    garbage_server: tuple[int, str],
) -> None:
    port, auth = garbage_server
    path = "/viam.app.data.v1.DataService/TabularDataByFilter"
    assert await _raw_call(port, auth, path, b"\x0a\xff\xff\xff") is Status.INVALID_ARGUMENT
