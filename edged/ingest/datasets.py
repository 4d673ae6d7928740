"""DatasetService: named sets of binary data, one namespace of names per organisation.

Scoping follows the rest of the query API: ids of another organisation answer NOT_FOUND
like unknown ids; ListDatasetsByOrganizationID (and CreateDataset) naming an organisation
other than the API key's answer PERMISSION_DENIED rather than an empty list, so a
misconfigured script fails loudly instead of seeing "no datasets".
"""

from __future__ import annotations

from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from edged._proto.app.dataset.v1 import dataset_grpc
from edged._proto.app.dataset.v1 import dataset_pb2 as spb
from edged.ingest import catalog
from edged.ingest.auth import ApiKey, KeyStore
from edged.ingest.catalog import Conn, DatasetRow
from edged.ingest.query import check_org, invalid, translate_errors, ts
from edged.ingest.storage import IngestStore

MAX_NAME = 256


def check_name(name: str) -> str:
    if not name.strip():
        raise invalid("name is required")
    if "\x00" in name:
        raise invalid("name contains a NUL character (U+0000), which cannot be stored")
    if len(name) > MAX_NAME:
        raise invalid(f"name is {len(name)} characters; the limit is {MAX_NAME}")
    return name


def to_proto(row: DatasetRow) -> spb.Dataset:
    return spb.Dataset(
        id=row.id,
        name=row.name,
        organization_id=row.org_id,
        time_created=ts(row.created_on_ns),
        type=spb.DATASET_TYPE_BINARY_DATA,
    )


def _exists(name: str) -> GRPCError:
    return GRPCError(Status.ALREADY_EXISTS, f"a dataset named {name!r} already exists")


class DatasetService(dataset_grpc.DatasetServiceBase):
    def __init__(self, store: IngestStore, keys: KeyStore) -> None:
        self._store = store
        self._keys = keys

    async def _request(self, stream: Stream[Any, Any]) -> tuple[ApiKey, Any]:
        caller = self._keys.caller(stream)
        req = await stream.recv_message()
        assert req is not None
        return caller, req

    async def CreateDataset(
        self, stream: Stream[spb.CreateDatasetRequest, spb.CreateDatasetResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        name = check_name(req.name)
        if req.HasField("type") and req.type != spb.DATASET_TYPE_BINARY_DATA:
            raise invalid("type: only DATASET_TYPE_BINARY_DATA datasets are supported")
        try:
            dataset_id = await self._store.write(lambda c: catalog.create_dataset(c, org, name))
        except catalog.Conflict:
            raise _exists(name) from None
        await stream.send_message(spb.CreateDatasetResponse(id=dataset_id))

    async def DeleteDataset(
        self, stream: Stream[spb.DeleteDatasetRequest, spb.DeleteDatasetResponse]
    ) -> None:
        caller, req = await self._request(stream)
        if not req.id:
            raise invalid("id is required")
        with translate_errors():
            await self._store.write(lambda c: catalog.delete_dataset(c, caller.org_id, req.id))
        await stream.send_message(spb.DeleteDatasetResponse())

    async def RenameDataset(
        self, stream: Stream[spb.RenameDatasetRequest, spb.RenameDatasetResponse]
    ) -> None:
        caller, req = await self._request(stream)
        if not req.id:
            raise invalid("id is required")
        name = check_name(req.name)
        try:
            with translate_errors():
                await self._store.write(
                    lambda c: catalog.rename_dataset(c, caller.org_id, req.id, name)
                )
        except catalog.Conflict:
            raise _exists(name) from None
        await stream.send_message(spb.RenameDatasetResponse())

    async def ListDatasetsByOrganizationID(
        self,
        stream: Stream[
            spb.ListDatasetsByOrganizationIDRequest, spb.ListDatasetsByOrganizationIDResponse
        ],
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        wanted = req.type if req.HasField("type") else spb.DATASET_TYPE_BINARY_DATA
        rows = await self._store.read(lambda c: catalog.list_datasets(c, org))
        datasets = [to_proto(r) for r in rows] if wanted == spb.DATASET_TYPE_BINARY_DATA else []
        await stream.send_message(spb.ListDatasetsByOrganizationIDResponse(datasets=datasets))

    async def ListDatasetsByIDs(
        self, stream: Stream[spb.ListDatasetsByIDsRequest, spb.ListDatasetsByIDsResponse]
    ) -> None:
        caller, req = await self._request(stream)
        if not req.ids:
            raise invalid("ids is empty; give at least one dataset id")
        ids = list(dict.fromkeys(req.ids))

        def fetch(conn: Conn) -> list[DatasetRow]:
            return [catalog.get_dataset(conn, caller.org_id, i) for i in ids]

        with translate_errors():
            rows = await self._store.read(fetch)
        await stream.send_message(
            spb.ListDatasetsByIDsResponse(datasets=[to_proto(r) for r in rows])
        )

    async def MergeDatasets(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "MergeDatasets is not implemented by edged ingest")

    async def StartSequenceDatasetExport(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(
            Status.UNIMPLEMENTED, "StartSequenceDatasetExport is not implemented by edged ingest"
        )

    async def GetSequenceDatasetExport(self, stream: Stream[Any, Any]) -> None:
        raise GRPCError(
            Status.UNIMPLEMENTED, "GetSequenceDatasetExport is not implemented by edged ingest"
        )
