"""DataService: read back, curate and delete what `edged ingest` stored.

Every call is scoped to the organisation of the caller's API key (org "" on an open
server). Ids of another organisation answer NOT_FOUND like ids that never existed; a
request naming another organisation_id answers PERMISSION_DENIED.

Paging: `limit` defaults to 50 and is capped at 10 000; `last` is an opaque token of
(capture time, rowid), stable while uploads continue; an empty page echoes the token it
was given. `count` is the number of items in the page, or with `count_only` the number
of all matches (and `total_size_bytes` their size). With `include_binary` a page stops
early once it holds 64 MiB of payload (at least one item), so responses stay bounded.

What BinaryMetadata carries, from what we store:
- id = file_id (legacy BinaryID.file_id), binary_data_id = our id (equal for blobs);
- capture_metadata: organization_id = the uploader's org, location_id = its key's
  location, robot_name/robot_id/part_name = "" (uploads do not carry them), part_id,
  component_type/name, method_name, method_parameters, live tags, mime_type;
- time_requested/time_received as the robot sent them (unset for plain files);
- file_name and file_ext exactly as uploaded; uri = "" (blobs are served only through
  this API); annotations = live bounding boxes + uploaded classifications;
  dataset_ids = live memberships; file_size_bytes = stored size.

GetDatabaseConnection's local meaning: hostname = this server's listen address,
mongodb_uri = "" (there is no MongoDB; TabularDataBySQL/MQL run on the index itself),
has_database_user = whether ConfigureDatabaseUser was called for the org (we keep a
salted scrypt hash, never the password).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import bson
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from edged._proto.app.data.v1 import data_grpc
from edged._proto.app.data.v1 import data_pb2 as dpb
from edged.ingest import catalog
from edged.ingest.auth import ApiKey, KeyStore
from edged.ingest.blobs import BlobStore, BlobStoreError
from edged.ingest.catalog import BinaryRow, Capture, Conn, NotFound, ReadingRow
from edged.ingest.filters import (
    Cursor,
    FilterError,
    binary_where,
    decode_token,
    delete_tabular_where,
    encode_token,
    reading_where,
)
from edged.ingest.limits import LimitExceeded, QueryControl, QueryLimits, QueryRunner
from edged.ingest.storage import RAW_ANY_KEY, IngestStore
from edged.ingest.values import decode_struct, to_bson

_R = TypeVar("_R")
DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
MAX_PAGE_BINARY_BYTES = 64 * 1024 * 1024
DAY_NS = 86_400 * 1_000_000_000

log = logging.getLogger(__name__)


def invalid(message: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, message)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Map the catalog's and the filters' errors onto gRPC statuses."""
    try:
        yield
    except NotFound as exc:
        raise GRPCError(Status.NOT_FOUND, str(exc)) from None
    except (FilterError, catalog.Unstorable) as exc:
        raise invalid(str(exc)) from None


def check_org(keys: KeyStore, caller: ApiKey, requested: str, where: str) -> str:
    """The org to act on: the caller's. Naming another one is PERMISSION_DENIED."""
    if keys.enabled and requested and requested != caller.org_id:
        raise GRPCError(
            Status.PERMISSION_DENIED,
            f"{where} {requested!r} is not the organisation of this API key",
        )
    return caller.org_id


def ts(ns: int | None) -> Timestamp | None:
    if ns is None:
        return None
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _method_parameters(text: str) -> dict[str, AnyPb]:
    """Stored JSON (json_format of each Any) back into Any messages."""
    out: dict[str, AnyPb] = {}
    for key, value in catalog.params_dict(text).items():
        if isinstance(value, dict) and isinstance(value.get(RAW_ANY_KEY), str):
            raw = base64.b64decode(value[RAW_ANY_KEY])
            out[key] = AnyPb(type_url=str(value.get("@type", "")), value=raw)
            continue
        packed = AnyPb()
        try:
            json_format.ParseDict(value, packed)
        except (json_format.ParseError, TypeError, KeyError):
            if isinstance(value, dict) and isinstance(value.get("value"), str):
                packed = AnyPb(
                    type_url=str(value.get("@type", "")), value=base64.b64decode(value["value"])
                )
        out[key] = packed
    return out


