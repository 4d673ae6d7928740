"""DataSyncService: validate, de-duplicate and store uploads.

De-duplication key: request metadata `edged-item-id`. A repeat returns the ids of the
first upload and stores nothing, which turns at-least-once delivery from the daemon
into exactly-once storage.

`dataset_ids` must name datasets of the API key's organisation: any other id (another
organisation's, or none at all) answers INVALID_ARGUMENT naming it, so the daemon
dead-letters the item (kept, retryable) instead of it silently joining another
organisation's dataset. INVALID_ARGUMENT rather than NOT_FOUND because the stock robot
software, too, treats only INVALID_ARGUMENT as permanent. The check runs inside the
storing transaction (a dataset deleted meanwhile cannot be joined) and, for streamed
blobs, also before the bytes are received.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from edged._proto.app.datasync.v1 import data_sync_grpc
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.ingest import catalog
from edged.ingest.auth import KeyStore
from edged.ingest.blobs import BlobWriter
from edged.ingest.catalog import Conn
from edged.ingest.metrics import stored
from edged.ingest.storage import KIND_BINARY, KIND_FILE, KIND_TABULAR, IngestStore, UploadIds
from edged.ingest.validate import (
    check_bbox_ids,
    check_capture_upload,
    check_upload_metadata,
    invalid,
    mime_type_for,
)
from edged.protocol import ITEM_ID_KEY

GROUP_MAX_CALLS = 32
"""Most tabular uploads one group commit holds (bounds one transaction's size and time)."""

Store = Callable[[Conn], UploadIds]


def _item_id(stream: Stream[Any, Any]) -> str | None:
    value = stream.metadata.get(ITEM_ID_KEY) if stream.metadata else None
    return value if isinstance(value, str) and value else None


@contextlib.contextmanager
def _dataset_errors(where: str) -> Iterator[None]:
    """An unknown dataset id is the uploader's mistake: INVALID_ARGUMENT naming the id."""
    try:
        yield
    except catalog.NotFound as exc:
        raise invalid(
            f"{where}.dataset_ids: {exc} in this API key's organisation; create it with"
            " CreateDataset and upload with the id that returns"
        ) from None


def run_each(conn: Conn, stores: list[Store]) -> list[UploadIds | Exception]:
    """Run several uploads' stores in the open transaction, each in its own savepoint:
    one that fails (an unknown dataset) leaves no row and does not fail the others."""
    results: list[UploadIds | Exception] = []
    for store in stores:
        conn.execute("SAVEPOINT upload")
        try:
            results.append(store(conn))
        except Exception as exc:
            conn.execute("ROLLBACK TO upload")
            results.append(exc)
        conn.execute("RELEASE upload")
    return results


class GroupCommit:
    """Concurrent tabular uploads share one fsync'd transaction.

    A call that finds no commit running starts one at once (no added wait); calls that
    arrive while it commits are stored together in the next transaction. Each caller is
    answered only after the COMMIT holding its rows, so an ack still means durable."""

    def __init__(self, store: IngestStore, max_calls: int = GROUP_MAX_CALLS) -> None:
        self._store = store
        self._max = max_calls
        self._pending: list[tuple[Store, asyncio.Future[UploadIds]]] = []
        self._committer: asyncio.Task[None] | None = None

    async def run(self, store: Store) -> UploadIds:
        done: asyncio.Future[UploadIds] = asyncio.get_running_loop().create_future()
        self._pending.append((store, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_all())
        # Shielded like IngestStore.write: a caller that gives up does not take its rows
        # out of a transaction already under way.
        return await asyncio.shield(done)

    async def _commit_all(self) -> None:
        while self._pending:
            group, self._pending = self._pending[: self._max], self._pending[self._max :]
            stores = [store for store, _ in group]
            try:
                results = await self._store.write(functools.partial(run_each, stores=stores))
            except Exception as exc:  # the COMMIT (or the thread) failed: nobody's rows
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except BaseException:  # cancelled (shutdown): no caller may wait forever
                for _, done in group + self._pending:
                    done.cancel()
                self._pending = []
                raise
            for (_, done), result in zip(group, results, strict=True):
                if done.done():
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)


class DataSyncService(data_sync_grpc.DataSyncServiceBase):
    def __init__(self, store: IngestStore, keys: KeyStore, *, max_upload_bytes: int) -> None:
        self._store = store
        self._keys = keys
        self._max_upload = max_upload_bytes
        self._group = GroupCommit(store)

    def _org(self, stream: Stream[Any, Any]) -> str:
        return self._keys.caller(stream).org_id

    def _location(self, stream: Stream[Any, Any]) -> str:
        return self._keys.caller(stream).location_id

    async def DataCaptureUpload(
        self, stream: Stream[pb.DataCaptureUploadRequest, pb.DataCaptureUploadResponse]
    ) -> None:
        org = self._org(stream)
        req = await stream.recv_message()
        assert req is not None
        check_capture_upload(req)
        item_id = _item_id(stream)
        if req.metadata.type == pb.DATA_TYPE_TABULAR_SENSOR:
            # No look-up first: the storing transaction finds a repeated item id itself
            # (and then stores nothing), which saves a read per call.
            write = await self._store.tabular_writer(
                org, item_id, req.metadata, req.sensor_contents, location_id=self._location(stream)
            )
            with _dataset_errors("metadata"):
                ids = await self._group.run(write)
            if ids == write.ids:
                stored(KIND_TABULAR, len(req.sensor_contents), write.nbytes)
        else:
            known = await self._store.find_upload(org, item_id)
            ids = known or await self._capture_binary(stream, org, item_id, req)
        await stream.send_message(
            pb.DataCaptureUploadResponse(file_id=ids.file_id, binary_data_id=ids.binary_data_id)
        )

    async def _capture_binary(
        self,
        stream: Stream[Any, Any],
        org: str,
        item_id: str | None,
        req: pb.DataCaptureUploadRequest,
    ) -> UploadIds:
        reading = req.sensor_contents[0]
        blob = await self._store.new_blob(org)
        try:
            await blob.write(reading.binary)
            with _dataset_errors("metadata"):
                ids = await self._store.store_blob(
                    org,
                    item_id,
                    KIND_BINARY,
                    req.metadata,
                    reading.metadata,
                    blob,
                    mime_type_for(req.metadata, reading.metadata),
                    location_id=self._location(stream),
                )
            stored(KIND_BINARY, 1, len(reading.binary))
            return ids
        finally:
            await asyncio.shield(blob.discard())

    async def StreamingDataCaptureUpload(
        self,
        stream: Stream[pb.StreamingDataCaptureUploadRequest, pb.StreamingDataCaptureUploadResponse],
    ) -> None:
        org = self._org(stream)
        first = await stream.recv_message()
        if first is None or first.WhichOneof("upload_packet") != "metadata":
            raise invalid("the first message of StreamingDataCaptureUpload must be metadata")
        meta = first.metadata.upload_metadata
        check_upload_metadata(
            meta,
            (pb.DATA_TYPE_BINARY_SENSOR, pb.DATA_TYPE_UNSPECIFIED),
            "metadata.upload_metadata",
        )
        sensor = first.metadata.sensor_metadata
        check_bbox_ids(sensor, "metadata.sensor_metadata")

        async def chunks() -> AsyncIterator[bytes]:
            async for msg in stream:
                if msg.WhichOneof("upload_packet") != "data":
                    raise invalid("metadata may only be sent once, in the first message")
                yield msg.data

        ids = await self._receive_blob(
            stream,
            org,
            KIND_BINARY,
            meta,
            sensor,
            chunks(),
            mime_type_for(meta, sensor),
            "metadata.upload_metadata",
        )
        await stream.send_message(
            pb.StreamingDataCaptureUploadResponse(
                file_id=ids.file_id, binary_data_id=ids.binary_data_id
            )
        )

    async def FileUpload(self, stream: Stream[pb.FileUploadRequest, pb.FileUploadResponse]) -> None:
        org = self._org(stream)
        first = await stream.recv_message()
        if first is None or first.WhichOneof("upload_packet") != "metadata":
            raise invalid("the first message of FileUpload must be metadata")
        meta = first.metadata
        check_upload_metadata(meta, (pb.DATA_TYPE_FILE, pb.DATA_TYPE_UNSPECIFIED))

        async def chunks() -> AsyncIterator[bytes]:
            async for msg in stream:
                if msg.WhichOneof("upload_packet") != "file_contents":
                    raise invalid("metadata may only be sent once, in the first message")
                yield msg.file_contents.data

        ids = await self._receive_blob(
            stream, org, KIND_FILE, meta, None, chunks(), mime_type_for(meta, None), "metadata"
        )
        await stream.send_message(
            pb.FileUploadResponse(file_id=ids.file_id, binary_data_id=ids.binary_data_id)
        )

    async def _receive_blob(
        self,
        stream: Stream[Any, Any],
        org: str,
        kind: str,
        meta: pb.UploadMetadata,
        sensor: pb.SensorMetadata | None,
        chunks: AsyncIterator[bytes],
        mime_type: str,
        where: str,
    ) -> UploadIds:
        """Stream chunks to the blob store as they arrive; memory holds one message (and
        at most one multipart part) at a time."""
        item_id = _item_id(stream)
        known = await self._store.find_upload(org, item_id)
        if known is not None:
            async for _ in chunks:  # a repeat: read and drop the bytes, store nothing
                pass
            return known

        def datasets_exist(conn: Conn) -> None:
            catalog.check_datasets(conn, org, meta.dataset_ids)

        with _dataset_errors(where):  # refuse before receiving what may be gigabytes
            await self._store.read(datasets_exist)
        blob: BlobWriter = await self._store.new_blob(org)
        try:
            async for chunk in chunks:
                await blob.write(chunk)
                if blob.size > self._max_upload:
                    raise GRPCError(
                        Status.INVALID_ARGUMENT,
                        f"upload exceeds the server's limit of {self._max_upload} bytes"
                        " (--max-upload-bytes)",
                    )
            with _dataset_errors(where):
                ids = await self._store.store_blob(
                    org,
                    item_id,
                    kind,
                    meta,
                    sensor,
                    blob,
                    mime_type,
                    location_id=self._location(stream),
                )
            stored(kind, 1, blob.size)
            return ids
        finally:
            await asyncio.shield(blob.discard())
