"""Auth, TLS and bad-input behaviour of `edged ingest`: right status, server keeps serving."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged._proto.app.datasync.v1 import data_sync_grpc
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2
from edged.client import UploadClient, client_tls_context, upload_metadata
from edged.errors import AuthError, UploadError
from edged.ingest import ApiKey, IngestServer, IngestSettings
from edged.ingest.guard import Limits
from tests.support.credentials import Certs, KeyFile

Stub = data_sync_grpc.DataSyncServiceStub


@pytest.fixture
async def raw(
    ingest: IngestServer, key: KeyFile, certs: Certs
) -> AsyncIterator[tuple[Stub, dict[str, str]]]:
    """A bare grpclib stub plus a valid bearer token, to send what our client never would."""
    channel = Channel("127.0.0.1", ingest.port, ssl=client_tls_context(certs.ca_file))
    auth = auth_grpc.AuthServiceStub(channel)
    reply = await auth.Authenticate(
        auth_pb2.AuthenticateRequest(
            entity=key.key_id, credentials=auth_pb2.Credentials(type="api-key", payload=key.secret)
        )
    )
    yield Stub(channel), {"authorization": f"Bearer {reply.access_token}"}
    channel.close()


def _tab_meta(**kw: object) -> pb.UploadMetadata:
    return upload_metadata("part-1", pb.DATA_TYPE_TABULAR_SENSOR, component_name="s", **kw)  # type: ignore[arg-type]


def _reading(struct: bool) -> pb.SensorData:
    r = pb.SensorData()
    if struct:
        r.struct.update({"a": 1})
    else:
        r.binary = b"xyz"
    return r


async def _missing_metadata(stub: Stub, md: dict[str, str]) -> None:
    await stub.DataCaptureUpload(
        pb.DataCaptureUploadRequest(sensor_contents=[_reading(True)]), metadata=md
    )


async def _missing_part_id(stub: Stub, md: dict[str, str]) -> None:
    meta = pb.UploadMetadata(type=pb.DATA_TYPE_TABULAR_SENSOR)
    await stub.DataCaptureUpload(
        pb.DataCaptureUploadRequest(metadata=meta, sensor_contents=[_reading(True)]), metadata=md
    )


async def _wrong_type(stub: Stub, md: dict[str, str]) -> None:
    meta = upload_metadata("p", pb.DATA_TYPE_FILE)
    await stub.DataCaptureUpload(
        pb.DataCaptureUploadRequest(metadata=meta, sensor_contents=[_reading(True)]), metadata=md
    )


async def _struct_in_binary(stub: Stub, md: dict[str, str]) -> None:
    meta = upload_metadata("p", pb.DATA_TYPE_BINARY_SENSOR)
    await stub.DataCaptureUpload(
        pb.DataCaptureUploadRequest(metadata=meta, sensor_contents=[_reading(True)]), metadata=md
    )


async def _binary_in_tabular(stub: Stub, md: dict[str, str]) -> None:
    await stub.DataCaptureUpload(
        pb.DataCaptureUploadRequest(metadata=_tab_meta(), sensor_contents=[_reading(False)]),
        metadata=md,
    )


async def _no_readings(stub: Stub, md: dict[str, str]) -> None:
    await stub.DataCaptureUpload(pb.DataCaptureUploadRequest(metadata=_tab_meta()), metadata=md)


async def _stream_without_metadata(stub: Stub, md: dict[str, str]) -> None:
    async with stub.StreamingDataCaptureUpload.open(metadata=md) as stream:
        await stream.send_message(pb.StreamingDataCaptureUploadRequest(data=b"abc"), end=True)
        await stream.recv_message()


async def _stream_metadata_twice(stub: Stub, md: dict[str, str]) -> None:
    first = pb.StreamingDataCaptureUploadRequest(
        metadata=pb.DataCaptureUploadMetadata(
            upload_metadata=upload_metadata("p", pb.DATA_TYPE_BINARY_SENSOR)
        )
    )
    async with stub.StreamingDataCaptureUpload.open(metadata=md) as stream:
        await stream.send_message(first)
        await stream.send_message(pb.StreamingDataCaptureUploadRequest(data=b"abc"))
        await stream.send_message(first, end=True)
        await stream.recv_message()


async def _file_without_metadata(stub: Stub, md: dict[str, str]) -> None:
    async with stub.FileUpload.open(metadata=md) as stream:
        await stream.send_message(
            pb.FileUploadRequest(file_contents=pb.FileData(data=b"abc")), end=True
        )
        await stream.recv_message()


async def _file_wrong_type(stub: Stub, md: dict[str, str]) -> None:
    async with stub.FileUpload.open(metadata=md) as stream:
        await stream.send_message(
            pb.FileUploadRequest(metadata=upload_metadata("p", pb.DATA_TYPE_TABULAR_SENSOR)),
            end=True,
        )
        await stream.recv_message()


BAD_INPUTS: list[tuple[Callable[[Stub, dict[str, str]], Awaitable[None]], str]] = [
    (_missing_metadata, "metadata is required"),
    (_missing_part_id, "metadata.part_id is required"),
    (_wrong_type, "metadata.type is DATA_TYPE_FILE"),
    (_struct_in_binary, "sensor_contents[0] must carry binary data"),
    (_binary_in_tabular, "sensor_contents[0] must carry struct data"),
    (_no_readings, "sensor_contents is empty"),
    (_stream_without_metadata, "first message of StreamingDataCaptureUpload must be metadata"),
    (_stream_metadata_twice, "metadata may only be sent once"),
    (_file_without_metadata, "first message of FileUpload must be metadata"),
    (_file_wrong_type, "metadata.type is DATA_TYPE_TABULAR_SENSOR"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS, ids=[c.__name__ for c, _ in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_naming_the_field(
    call: Callable[[Stub, dict[str, str]], Awaitable[None]],
    message: str,
    raw: tuple[Stub, dict[str, str]],
    client: UploadClient,
    ingest: IngestServer,
) -> None:
    stub, md = raw
    with pytest.raises(GRPCError) as err:
        await call(stub, md)
    assert err.value.status is Status.INVALID_ARGUMENT
    assert message in (err.value.message or "")
    # Nothing stored, and the server still serves.
    assert (await ingest.store.counts())["uploads"] == 0
    assert await client.tabular_data_capture_upload([{"ok": 1}], "p", "t", "n", "m")


async def test_no_token_and_bad_token_are_unauthenticated(
    raw: tuple[Stub, dict[str, str]],
) -> None:
    stub, _ = raw
    req = pb.DataCaptureUploadRequest(metadata=_tab_meta(), sensor_contents=[_reading(True)])
    for md in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}):
        with pytest.raises(GRPCError) as err:
            await stub.DataCaptureUpload(req, metadata=md)
        assert err.value.status is Status.UNAUTHENTICATED


async def test_wrong_key_raises_auth_error(
    ingest: IngestServer, key: KeyFile, certs: Certs
) -> None:
    async with UploadClient(
        ingest.address, api_key_id=key.key_id, api_key="wrong", ca_file=certs.ca_file
    ) as c:
        with pytest.raises(AuthError) as err:
            await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")
    assert err.value.status is Status.UNAUTHENTICATED
    assert "wrong" not in str(err.value)  # the key never appears in messages
    assert (await ingest.store.counts())["uploads"] == 0


async def test_client_reauthenticates_once_when_token_goes_stale(
    tmp_path: Path, key: KeyFile, certs: Certs
) -> None:
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(ApiKey(key.key_id, key.secret),),
        tls_cert=certs.cert_file,
        tls_key=certs.key_file,
    )
    async with IngestServer(settings) as first:
        port = first.port
        c = UploadClient(
            first.address, api_key_id=key.key_id, api_key=key.secret, ca_file=certs.ca_file
        )
        await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")
    # Restarted server on the same port has forgotten every token.
    async with IngestServer(IngestSettings(**{**settings.__dict__, "port": port})) as second:
        await c.tabular_data_capture_upload([{"a": 2}], "p", "t", "n", "m")
        assert [r.data for r in await second.store.readings()] == [{"a": 1}, {"a": 2}]
    c.close()


async def test_tls_is_verified_by_default(ingest: IngestServer) -> None:
    async with UploadClient(ingest.address, tls=True) as c:  # no CA for the test cert
        with pytest.raises(UploadError) as err:
            await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")
    assert err.value.status is Status.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.message


async def test_plaintext_only_when_asked(tmp_path: Path) -> None:
    async with IngestServer(IngestSettings(data_dir=tmp_path / "i")) as server:
        async with UploadClient(server.address, tls=False) as c:
            assert await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")
        async with UploadClient(server.address) as c:  # TLS to a plaintext server fails
            with pytest.raises(UploadError) as err:
                await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")
            assert err.value.status is Status.UNAVAILABLE


async def test_over_size_message_is_refused(tmp_path: Path) -> None:
    settings = IngestSettings(data_dir=tmp_path / "i", limits=Limits(max_message_bytes=100_000))
    async with IngestServer(settings) as server, UploadClient(server.address, tls=False) as c:
        with pytest.raises(UploadError) as err:
            await c.file_upload("p", b"x" * 200_000, file_name="big")  # 64 KiB chunks: fine
            await c.binary_data_capture_upload(b"x" * 200_000, "p", "t", "n", "m", ".bin")
        assert err.value.status is Status.INVALID_ARGUMENT
        assert "--max-message-bytes" in err.value.message
        assert (await server.store.counts())["binaries"] == 1


async def test_over_size_upload_is_refused(tmp_path: Path) -> None:
    settings = IngestSettings(data_dir=tmp_path / "i", max_upload_bytes=100_000)
    async with IngestServer(settings) as server, UploadClient(server.address, tls=False) as c:
        with pytest.raises(UploadError) as err:
            await c.file_upload("p", b"x" * 200_000, file_name="big")
        assert err.value.status is Status.INVALID_ARGUMENT
        assert "--max-upload-bytes" in err.value.message
        assert (await server.store.counts())["binaries"] == 0
        assert list((tmp_path / "i" / "blobs" / ".tmp").iterdir()) == []


async def test_sigterm_style_stop_finishes_in_flight_then_refuses(tmp_path: Path) -> None:
    server = IngestServer(IngestSettings(data_dir=tmp_path / "i", shutdown_grace_s=10))
    await server.start()
    gate = asyncio.Event()
    first_chunk_sent = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        first_chunk_sent.set()
        await gate.wait()
        yield b"b" * 1000

    c = UploadClient(server.address, tls=False)
    meta = upload_metadata("p", pb.DATA_TYPE_FILE, file_name="slow")
    upload = asyncio.create_task(c.upload_file(meta, slow))
    await asyncio.wait_for(first_chunk_sent.wait(), 10)
    stopping = asyncio.create_task(server.stop())
    # While draining, new calls are refused with a retryable status.
    async with UploadClient(server.address, tls=False) as other:
        with pytest.raises(UploadError) as err:
            await other.file_upload("p", b"late", file_name="late")
        assert err.value.status is Status.UNAVAILABLE
    gate.set()
    result = await asyncio.wait_for(upload, 10)
    await asyncio.wait_for(stopping, 10)
    assert result.binary_data_id
    c.close()


def test_tls_context_refuses_old_protocols(certs: Certs) -> None:
    ctx = client_tls_context(certs.ca_file)
    assert ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