def capture_metadata(
    capture: Capture, tags: Sequence[str], mime_type: str = ""
) -> dpb.CaptureMetadata:
    meta = dpb.CaptureMetadata(
        organization_id=capture.org_id,
        location_id=capture.location_id,
        robot_name=capture.robot_name,
        robot_id=capture.robot_id,
        part_name=capture.part_name,
        part_id=capture.part_id,
        component_type=capture.component_type,
        component_name=capture.component_name,
        method_name=capture.method_name,
        tags=list(tags),
        mime_type=mime_type,
    )
    for key, packed in _method_parameters(capture.method_parameters).items():
        meta.method_parameters[key].CopyFrom(packed)
    return meta


def tabular_page(rows: list[ReadingRow]) -> dpb.TabularDataByFilterResponse:
    """Readings share CaptureMetadata entries by index, one per distinct metadata."""
    resp = dpb.TabularDataByFilterResponse(count=len(rows))
    index: dict[tuple[Capture, str], int] = {}
    size = 0
    for row in rows:
        key = (row.capture, row.tags)
        if key not in index:
            index[key] = len(resp.metadata)
            resp.metadata.append(capture_metadata(row.capture, json.loads(row.tags)))
        item = dpb.TabularData(metadata_index=index[key])
        item.data.CopyFrom(decode_struct(row.data, row.data_exact))
        if (t := ts(row.time_requested_ns)) is not None:
            item.time_requested.CopyFrom(t)
        if (t := ts(row.time_received_ns)) is not None:
            item.time_received.CopyFrom(t)
        resp.data.append(item)
        size += len(row.data)
    resp.total_size_bytes = size
    if rows:
        resp.last = encode_token(Cursor(rows[-1].time_captured_ns, rows[-1].rowid))
    return resp


def binary_metadata(row: BinaryRow) -> dpb.BinaryMetadata:
    meta = dpb.BinaryMetadata(
        id=row.file_id,
        binary_data_id=row.binary_data_id,
        capture_metadata=capture_metadata(row.capture, row.tags, row.mime_type),
        file_name=row.file_name,
        file_ext=row.file_extension,
        uri="",
        dataset_ids=row.dataset_ids,
        file_size_bytes=row.size,
    )
    if (t := ts(row.time_requested_ns)) is not None:
        meta.time_requested.CopyFrom(t)
    if (t := ts(row.time_received_ns)) is not None:
        meta.time_received.CopyFrom(t)
    if row.annotations:
        uploaded = dpb.Annotations.FromString(row.annotations)
        meta.annotations.classifications.extend(uploaded.classifications)
    for bbox_id, label, x0, y0, x1, y1, conf in row.bboxes:
        box = dpb.BoundingBox(
            id=bbox_id,
            label=label,
            x_min_normalized=x0,
            y_min_normalized=y0,
            x_max_normalized=x1,
            y_max_normalized=y1,
        )
        if conf is not None:
            box.confidence = conf
        meta.annotations.bboxes.append(box)
    return meta


def fitting(sizes: Sequence[int], budget: int) -> int:
    """How many leading items fit in `budget` bytes; at least one, so any single item can
    always be fetched on its own."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > budget:
            return n
    return len(sizes)


def check_ids_budget(sizes: Sequence[int], budget: int) -> None:
    """BinaryDataByIDs answers all its ids in one message (the seed client has no paging):
    ids whose payloads exceed the budget are RESOURCE_EXHAUSTED, saying how many fit."""
    fit = fitting(sizes, budget)
    if fit < len(sizes):
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"the {len(sizes)} requested binaries hold {sum(sizes)} bytes, over this server's"
            f" limit of {budget} bytes per response (--max-page-binary-bytes); the first"
            f" {fit} fit: request them in smaller batches",
        )


def binary_items(
    rows: list[BinaryRow],
    include_binary: bool,
    budget_bytes: int = MAX_PAGE_BINARY_BYTES,
) -> tuple[list[dpb.BinaryData], list[BinaryRow]]:
    """BinaryData for the rows that fit the page byte budget; payloads are read from the
    blob store afterwards (`load_payloads`), outside the index snapshot's thread."""
    out: list[dpb.BinaryData] = []
    used: list[BinaryRow] = []
    if include_binary:
        rows = rows[: fitting([r.size for r in rows], budget_bytes)]
    for row in rows:
        out.append(dpb.BinaryData(metadata=binary_metadata(row)))
        used.append(row)
    return out, used


