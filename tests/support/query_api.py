"""Callers of the query API (DataService + DatasetService) on a real loopback ingest:
two API keys of two organisations, each with its upload client and query stubs."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged._proto.app.data.v1 import data_pb2 as dpb
from edged._proto.app.data.v1.data_grpc import DataServiceStub
from edged._proto.app.dataset.v1.dataset_grpc import DatasetServiceStub
from edged.client import UploadClient
from edged.ingest import ApiKey, IngestServer, IngestSettings
from tests.support.credentials import Certs, make_key_file

T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
ORG, ORG2, LOC = "org-1", "org-2", "loc-1"


@dataclass
class Api:
    """One caller: its upload client and query stubs with the bearer token."""

    up: UploadClient
    data: DataServiceStub
    sets: DatasetServiceStub
    md: dict[str, str]


async def open_api(server: IngestServer, key_id: str, secret: str, certs: Certs) -> Api:
    up = UploadClient(server.address, api_key_id=key_id, api_key=secret, ca_file=certs.ca_file)
    return Api(up, DataServiceStub(up.channel), DatasetServiceStub(up.channel), await up.metadata())


@asynccontextmanager
async def two_orgs(
    tmp_path: Path, certs: Certs, location: str = "", database: str | None = None
) -> AsyncIterator[tuple[IngestServer, Api, Api]]:
    """A TLS ingest server with a key of ORG (in `location`) and one of ORG2, its index in
    `database` (PostgreSQL) if given; yields the server and one caller per organisation."""
    k1, k2 = make_key_file(tmp_path), make_key_file(tmp_path)
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(ApiKey(k1.key_id, k1.secret, ORG, location), ApiKey(k2.key_id, k2.secret, ORG2)),
        tls_cert=certs.cert_file,
        tls_key=certs.key_file,
        shutdown_grace_s=2.0,
        synchronous="OFF",
        database=database,
    )
    async with IngestServer(settings) as srv:
        a = await open_api(srv, k1.key_id, k1.secret, certs)
        b = await open_api(srv, k2.key_id, k2.secret, certs)
        try:
            yield srv, a, b
        finally:
            a.up.close()
            b.up.close()


async def status_of(call: Awaitable[Any]) -> tuple[Status, str]:
    """The gRPC status and message `call` fails with (it must fail)."""
    with pytest.raises(GRPCError) as info:
        await call
    return info.value.status, info.value.message or ""


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def tabular_req(
    f: dpb.Filter | None = None, *, limit: int = 0, last: str = "", order: int = 0, **kw: Any
) -> dpb.TabularDataByFilterRequest:
    dr = dpb.DataRequest(filter=f or dpb.Filter(), limit=limit, last=last, sort_order=order)  # type: ignore[arg-type]
    return dpb.TabularDataByFilterRequest(data_request=dr, **kw)


def binary_req(
    f: dpb.Filter | None = None, *, limit: int = 0, last: str = "", order: int = 0, **kw: Any
) -> dpb.BinaryDataByFilterRequest:
    dr = dpb.DataRequest(filter=f or dpb.Filter(), limit=limit, last=last, sort_order=order)  # type: ignore[arg-type]
    return dpb.BinaryDataByFilterRequest(data_request=dr, **kw)
