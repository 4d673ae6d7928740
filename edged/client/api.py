"""Async client for an ingest server: the seed `DataClient`'s whole API, and the daemon's
upload layer underneath.

Two layers on one connection:
- `DataClient`: the seed client's methods with the same names, parameters and return
  values (the five uploads here, the query/curation/dataset calls in
  `edged.data_client`), so scripts written for it keep working after changing their
  imports and their connect call. `connect()` opens one; this module re-exports the
  names such scripts import (`Filter`, `BinaryID`, `Order`, `create_filter`, ...);
- `UploadClient`, what the daemon needs: pre-encoded `SensorData` batches (encoded
  once, at enqueue) and streamed binaries/files read in `chunk_size` pieces from a
  path, a file slice or an async byte source, so memory never holds a whole payload.

Every failure surfaces as `UploadError` (or `AuthError`) carrying a gRPC status;
transport faults map to UNAVAILABLE and local deadlines to DEADLINE_EXCEEDED, so
callers classify one type only. A payload that cannot be read locally raises
`SourceError` instead: retrying the network would not help it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeAlias, TypedDict, TypeVar, Unpack, cast

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.client import Stream
from grpclib.const import Cardinality

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import encode_varint
from edged.client.data_client import (
    BinaryData,
    BinaryID,
    BinaryMetadata,
    CaptureInterval,
    CaptureMetadata,
    DataQueries,
    Dataset,
    Filter,
    Order,
    TabularData,
    TagsFilter,
    TagsFilterType,
    create_filter,
)
from edged.errors import AuthError, ConfigError, InvalidArgument, SourceError, UploadError
from edged.wire.cloud import connect_cloud, load_cloud
from edged.wire.connection import Connection, Raw, Reach, client_tls_context, parse_address
from edged.wire.connection import connect as wire_connect

__all__ = [
    "DEFAULT_CHUNK",
    "AuthError",
    "BinaryData",
    "BinaryID",
    "BinaryMetadata",
    "ByteSource",
    "CaptureInterval",
    "CaptureMetadata",
    "Connecting",
    "DataClient",
    "Dataset",
    "FileSlice",
    "Filter",
    "Order",
    "Pace",
    "TabularData",
    "TagsFilter",
    "TagsFilterType",
    "UploadClient",
    "UploadError",
    "UploadOptions",
    "UploadResult",
    "client_tls_context",
    "connect",
    "create_filter",
    "encode_capture_request",
    "iter_source",
    "method_parameters",
    "parse_address",
    "sensor_metadata",
    "upload_metadata",
]

DEFAULT_CHUNK = 64 * 1024

_Req = TypeVar("_Req")
_StreamResp = TypeVar("_StreamResp", pb.StreamingDataCaptureUploadResponse, pb.FileUploadResponse)


@dataclass(frozen=True)
class UploadResult:
    file_id: str
    binary_data_id: str


@dataclass(frozen=True)
class FileSlice:
    """Bytes [offset, offset+length) of a file; length None = to the end. `opener`, if
    given, returns a new fd of the file (closed after use) instead of opening `path`:
    the daemon hands out one it checked, so a path swapped mid-upload is never read."""

    path: Path
    offset: int = 0
    length: int | None = None
    opener: Callable[[], int] | None = field(default=None, compare=False, repr=False)


Pace: TypeAlias = Callable[[int], Awaitable[None]]
"""Awaited with a message's size before it is sent (the daemon's bandwidth cap): returns
once those bytes may go."""


class UploadOptions(TypedDict, total=False):
    """The keywords every daemon-layer upload takes besides its payload (`item_id`,
    `timeout`, `pace`), for an interface the client implements (the uploader's `Sink`)."""

    item_id: str | None
    timeout: float | None
    pace: Pace | None


ByteSource: TypeAlias = bytes | Path | FileSlice | Callable[[], AsyncIterator[bytes]]
"""bytes, a path or a file slice are re-read from byte 0 if the call is replayed after a
re-authentication; an async source (a callable returning an async iterator) is never
replayed, since it may hand out the same, already consumed, iterator."""


def encode_capture_request(metadata: pb.UploadMetadata, readings: Sequence[bytes]) -> bytes:
    """DataCaptureUploadRequest bytes from pre-encoded SensorData, without re-encoding them."""
    meta = metadata.SerializeToString()
    parts = [b"\x0a", encode_varint(len(meta)), meta]
    for blob in readings:  # tag 2 + length inline for the usual sizes: no call per reading
        n = len(blob)
        if n < 0x80:
            parts += (bytes((0x12, n)), blob)
        elif n < 0x4000:
            parts += (bytes((0x12, n & 0x7F | 0x80, n >> 7)), blob)
        else:
            parts += (b"\x12", encode_varint(n), blob)
    return b"".join(parts)


def file_chunk(chunk: bytes) -> Raw:
    """FileUploadRequest{file_contents: FileData{data: chunk}} encoded in one copy of the
    chunk (building the messages would copy it three times)."""
    if not chunk:
        return Raw(b"\x12\x00")  # proto3 leaves an empty `data` out
    inner = encode_varint(len(chunk))
    return Raw(b"\x12" + encode_varint(1 + len(inner) + len(chunk)) + b"\x0a" + inner + chunk)


def _timestamp(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.astimezone())
    return ts


def sensor_metadata(
    times: tuple[dt.datetime, dt.datetime] | None, mime_type: int = 0
) -> pb.SensorMetadata:
    meta = pb.SensorMetadata(mime_type=cast(Any, mime_type))
    if times is not None:
        meta.time_requested.CopyFrom(_timestamp(times[0]))
        meta.time_received.CopyFrom(_timestamp(times[1]))
    return meta


def _struct(call: str, what: str, data: Mapping[str, Any]) -> Struct:
    """`data` as a Struct; a value it cannot hold is the caller's INVALID_ARGUMENT."""
    holder = Struct()
    try:
        holder.update(dict(data))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(call, f"{what} cannot be sent as a protobuf Struct: {exc}") from None
    return holder


def method_parameters(params: Mapping[str, Any] | None) -> dict[str, AnyPb]:
    """Each value packed as an Any holding a google.protobuf.Value, as robots send them."""
    out: dict[str, AnyPb] = {}
    if params:
        holder = _struct("upload", "method_parameters", params)
        for key, value in holder.fields.items():
            packed = AnyPb()
            packed.Pack(value)
            out[key] = packed
    return out


def upload_metadata(
    part_id: str,
    data_type: int,
    *,
    component_type: str | None = None,
    component_name: str | None = None,
    method_name: str | None = None,
    method_params: Mapping[str, Any] | None = None,
    tags: Sequence[str] | None = None,
    dataset_ids: Sequence[str] | None = None,
    file_name: str | None = None,
    file_extension: str | None = None,
    mime_type: str | None = None,
) -> pb.UploadMetadata:
    meta = pb.UploadMetadata(
        part_id=part_id,
        component_type=component_type or "",
        component_name=component_name or "",
        method_name=method_name or "",
        type=cast(Any, data_type),
        file_name=file_name or "",
        file_extension=file_extension or "",
        tags=list(tags or ()),
        dataset_ids=list(dataset_ids or ()),
        mime_type=mime_type or "",
    )
    for key, value in method_parameters(method_params).items():
        meta.method_parameters[key].CopyFrom(value)
    return meta


class _Seed(NamedTuple):
    """What every seed upload method takes besides its payload, in the seed's order."""

    part_id: str
    component_type: str | None
    component_name: str | None
    method_name: str | None
    method_parameters: Mapping[str, Any] | None
    tags: Sequence[str] | None

    def metadata(
        self, data_type: int, *, file_name: str | None = None, file_extension: str | None = None
    ) -> pb.UploadMetadata:
        part_id, component_type, component_name, method_name, params, tags = self
        return upload_metadata(
            part_id,
            data_type,
            component_type=component_type,
            component_name=component_name,
            method_name=method_name,
            method_params=params,
            tags=tags,
            file_name=file_name,
            file_extension=file_extension,
        )


async def iter_source(source: ByteSource, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[bytes]:
    """Yield a payload in pieces of at most `chunk_size` bytes; never reads it whole."""
    if isinstance(source, bytes):
        view = memoryview(source)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])
        return
    if isinstance(source, Path | FileSlice):
        piece = source if isinstance(source, FileSlice) else FileSlice(source)
        try:
            where = piece.path if piece.opener is None else piece.opener()
            f = open(where, "rb")  # noqa: SIM115 - closed below; errors become SourceError
        except OSError as exc:
            raise SourceError(f"cannot read {piece.path}: {exc.strerror}") from exc
        with f:
            f.seek(piece.offset)
            remaining = piece.length
            while remaining is None or remaining > 0:
                want = chunk_size if remaining is None else min(chunk_size, remaining)
                try:
                    chunk = f.read(want)
                except OSError as exc:
                    raise SourceError(f"cannot read {piece.path}: {exc.strerror}") from exc
                if not chunk:
                    if remaining:
                        raise SourceError(
                            f"{piece.path} ended {remaining} bytes before the queued length"
                        )
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        return
    async for chunk in source():
        for start in range(0, len(chunk), chunk_size):
            yield chunk[start : start + chunk_size]