async def load_payloads(
    blobs: BlobStore, items: Sequence[dpb.BinaryData], rows: Sequence[BinaryRow]
) -> None:
    """Fill each item's payload from the blob store (sizes were budgeted already)."""
    for item, row in zip(items, rows, strict=True):
        item.binary = await blobs.read(row.blob_path)


def _limit(value: int) -> int:
    return min(value or DEFAULT_LIMIT, MAX_LIMIT)


def _engine(module: str, name: str) -> tuple[Callable[..., list[dict[str, Any]]], type[Exception]]:
    """The SQL/MQL engines load lazily: a build without them answers UNIMPLEMENTED."""
    try:
        mod = importlib.import_module(f"edged.ingest.{module}")
    except ImportError:
        raise GRPCError(Status.UNIMPLEMENTED, f"{name} is not available in this build") from None
    rejected = getattr(mod, "SqlRejected" if module == "sql" else "MqlRejected")
    run = getattr(mod, f"run_{module}")
    return run, rejected


def _unimplemented(method: str) -> GRPCError:
    return GRPCError(Status.UNIMPLEMENTED, f"{method} is not implemented by edged ingest")


def encode_documents(rows: list[dict[str, Any]], max_bytes: int) -> list[bytes]:
    """BSON of each result row, stopping at `max_bytes` in all (the engines estimate as
    they go; this counts exactly). Runs on the query pool, never on the event loop."""
    out: list[bytes] = []
    total = 0
    for i, row in enumerate(rows):
        try:
            raw = to_bson(row)
        except RecursionError:
            raise LimitExceeded(f"row {i} of the result nests too deeply to encode") from None
        total += len(raw)
        if total > max_bytes:
            raise LimitExceeded(
                f"the result is larger than {max_bytes} bytes after {i} rows"
                " (--query-max-result-bytes)"
            )
        out.append(raw)
    return out


class DataQueryService(data_grpc.DataServiceBase):
    def __init__(
        self,
        store: IngestStore,
        keys: KeyStore,
        address: Callable[[], str],
        runner: QueryRunner | None = None,
    ) -> None:
        self._store = store
        self._keys = keys
        self._address = address
        self._runner = runner if runner is not None else QueryRunner(QueryLimits())
        self._limits = self._runner.limits

    async def _read(self, fn: Callable[[Conn], _R]) -> _R:
        return await self._store.read(fn, self._runner.executor)

    async def _pg_sql(self, org: str, query: str) -> list[bytes]:
        """TabularDataBySQL inside PostgreSQL, as the organisation's role (pgsql.py)."""
        from edged.ingest.pg import PgIndex
        from edged.ingest.pgsql import run_pg_sql
        from edged.ingest.sql import SqlRejected

        index, lim = self._store.index, self._limits
        assert isinstance(index, PgIndex)
        return await self._run_job(
            org,
            SqlRejected,
            lambda control: run_pg_sql(
                index,
                org,
                query,
                max_rows=lim.max_rows,
                max_result_bytes=lim.max_result_bytes,
                max_value_bytes=lim.max_value_bytes,
                control=control,
            ),
        )

    async def _pg_mql(self, org: str, pipeline: list[dict[str, Any]]) -> list[bytes]:
        """TabularDataByMQL over PostgreSQL: the same evaluator, rows read as the
        organisation's role (pgsql.run_pg_mql)."""
        from edged.ingest.mql import MqlRejected
        from edged.ingest.pg import PgIndex
        from edged.ingest.pgsql import run_pg_mql

        index, lim = self._store.index, self._limits
        assert isinstance(index, PgIndex)
        return await self._run_job(
            org,
            MqlRejected,
            lambda control: run_pg_mql(
                index,
                org,
                pipeline,
                max_docs=lim.max_rows,
                max_result_bytes=lim.max_result_bytes,
                max_doc_bytes=lim.max_value_bytes,
                max_nodes=lim.max_pipeline_nodes,
                control=control,
            ),
        )

    async def _run_job(self, org: str, rejected: type[Exception], job: Any) -> list[bytes]:
        """One SQL/MQL job on the query pool: the limits' breaches are RESOURCE_EXHAUSTED,
        the caller's mistakes (`rejected`) INVALID_ARGUMENT."""
        max_bytes = self._limits.max_result_bytes

        def work(control: QueryControl) -> list[bytes]:
            return encode_documents(job(control), max_bytes)

        try:
            return await self._runner.run(org, work)
        except LimitExceeded as exc:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
        except rejected as exc:
            raise invalid(str(exc)) from None

    async def _run_engine(
        self, module: str, method: str, org: str, query: Any, **limits: int
    ) -> list[bytes]:
        """One SQL/MQL query over the SQLite index, with the engine's own names for the
        limits in `limits`."""
        run, rejected = _engine(module, method)
        path, max_bytes = self._store.db_path, self._limits.max_result_bytes
        return await self._run_job(
            org,
            rejected,
            lambda control: run(
                path, org, query, max_result_bytes=max_bytes, control=control, **limits
            ),
        )

    async def _request(self, stream: Stream[Any, Any]) -> tuple[ApiKey, Any]:
        caller = self._keys.caller(stream)
        req = await stream.recv_message()
        assert req is not None
        return caller, req

    # -- tabular --------------------------------------------------------------------------

    async def TabularDataByFilter(
        self, stream: Stream[dpb.TabularDataByFilterRequest, dpb.TabularDataByFilterResponse]
    ) -> None:
        caller, req = await self._request(stream)
        dr = req.data_request
        with translate_errors():
            where = reading_where(dr.filter if dr.HasField("filter") else None, caller.org_id)
            cursor = decode_token(dr.last)
            if req.count_only:
                count, size = await self._read(lambda c: catalog.count_readings(c, where))
                resp = dpb.TabularDataByFilterResponse(count=count, total_size_bytes=size)
            else:
                limit = _limit(dr.limit)
                resp = await self._read(
                    lambda c: tabular_page(
                        catalog.page_readings(c, where, dr.sort_order, cursor, limit)
                    )
                )
                resp.last = resp.last or dr.last
        await stream.send_message(resp)

    async def TabularDataBySQL(
        self, stream: Stream[dpb.TabularDataBySQLRequest, dpb.TabularDataBySQLResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        if not req.sql_query.strip():
            raise invalid("sql_query is required")
        if self._store.dialect == "postgresql":
            raw = await self._pg_sql(org, req.sql_query)
            await stream.send_message(dpb.TabularDataBySQLResponse(raw_data=raw))
            return
        lim = self._limits
        raw = await self._run_engine(
            "sql",
            "TabularDataBySQL",
            org,
            req.sql_query,
            max_rows=lim.max_rows,
            max_value_bytes=lim.max_value_bytes,
        )
        await stream.send_message(dpb.TabularDataBySQLResponse(raw_data=raw))

    async def TabularDataByMQL(
        self, stream: Stream[dpb.TabularDataByMQLRequest, dpb.TabularDataByMQLResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        if req.HasField("query_prefix_name") and req.query_prefix_name:
            raise invalid("query_prefix_name: saved queries are not supported by edged ingest")
        source = req.data_source.type if req.HasField("data_source") else 0
        if source == dpb.TABULAR_DATA_SOURCE_TYPE_PIPELINE_SINK:
            raise invalid("data_source.type PIPELINE_SINK: edged ingest has no data pipelines")
        if not req.mql_binary:
            raise invalid("mql_binary is empty; send at least one pipeline stage")
        pipeline: list[dict[str, Any]] = []
        for i, raw in enumerate(req.mql_binary):
            try:
                pipeline.append(dict(bson.decode(raw)))
            except Exception:  # bson raises several types for malformed input
                raise invalid(f"mql_binary[{i}] is not a BSON document") from None
        if self._store.dialect == "postgresql":
            raw = await self._pg_mql(org, pipeline)
            await stream.send_message(dpb.TabularDataByMQLResponse(raw_data=raw))
            return
        lim = self._limits
        raw = await self._run_engine(
            "mql",
            "TabularDataByMQL",
            org,
            pipeline,
            max_docs=lim.max_rows,
            max_doc_bytes=lim.max_value_bytes,
            max_nodes=lim.max_pipeline_nodes,
        )
        await stream.send_message(dpb.TabularDataByMQLResponse(raw_data=raw))

    async def DeleteTabularData(
        self, stream: Stream[dpb.DeleteTabularDataRequest, dpb.DeleteTabularDataResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        cutoff = delete_cutoff_ns(time.time_ns(), req.delete_older_than_days)
        with translate_errors():
            where = delete_tabular_where(
                req.filter if req.HasField("filter") else None, org, cutoff
            )
            deleted = await self._store.write(lambda c: catalog.delete_readings_where(c, where))
        await stream.send_message(dpb.DeleteTabularDataResponse(deleted_count=deleted))

    # -- binary ---------------------------------------------------------------------------

    async def BinaryDataByFilter(
        self, stream: Stream[dpb.BinaryDataByFilterRequest, dpb.BinaryDataByFilterResponse]
    ) -> None:
        caller, req = await self._request(stream)
        dr = req.data_request
        with translate_errors():
            where = binary_where(dr.filter if dr.HasField("filter") else None, caller.org_id)
            cursor = decode_token(dr.last)
            if req.count_only:
                count, size = await self._read(lambda c: catalog.count_binaries(c, where))
                await stream.send_message(
                    dpb.BinaryDataByFilterResponse(count=count, total_size_bytes=size)
                )
                return
            limit = _limit(dr.limit)
            budget = self._limits.max_page_binary_bytes

            def page(
                conn: Conn,
            ) -> tuple[dpb.BinaryDataByFilterResponse, list[BinaryRow]]:
                rows = catalog.page_binaries(conn, where, dr.sort_order, cursor, limit)
                items, used = binary_items(rows, req.include_binary, budget)
                resp = dpb.BinaryDataByFilterResponse(
                    data=items, count=len(items), total_size_bytes=sum(r.size for r in used)
                )
                resp.last = (
                    encode_token(Cursor(used[-1].time_captured_ns, used[-1].rowid))
                    if used
                    else dr.last
                )
                return resp, used

            resp, used = await self._read(page)
            if req.include_binary:
                await load_payloads(self._store.blobs, resp.data, used)
        await stream.send_message(resp)

    async def BinaryDataByIDs(
        self, stream: Stream[dpb.BinaryDataByIDsRequest, dpb.BinaryDataByIDsResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = caller.org_id
        budget = self._limits.max_page_binary_bytes

        def fetch(conn: Conn) -> tuple[dpb.BinaryDataByIDsResponse, list[BinaryRow]]:
            ids = resolve_ids(conn, org, req.binary_data_ids, req.binary_ids)
            rows = catalog.binaries_by_ids(conn, org, ids)
            items, _ = binary_items(rows, False)
            if req.include_binary:
                check_ids_budget([r.size for r in rows], budget)
            return dpb.BinaryDataByIDsResponse(data=items, count=len(items)), rows

        with translate_errors():
            resp, rows = await self._read(fetch)
            if req.include_binary:
                await load_payloads(self._store.blobs, resp.data, rows)
        await stream.send_message(resp)

    async def DeleteBinaryDataByFilter(
        self,
        stream: Stream[dpb.DeleteBinaryDataByFilterRequest, dpb.DeleteBinaryDataByFilterResponse],
    ) -> None:
        caller, req = await self._request(stream)
        with translate_errors():
            where = binary_where(req.filter if req.HasField("filter") else None, caller.org_id)
            paths = await self._store.write(lambda c: catalog.delete_binaries_where(c, where))
        await self._unlink(paths)
        await stream.send_message(dpb.DeleteBinaryDataByFilterResponse(deleted_count=len(paths)))

    async def DeleteBinaryDataByIDs(
        self, stream: Stream[dpb.DeleteBinaryDataByIDsRequest, dpb.DeleteBinaryDataByIDsResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = caller.org_id

        def delete(conn: Conn) -> list[str]:
            ids = resolve_ids(conn, org, req.binary_data_ids, req.binary_ids)
            return catalog.delete_binaries(conn, org, ids)

        with translate_errors():
            paths = await self._store.write(delete)
        await self._unlink(paths)
        await stream.send_message(dpb.DeleteBinaryDataByIDsResponse(deleted_count=len(paths)))

    async def _unlink(self, paths: list[str]) -> None:
        """Blobs go after their rows are committed: a crash leaves an orphan, never a row
        pointing at nothing. So does a blob store that fails now: the rows are gone and
        the call succeeded, so that is logged, not answered."""
        try:
            await self._store.blobs.delete(paths)
        except BlobStoreError as exc:
            log.warning("deleted rows kept their blobs (orphans): %s", exc.message)

    # -- tags -----------------------------------------------------------------------------

    async def AddTagsToBinaryDataByIDs(
        self,
        stream: Stream[dpb.AddTagsToBinaryDataByIDsRequest, dpb.AddTagsToBinaryDataByIDsResponse],
    ) -> None:
        caller, req = await self._request(stream)
        tags = required_tags(req.tags)

        def add(conn: Conn) -> None:
            ids = resolve_ids(conn, caller.org_id, req.binary_data_ids, req.binary_ids)
            catalog.add_tags(conn, caller.org_id, ids, tags)

        with translate_errors():
            await self._store.write(add)
        await stream.send_message(dpb.AddTagsToBinaryDataByIDsResponse())

    async def AddTagsToBinaryDataByFilter(
        self,
        stream: Stream[
            dpb.AddTagsToBinaryDataByFilterRequest, dpb.AddTagsToBinaryDataByFilterResponse
        ],
    ) -> None:
        caller, req = await self._request(stream)
        tags = required_tags(req.tags)
        with translate_errors():
            where = binary_where(req.filter if req.HasField("filter") else None, caller.org_id)
            await self._store.write(lambda c: catalog.add_tags_where(c, where, tags))
        await stream.send_message(dpb.AddTagsToBinaryDataByFilterResponse())

    async def RemoveTagsFromBinaryDataByIDs(
        self,
        stream: Stream[
            dpb.RemoveTagsFromBinaryDataByIDsRequest, dpb.RemoveTagsFromBinaryDataByIDsResponse
        ],
    ) -> None:
        caller, req = await self._request(stream)
        tags = required_tags(req.tags)

        def remove(conn: Conn) -> int:
            ids = resolve_ids(conn, caller.org_id, req.binary_data_ids, req.binary_ids)
            return catalog.remove_tags(conn, caller.org_id, ids, tags)

        with translate_errors():
            removed = await self._store.write(remove)
        await stream.send_message(dpb.RemoveTagsFromBinaryDataByIDsResponse(deleted_count=removed))

    async def RemoveTagsFromBinaryDataByFilter(
        self,
        stream: Stream[
            dpb.RemoveTagsFromBinaryDataByFilterRequest,
            dpb.RemoveTagsFromBinaryDataByFilterResponse,
        ],
    ) -> None:
        caller, req = await self._request(stream)
        tags = required_tags(req.tags)
        with translate_errors():
            where = binary_where(req.filter if req.HasField("filter") else None, caller.org_id)
            removed = await self._store.write(lambda c: catalog.remove_tags_where(c, where, tags))
        await stream.send_message(
            dpb.RemoveTagsFromBinaryDataByFilterResponse(deleted_count=removed)
        )

    async def TagsByFilter(
        self, stream: Stream[dpb.TagsByFilterRequest, dpb.TagsByFilterResponse]
    ) -> None:
        caller, req = await self._request(stream)
        with translate_errors():
            where = binary_where(req.filter if req.HasField("filter") else None, caller.org_id)
            tags = await self._read(lambda c: catalog.tags_where(c, where))
        await stream.send_message(dpb.TagsByFilterResponse(tags=tags))

    # -- bounding boxes -------------------------------------------------------------------

    async def AddBoundingBoxToImageByID(
        self,
        stream: Stream[dpb.AddBoundingBoxToImageByIDRequest, dpb.AddBoundingBoxToImageByIDResponse],
    ) -> None:
        caller, req = await self._request(stream)
        box = check_bbox(req)
        confidence = req.confidence if req.HasField("confidence") else None

        def add(conn: Conn) -> str:
            [bid] = one_binary_id(conn, caller.org_id, req)
            return catalog.add_bbox(conn, caller.org_id, bid, req.label, box, confidence)

        with translate_errors():
            bbox_id = await self._store.write(add)
        await stream.send_message(dpb.AddBoundingBoxToImageByIDResponse(bbox_id=bbox_id))

    async def RemoveBoundingBoxFromImageByID(
        self,
        stream: Stream[
            dpb.RemoveBoundingBoxFromImageByIDRequest, dpb.RemoveBoundingBoxFromImageByIDResponse
        ],
    ) -> None:
        caller, req = await self._request(stream)
        if not req.bbox_id:
            raise invalid("bbox_id is required")

        def remove(conn: Conn) -> None:
            [bid] = one_binary_id(conn, caller.org_id, req)
            catalog.remove_bbox(conn, caller.org_id, bid, req.bbox_id)

        with translate_errors():
            await self._store.write(remove)
        await stream.send_message(dpb.RemoveBoundingBoxFromImageByIDResponse())

    async def BoundingBoxLabelsByFilter(
        self,
        stream: Stream[dpb.BoundingBoxLabelsByFilterRequest, dpb.BoundingBoxLabelsByFilterResponse],
    ) -> None:
        caller, req = await self._request(stream)
        with translate_errors():
            where = binary_where(req.filter if req.HasField("filter") else None, caller.org_id)
            labels = await self._read(lambda c: catalog.labels_where(c, where))
        await stream.send_message(dpb.BoundingBoxLabelsByFilterResponse(labels=labels))

    # -- database access ------------------------------------------------------------------

    async def GetDatabaseConnection(
        self, stream: Stream[dpb.GetDatabaseConnectionRequest, dpb.GetDatabaseConnectionResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        has_user = await self._read(lambda c: catalog.has_database_user(c, org))
        await stream.send_message(
            dpb.GetDatabaseConnectionResponse(
                hostname=self._address(), mongodb_uri="", has_database_user=has_user
            )
        )

    async def ConfigureDatabaseUser(
        self, stream: Stream[dpb.ConfigureDatabaseUserRequest, dpb.ConfigureDatabaseUserResponse]
    ) -> None:
        caller, req = await self._request(stream)
        org = check_org(self._keys, caller, req.organization_id, "organization_id")
        if not req.password:
            raise invalid("password is required")
        salted = await asyncio.to_thread(catalog.new_password_hash, req.password)
        await self._store.write(lambda c: catalog.set_database_user(c, org, salted))
        await stream.send_message(dpb.ConfigureDatabaseUserResponse())

    # -- dataset membership ---------------------------------------------------------------

    async def AddBinaryDataToDatasetByIDs(
        self,
        stream: Stream[
            dpb.AddBinaryDataToDatasetByIDsRequest, dpb.AddBinaryDataToDatasetByIDsResponse
        ],
    ) -> None:
        caller, req = await self._request(stream)
        await self._membership(caller, req, catalog.add_members)
        await stream.send_message(dpb.AddBinaryDataToDatasetByIDsResponse())

    async def RemoveBinaryDataFromDatasetByIDs(
        self,
        stream: Stream[
            dpb.RemoveBinaryDataFromDatasetByIDsRequest,
            dpb.RemoveBinaryDataFromDatasetByIDsResponse,
        ],
    ) -> None:
        caller, req = await self._request(stream)
        await self._membership(caller, req, catalog.remove_members)
        await stream.send_message(dpb.RemoveBinaryDataFromDatasetByIDsResponse())

    async def _membership(
        self,
        caller: ApiKey,
        req: Any,
        change: Callable[[Conn, str, str, list[str]], None],
    ) -> None:
        if not req.dataset_id:
            raise invalid("dataset_id is required")
        org = caller.org_id

        def apply(conn: Conn) -> None:
            ids = resolve_ids(conn, org, req.binary_data_ids, req.binary_ids)
            change(conn, org, req.dataset_id, ids)

        with translate_errors():
            await self._store.write(apply)

    # -- not offered by edged ingest ------------------------------------------------------

    async def ExportTabularData(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("ExportTabularData")

    async def GetLatestTabularData(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("GetLatestTabularData")

    async def UpdateBoundingBox(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("UpdateBoundingBox")

    async def AddSequencesToDataset(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("AddSequencesToDataset")

    async def RemoveSequencesFromDataset(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("RemoveSequencesFromDataset")

    async def CreateIndex(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("CreateIndex")

    async def ListIndexes(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("ListIndexes")

    async def DeleteIndex(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("DeleteIndex")

    async def CreateSavedQuery(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("CreateSavedQuery")

    async def UpdateSavedQuery(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("UpdateSavedQuery")

    async def GetSavedQuery(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("GetSavedQuery")

    async def DeleteSavedQuery(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("DeleteSavedQuery")

    async def ListSavedQueries(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("ListSavedQueries")

    async def CreateBinaryDataSignedURL(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("CreateBinaryDataSignedURL")

    async def CreateSequence(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("CreateSequence")

    async def GetSequence(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("GetSequence")

    async def UpdateSequence(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("UpdateSequence")

    async def DeleteSequence(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("DeleteSequence")

    async def ListSequences(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("ListSequences")

    async def SequencesByDatasetID(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("SequencesByDatasetID")

    async def GetSequenceBinaryData(self, stream: Stream[Any, Any]) -> None:
        raise _unimplemented("GetSequenceBinaryData")


# -- request checks (pure) ------------------------------------------------------------------


def delete_cutoff_ns(now_ns: int, days: int) -> int | None:
    """DeleteTabularData's "captured before": None for 0 (everything); a cutoff before
    SQLite's int64 range (any days past ~292 years) matches nothing, as nothing is that old."""
    if not days:
        return None
    return max(now_ns - days * DAY_NS, -(2**63))


def required_tags(tags: Sequence[str]) -> list[str]:
    out = list(dict.fromkeys(t for t in tags if t))
    if not out:
        raise invalid("tags is empty; give at least one non-empty tag")
    if any("\x00" in t for t in out):
        raise invalid("tags: a tag contains a NUL character (U+0000), which cannot be stored")
    return out


def resolve_ids(
    conn: Conn, org: str, data_ids: Sequence[str], legacy: Sequence[dpb.BinaryID]
) -> list[str]:
    """binary_data_ids, or legacy BinaryIDs (file id + org + location), as our ids."""
    if data_ids:
        if not all(data_ids):
            raise FilterError("binary_data_ids contains an empty id")
        return list(data_ids)
    if not legacy:
        raise FilterError("binary_data_ids is empty; give at least one id")
    for b in legacy:
        if not b.file_id:
            raise FilterError("binary_ids[].file_id is required")
        if b.organization_id and b.organization_id != org:
            raise NotFound(f"binary id with file_id {b.file_id!r} not found")
    return catalog.resolve_file_ids(conn, org, [b.file_id for b in legacy])


def one_binary_id(conn: Conn, org: str, req: Any) -> list[str]:
    if req.binary_data_id:
        return [req.binary_data_id]
    if req.HasField("binary_id") and req.binary_id.file_id:
        return resolve_ids(conn, org, [], [req.binary_id])
    raise FilterError("binary_data_id is required")


def check_bbox(req: dpb.AddBoundingBoxToImageByIDRequest) -> tuple[float, float, float, float]:
    """0 <= min < max <= 1 on both axes, a label, confidence within [0, 1] if given."""
    if not req.label:
        raise invalid("label is required")
    if "\x00" in req.label:
        raise invalid("label contains a NUL character (U+0000), which cannot be stored")
    values = {
        "x_min_normalized": req.x_min_normalized,
        "y_min_normalized": req.y_min_normalized,
        "x_max_normalized": req.x_max_normalized,
        "y_max_normalized": req.y_max_normalized,
    }
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise invalid(f"{name} must be within [0, 1], got {value}")
    for axis in ("x", "y"):
        if not values[f"{axis}_min_normalized"] < values[f"{axis}_max_normalized"]:
            raise invalid(f"{axis}_min_normalized must be less than {axis}_max_normalized")
    if req.HasField("confidence") and not 0.0 <= req.confidence <= 1.0:
        raise invalid(f"confidence must be within [0, 1], got {req.confidence}")
    return (req.x_min_normalized, req.y_min_normalized, req.x_max_normalized, req.y_max_normalized)