class UploadClient(Connection):
    """The daemon's upload calls and the seed's five upload methods over one `Connection`;
    safe for concurrent calls from many tasks."""

    def __init__(
        self, address: str, *, chunk_size: int = DEFAULT_CHUNK, **reach: Unpack[Reach]
    ) -> None:
        super().__init__(address, **reach)
        self.chunk_size = chunk_size

    # -- daemon layer -------------------------------------------------------------------

    async def upload_readings(
        self,
        metadata: pb.UploadMetadata,
        readings: Sequence[bytes],
        *,
        item_id: str | None = None,
        timeout: float | None = None,
        pace: Pace | None = None,
    ) -> UploadResult:
        """Unary DataCaptureUpload of pre-encoded SensorData messages. `pace` is charged
        the whole request before the call starts, so waiting for it never eats into the
        call's deadline."""
        body = Raw(encode_capture_request(metadata, readings))
        if pace is not None:
            await pace(len(body.data))
        reply = await self.unary(
            "DataCaptureUpload",
            body,
            pb.DataCaptureUploadResponse,
            item_id=item_id,
            timeout=timeout,
        )
        return UploadResult(reply.file_id, reply.binary_data_id)

    async def upload_binary_stream(
        self,
        metadata: pb.UploadMetadata,
        sensor: pb.SensorMetadata,
        source: ByteSource,
        *,
        item_id: str | None = None,
        timeout: float | None = None,
        pace: Pace | None = None,
    ) -> UploadResult:
        """StreamingDataCaptureUpload: metadata first, then `chunk_size` data messages."""
        first = pb.StreamingDataCaptureUploadRequest(
            metadata=pb.DataCaptureUploadMetadata(upload_metadata=metadata, sensor_metadata=sensor)
        )
        return await self._stream(
            "StreamingDataCaptureUpload",
            first,
            lambda chunk: Raw(b"\x12" + encode_varint(len(chunk)) + chunk),  # data = 2
            pb.StreamingDataCaptureUploadResponse,
            source,
            item_id=item_id,
            timeout=timeout,
            pace=pace,
        )

    async def upload_file(
        self,
        metadata: pb.UploadMetadata,
        source: ByteSource,
        *,
        item_id: str | None = None,
        timeout: float | None = None,
        pace: Pace | None = None,
    ) -> UploadResult:
        """FileUpload: metadata first, then `chunk_size` file_contents messages."""
        return await self._stream(
            "FileUpload",
            pb.FileUploadRequest(metadata=metadata),
            file_chunk,
            pb.FileUploadResponse,
            source,
            item_id=item_id,
            timeout=timeout,
            pace=pace,
        )

    async def _stream(
        self,
        method: str,
        first: _Req,
        wrap: Callable[[bytes], Raw],
        resp_type: type[_StreamResp],
        source: ByteSource,
        *,
        item_id: str | None,
        timeout: float | None,
        pace: Pace | None = None,
    ) -> UploadResult:
        """A client stream: the metadata message, then the payload in `chunk_size` pieces
        (grpclib's flow control keeps at most a window of it in flight). `timeout` (default
        the client's) is a progress deadline: the call fails with DEADLINE_EXCEEDED after
        that long without progress, never for its total length, so a big file gets through
        a link of any speed. `pace` is charged each chunk before it is sent; time spent
        waiting on it is not a stall."""
        waits = 0  # pace calls under way

        async def paced(nbytes: int) -> None:
            nonlocal waits
            assert pace is not None
            waits += 1
            try:
                await pace(nbytes)
            finally:
                waits -= 1

        async def send(stream: Stream[Any, _StreamResp]) -> None:
            await stream.send_message(first)
            async for chunk in iter_source(source, self.chunk_size):
                message = wrap(chunk)  # encoded here: no message copies
                if pace is not None:
                    await paced(len(message.data))
                await stream.send_message(message)
            await stream.end()

        reply = await self._call(
            method,
            type(first),
            resp_type,
            send,
            item_id=item_id,
            timeout=timeout,
            cardinality=Cardinality.STREAM_UNARY,
            replayable=not callable(source),
            progress=True,
            holding=None if pace is None else lambda: waits > 0,
        )
        return UploadResult(reply.file_id, reply.binary_data_id)

    # -- the seed DataClient's upload calls --------------------------------------------

    async def binary_data_capture_upload(
        self,
        binary_data: bytes,
        part_id: str,
        component_type: str,
        component_name: str,
        method_name: str,
        file_extension: str,
        method_parameters: Mapping[str, Any] | None = None,
        tags: list[str] | None = None,
        data_request_times: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> str:
        """Upload one binary reading (e.g. a camera frame); returns its binary_data_id.

        Example::

            binary_data_id = await data_client.binary_data_capture_upload(
                jpeg_bytes, "part-1", "rdk:component:camera", "cam", "GetImages", ".jpg",
                data_request_times=(requested_at, received_at),
            )
        """
        seed = _Seed(part_id, component_type, component_name, method_name, method_parameters, tags)
        meta = seed.metadata(pb.DATA_TYPE_BINARY_SENSOR, file_extension=file_extension)
        reading = pb.SensorData(metadata=sensor_metadata(data_request_times), binary=binary_data)
        result = await self.upload_readings(meta, [reading.SerializeToString()])
        return result.binary_data_id

    async def tabular_data_capture_upload(
        self,
        tabular_data: list[Mapping[str, Any]],
        part_id: str,
        component_type: str,
        component_name: str,
        method_name: str,
        method_parameters: Mapping[str, Any] | None = None,
        tags: list[str] | None = None,
        data_request_times: list[tuple[dt.datetime, dt.datetime]] | None = None,
    ) -> str:
        """Upload readings that share one metadata (one per dict); returns the upload's
        file_id. `data_request_times`, if given, has one (requested, received) pair per
        reading.

        Example::

            file_id = await data_client.tabular_data_capture_upload(
                [{"temp_c": 21.5}, {"temp_c": 21.7}], "part-1", "rdk:component:sensor",
                "thermo", "Readings", tags=["lab"],
            )
        """
        call = "tabular_data_capture_upload"
        if data_request_times is not None and len(data_request_times) != len(tabular_data):
            raise InvalidArgument(
                call,
                f"data_request_times has {len(data_request_times)} entries but tabular_data"
                f" has {len(tabular_data)}; they must match",
            )
        seed = _Seed(part_id, component_type, component_name, method_name, method_parameters, tags)
        meta = seed.metadata(pb.DATA_TYPE_TABULAR_SENSOR)
        readings = []
        for i, row in enumerate(tabular_data):
            reading = pb.SensorData(
                metadata=sensor_metadata(data_request_times[i] if data_request_times else None)
            )
            reading.struct.CopyFrom(_struct(call, f"tabular_data[{i}]", row))
            readings.append(reading.SerializeToString())
        result = await self.upload_readings(meta, readings)
        return result.file_id

    async def streaming_data_capture_upload(
        self,
        data: bytes,
        part_id: str,
        file_ext: str,
        component_type: str | None = None,
        component_name: str | None = None,
        method_name: str | None = None,
        method_parameters: Mapping[str, Any] | None = None,
        data_request_times: tuple[dt.datetime, dt.datetime] | None = None,
        tags: list[str] | None = None,
    ) -> str:
        """Send a large binary reading in `chunk_size` messages rather than one (no
        message-size limit applies); returns its binary_data_id.

        Example::

            binary_data_id = await data_client.streaming_data_capture_upload(
                pointcloud_bytes, "part-1", ".pcd", component_name="lidar"
            )
        """
        seed = _Seed(part_id, component_type, component_name, method_name, method_parameters, tags)
        meta = seed.metadata(pb.DATA_TYPE_BINARY_SENSOR, file_extension=file_ext)
        result = await self.upload_binary_stream(meta, sensor_metadata(data_request_times), data)
        return result.binary_data_id

    async def file_upload(
        self,
        part_id: str,
        data: bytes,
        component_type: str | None = None,
        component_name: str | None = None,
        method_name: str | None = None,
        file_name: str | None = None,
        method_parameters: Mapping[str, Any] | None = None,
        file_extension: str | None = None,
        tags: list[str] | None = None,
    ) -> str:
        """Upload a file held in memory; returns its binary_data_id.

        Example::

            binary_data_id = await data_client.file_upload(
                "part-1", b"run notes", file_name="notes", file_extension=".txt"
            )
        """
        seed = _Seed(part_id, component_type, component_name, method_name, method_parameters, tags)
        meta = seed.metadata(pb.DATA_TYPE_FILE, file_name=file_name, file_extension=file_extension)
        return (await self.upload_file(meta, data)).binary_data_id

    async def file_upload_from_path(
        self,
        filepath: str,
        part_id: str,
        component_type: str | None = None,
        component_name: str | None = None,
        method_name: str | None = None,
        method_parameters: Mapping[str, Any] | None = None,
        tags: list[str] | None = None,
    ) -> str:
        """Stream a file from disk in chunks (never read whole, so any size works);
        returns its binary_data_id. The file name and extension come from the path.

        Example::

            binary_data_id = await data_client.file_upload_from_path("/data/run.mp4", "part-1")
        """
        path = Path(filepath)
        if not path.is_file():
            raise FileNotFoundError(f"{filepath} is not a file")
        stem, ext = os.path.splitext(path.name)
        seed = _Seed(part_id, component_type, component_name, method_name, method_parameters, tags)
        meta = seed.metadata(pb.DATA_TYPE_FILE, file_name=stem, file_extension=ext)
        return (await self.upload_file(meta, path)).binary_data_id


class DataClient(UploadClient, DataQueries):
    """The seed `DataClient`'s API on one connection: uploads, queries, tags, bounding
    boxes and datasets. Safe for concurrent calls from many tasks.

    Open it with `connect()` (or construct it and call methods: it authenticates on the
    first call). It also stands in for the seed's `ViamClient`: `data_client` returns
    itself and `close()` closes the connection, so `client.data_client.method(...)` and
    `client.close()` keep working.

    Example::

        async with connect("ingest.example.com:443", api_key_id=KEY_ID, api_key=KEY) as dc:
            rows, count, last = await dc.tabular_data_by_filter(
                create_filter(component_name="thermo"), limit=100
            )
    """

    TabularData: ClassVar[type[TabularData]] = TabularData

    @property
    def data_client(self) -> DataClient:
        """This client: seed code reaches the data API as `viam_client.data_client`.

        Example::

            data_client = (await connect(address, api_key_id=KEY_ID, api_key=KEY)).data_client
        """
        return self

    @classmethod
    def from_config(
        cls, config_path: str | os.PathLike[str], *, timeout: float | None = 60.0
    ) -> DataClient:
        """A client for the server the daemon's config file uploads to, with its address,
        API key (`cloud.api_key_file`, or EDGED_API_KEY which wins), TLS and CA file.
        Only the `cloud` section is read, with the daemon's rules. Raises `ConfigError` for
        an invalid one or for `cloud.address: embedded` (that server lives inside the
        daemon's process; nothing else can connect to it).

        Example::

            async with DataClient.from_config("/etc/edged/edged.yaml") as dc:
                print(await dc.tags_by_filter())
        """
        # The `cloud` section as the daemon reads it (declared below the SDK, in wire).
        cloud = load_cloud(Path(config_path))
        if cloud.embedded:
            raise ConfigError(
                f"{config_path}: cloud.address is 'embedded', which runs inside the daemon's"
                " own process and takes no connections; point cloud.address at an"
                " `edged ingest` or DataSync server (host:port) to query it"
            )
        return connect_cloud(cloud, kind=cls, timeout=timeout, where=str(config_path))


class Connecting:
    """What `connect()` returns: `await` it for an authenticated `DataClient`, or use it
    in `async with`, which also closes the client at the end."""

    def __init__(self, make: Callable[[], DataClient]) -> None:
        self._make = make
        self._client: DataClient | None = None

    async def _open(self) -> DataClient:
        client = self._make()
        try:
            await client.authenticate()  # fail here, not at the first call, on a bad key
        except BaseException:
            client.close()
            raise
        self._client = client
        return client

    def __await__(self) -> Generator[Any, None, DataClient]:
        return self._open().__await__()

    async def __aenter__(self) -> DataClient:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()


def connect(
    address: str | None = None,
    *,
    api_key_id: str | None = None,
    api_key: str | None = None,
    tls: bool = True,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float | None = 60.0,
    config_path: str | os.PathLike[str] | None = None,
) -> Connecting:
    """Open a `DataClient` to `address` (host:port), or to the server named in a daemon
    config file (`config_path`, see `DataClient.from_config`). TLS with certificate
    verification unless `tls=False`; `ca_file` trusts a private CA. With an API key the
    client authenticates at once, so a wrong key fails here as `AuthError`. `timeout`
    bounds each call, except streamed uploads (`streaming_data_capture_upload`,
    `file_upload`, `file_upload_from_path`): those fail only after that long without
    progress, so a big file gets through however slow the link.

    Example::

        async with connect("127.0.0.1:8080", api_key_id=KEY_ID, api_key=KEY) as data_client:
            print(await data_client.list_datasets_by_organization_id("org-1"))

        data_client = await connect(config_path="/etc/edged/edged.yaml")  # close() later
    """
    if (address is None) == (config_path is None):
        raise ValueError("give either an address or config_path, not both or neither")
    if config_path is not None:
        if api_key_id or api_key or ca_file or not tls:
            raise ValueError("config_path supplies the key and TLS settings; pass only timeout")
        path = config_path
        return Connecting(lambda: DataClient.from_config(path, timeout=timeout))
    assert address is not None
    where = address
    ca = Path(ca_file) if ca_file is not None else None
    return Connecting(
        lambda: wire_connect(
            where,
            kind=DataClient,
            api_key_id=api_key_id,
            api_key=api_key,
            tls=tls,
            ca_file=ca,
            timeout=timeout,
        )
    )
