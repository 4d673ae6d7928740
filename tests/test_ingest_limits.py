"""Hostile peers against `edged ingest`: each attack reproduced, each bound asserted.

Memory before authentication, idle connections and abandoned streams, and wrong-key
floods. Timeouts are configured small so the tests are quick; bounds are generous.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from edged._proto.app.datasync.v1 import data_sync_grpc
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2
from edged.client import UploadClient, upload_metadata
from edged.errors import ConfigError
from edged.ingest import ApiKey, IngestServer, IngestSettings, KeyStore
from edged.ingest.auth import AuthLimits
from edged.ingest.guard import Limits, connections_for
from tests.support.credentials import KeyFile, make_key_file
from tests.support.processes import edged_cmd, ingest_process

MiB = 1024 * 1024


async def until(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def auth_request(key_id: str, secret: str) -> auth_pb2.AuthenticateRequest:
    return auth_pb2.AuthenticateRequest(
        entity=key_id, credentials=auth_pb2.Credentials(type="api-key", payload=secret)
    )


async def declare_huge(port: int, declared: int, send: int) -> Status | None:
    """Authenticate without a token, declaring `declared` bytes and sending up to `send`."""
    chunk = b"x" * MiB
    async with Channel("127.0.0.1", port) as channel:
        stub = auth_grpc.AuthServiceStub(channel)
        pusher: asyncio.Task[None] | None = None
        try:
            async with stub.Authenticate.open(timeout=60) as stream:
                await stream.send_request()
                h2 = stream._stream

                async def push() -> None:
                    await h2.send_data(b"\0" + declared.to_bytes(4, "big"))
                    for _ in range(send // MiB):
                        await h2.send_data(chunk)

                pusher = asyncio.create_task(push())
                await stream.recv_message()
        except GRPCError as exc:
            return exc.status
        except StreamTerminatedError:
            return None
        finally:
            if pusher is not None:
                pusher.cancel()
                await asyncio.gather(pusher, return_exceptions=True)
    return Status.OK


def test_unauthenticated_huge_messages_are_refused_before_buffering(
    tmp_path: Path, key: KeyFile
) -> None:
    """4 x 200 MiB declared by strangers used to be buffered whole (1.1 GiB that stayed)."""
    with ingest_process(
        tmp_path / "ingest", ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]
    ) as (proc, port):
        server = psutil.Process(proc.pid)
        before = server.memory_info().rss

        async def attack() -> list[Status | None]:
            calls = [declare_huge(port, 200 * MiB, 200 * MiB) for _ in range(4)]
            return await asyncio.wait_for(asyncio.gather(*calls), 60)

        statuses = asyncio.run(attack())
        growth = server.memory_info().rss - before
        assert statuses == [Status.RESOURCE_EXHAUSTED] * 4
        assert growth < 64 * MiB, f"server RSS grew {growth / MiB:.0f} MiB"

        async def legit() -> None:
            async with UploadClient(
                f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
            ) as c:
                await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")

        asyncio.run(legit())


@pytest.fixture
async def tight(tmp_path: Path, key: KeyFile) -> AsyncIterator[IngestServer]:
    """Plaintext keyed server with small limits and quick timeouts."""
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(ApiKey(key.key_id, key.secret),),
        limits=Limits(
            max_message_bytes=MiB,
            buffer_bytes=2 * MiB,
            buffer_bytes_per_key=MiB,
            progress_timeout_s=0.5,
            unauth_timeout_s=0.5,
            max_streams_per_key=3,
        ),
        auth=AuthLimits(
            fail_burst=5,
            fail_per_s=0.01,
            fail_global_burst=20,
            fail_global_per_s=0.1,
            fail_delay_s=0.05,
        ),
        shutdown_grace_s=1.0,
    )
    async with IngestServer(settings) as server:
        yield server


async def token_for(channel: Channel, key: KeyFile) -> dict[str, str]:
    reply = await auth_grpc.AuthServiceStub(channel).Authenticate(
        auth_request(key.key_id, key.secret)
    )
    return {"authorization": f"Bearer {reply.access_token}"}


async def final_status(stream: Any) -> Status:
    """The status the server ended a call with (trailers may come with a stream reset)."""
    try:
        await stream.recv_message()
        await stream.recv_trailing_metadata()
    except GRPCError as exc:
        return exc.status
    except StreamTerminatedError:
        try:
            stream._maybe_raise()
        except GRPCError as exc:
            return exc.status
    return Status.OK


def _file_meta() -> pb.FileUploadRequest:
    return pb.FileUploadRequest(metadata=upload_metadata("p", pb.DATA_TYPE_FILE, file_name="f"))


async def test_abandoned_upload_is_ended_after_progress_timeout_and_temp_removed(
    tight: IngestServer, key: KeyFile, tmp_path: Path
) -> None:
    """A stream that never ends used to hold its fd and temp file forever."""
    tmp_dir = tmp_path / "ingest" / "blobs" / ".tmp"
    async with Channel("127.0.0.1", tight.port) as channel:
        md = await token_for(channel, key)
        stub = data_sync_grpc.DataSyncServiceStub(channel)
        with pytest.raises(GRPCError) as err:
            async with stub.FileUpload.open(metadata=md) as stream:
                await stream.send_message(_file_meta())
                await stream.send_message(
                    pb.FileUploadRequest(file_contents=pb.FileData(data=b"a" * 1000))
                )
                await until("temp file", lambda: tmp_dir.exists() and any(tmp_dir.iterdir()))
                with contextlib.suppress(StreamTerminatedError):
                    await asyncio.wait_for(stream.recv_message(), 10)  # we never send the end
        assert err.value.status is Status.DEADLINE_EXCEEDED
        assert "--progress-timeout" in (err.value.message or "")
        await until("temp file removed", lambda: not any(tmp_dir.iterdir()))
        # The server still serves the same key.
        reply = await stub.DataCaptureUpload(
            pb.DataCaptureUploadRequest(
                metadata=upload_metadata("p", pb.DATA_TYPE_TABULAR_SENSOR, component_name="s"),
                sensor_contents=[pb.SensorData(struct={"a": 1})],  # type: ignore[arg-type]
            ),
            metadata=md,
        )
        assert reply.binary_data_id or reply.file_id is not None


async def test_streams_per_key_and_buffered_bytes_per_key_are_capped(
    tight: IngestServer, key: KeyFile
) -> None:
    """Big messages of one key are admitted one at a time; its streams are capped."""
    async with Channel("127.0.0.1", tight.port) as channel:
        md = await token_for(channel, key)
        stub = data_sync_grpc.DataSyncServiceStub(channel)
        held = [stub.FileUpload.open(metadata=md) for _ in range(3)]
        streams = [await s.__aenter__() for s in held]
        try:
            for s in streams:
                await s.send_request()
            # Stream 1 declares a max-size message and sends half: it holds the key's pool.
            first = streams[0]._stream
            await first.send_data(b"\0" + MiB.to_bytes(4, "big") + b"x" * (MiB // 2))
            assert tight.guard is not None
            await until(
                "admitted",
                lambda: tight.guard is not None and tight.guard.pools.used(key.key_id) == MiB,
            )
            # Stream 2 declares another: it must wait, then give up, never double the pool.
            await streams[1]._stream.send_data(b"\0" + MiB.to_bytes(4, "big"))
            # A 4th stream of the same key is refused at once.
            with pytest.raises(GRPCError) as err:
                await stub.FileUpload([_file_meta()], metadata=md, timeout=10)
            assert err.value.status is Status.RESOURCE_EXHAUSTED
            assert "--max-streams-per-key" in (err.value.message or "")
            assert tight.guard.pools.used(key.key_id) == MiB
            status = await asyncio.wait_for(final_status(streams[1]), 10)
            assert status in (Status.RESOURCE_EXHAUSTED, Status.DEADLINE_EXCEEDED)
        finally:
            for s in held:
                with contextlib.suppress(GRPCError, StreamTerminatedError):
                    await s.__aexit__(None, None, None)
        await until(
            "pool released",
            lambda: tight.guard is not None and tight.guard.pools.used(key.key_id) == 0,
        )


async def test_wrong_key_flood_is_throttled_while_the_right_key_works(
    tight: IngestServer, key: KeyFile
) -> None:
    """2,000 wrong keys in 1.4 s used to be answered at full speed, unthrottled."""
    results: list[Status] = []
    async with Channel("127.0.0.1", tight.port) as channel:
        stub = auth_grpc.AuthServiceStub(channel)

        async def wrong(n: int) -> None:
            for _ in range(n):
                try:
                    await stub.Authenticate(auth_request(key.key_id, "w" * 64), timeout=10)
                except GRPCError as exc:
                    results.append(exc.status)

        flood = asyncio.gather(*(wrong(10) for _ in range(20)))
        await until("throttled", lambda: Status.RESOURCE_EXHAUSTED in results)
        reply = await stub.Authenticate(auth_request(key.key_id, key.secret), timeout=10)
        assert reply.access_token
        await asyncio.wait_for(flood, 30)
    assert len(results) == 200
    verified_failures = results.count(Status.UNAUTHENTICATED)
    assert verified_failures <= 5 + 2  # the key id's burst (+ refill during the test)
    assert results.count(Status.RESOURCE_EXHAUSTED) == 200 - verified_failures


def test_token_lifetime_count_and_lookup() -> None:
    now = [0.0]
    key = ApiKey("k", "s" * 32)
    store = KeyStore([key], AuthLimits(max_tokens_per_key=4), clock=lambda: now[0])
    first = store.issue(key)
    assert store.peek(f"Bearer {first}") == key
    now[0] = 3600.5  # 1 h default lifetime
    assert store.peek(f"Bearer {first}") is None
    tokens = [store.issue(key) for _ in range(10)]
    assert store.token_count("k") == 4  # oldest evicted, expired pruned
    assert [store.peek(f"Bearer {t}") for t in tokens[:6]] == [None] * 6
    assert all(store.peek(f"Bearer {t}") == key for t in tokens[6:])
    # A token dies with its key: a store that no longer knows the key refuses it.
    changed = KeyStore([ApiKey("k", "t" * 32)], clock=lambda: now[0])
    changed._tokens, changed._by_key = store._tokens, store._by_key
    assert changed.peek(f"Bearer {tokens[-1]}") is None


def test_short_key_is_refused_at_start_naming_the_file(tmp_path: Path) -> None:
    key = make_key_file(tmp_path)
    key.path.write_text("x\n")
    res = subprocess.run(
        edged_cmd("ingest", "--data", str(tmp_path / "d"), *key.ingest_args()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2
    assert f"API key file {key.path} holds a key of 1 characters" in res.stderr
    assert "Traceback" not in res.stderr
    with pytest.raises(ConfigError):
        KeyStore([ApiKey("k", "short")])


@pytest.mark.parametrize("nofile,cap", [(1024, 384), (256, 16), (1 << 20, (1 << 19) - 128)])
def test_connection_cap_from_descriptor_limit(nofile: int, cap: int) -> None:
    assert connections_for(nofile) == cap


def test_idle_connections_are_bounded_and_a_legitimate_call_succeeds(
    tmp_path: Path, key: KeyFile
) -> None:
    """Idle strangers used to exhaust descriptors (new calls then failed with EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    extra = ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]
    extra += ["--max-connections", "200", "--unauth-timeout", "2"]
    socks: list[socket.socket] = []
    with ingest_process(tmp_path / "ingest", extra) as (proc, port):
        server = psutil.Process(proc.pid)
        base_fds = server.num_fds()
        try:
            for _ in range(1000):
                socks.append(socket.create_connection(("127.0.0.1", port)))

            async def legit() -> None:
                async with UploadClient(
                    f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
                ) as c:
                    await c.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")

            asyncio.run(asyncio.wait_for(legit(), 30))
            assert server.num_fds() <= base_fds + 200 + 8
            # Still connected on our side: the server closes strangers after --unauth-timeout.
            deadline = time.monotonic() + 20
            while server.num_fds() > base_fds + 4:
                assert time.monotonic() < deadline, "idle connections were not closed"
                time.sleep(0.05)
        finally:
            for s in socks:
                s.close()


async def test_large_frames_only_once_a_connection_authenticates(
    tight: IngestServer, key: KeyFile
) -> None:
    """16 KiB frames made HTTP/2 framing most of a file upload's CPU; a stranger still
    gets only those (a frame is buffered whole before h2 checks it), and the message
    bounds hold for the large frames of an authenticated connection."""
    assert tight.guard is not None
    async with Channel("127.0.0.1", tight.port) as channel:
        md = await token_for(channel, key)  # Authenticate carries no token yet
        h2 = channel._protocol.connection._connection  # type: ignore[union-attr]
        server = next(iter(tight.guard.connections))
        assert not server.authenticated
        assert h2.max_outbound_frame_size == 16_384
        assert server.connection._connection.max_inbound_frame_size == 16_384

        stub = data_sync_grpc.DataSyncServiceStub(channel)
        body = pb.FileUploadRequest(file_contents=pb.FileData(data=b"x" * (900 * 1024)))
        reply = await stub.FileUpload([_file_meta(), body, body], metadata=md, timeout=30)
        assert reply.binary_data_id
        assert server.authenticated
        assert h2.max_outbound_frame_size == MiB  # what grpclib cuts DATA frames to
        assert server.connection._connection.max_inbound_frame_size == MiB

        # Past --max-message-bytes is still refused from the prefix, nothing held after.
        guard = tight.guard
        with pytest.raises(GRPCError) as err:
            async with stub.FileUpload.open(metadata=md) as stream:
                await stream.send_message(_file_meta())
                await stream._stream.send_data(b"\0" + (2 * MiB).to_bytes(4, "big") + b"x" * MiB)
                await asyncio.wait_for(stream.recv_message(), 10)
        assert err.value.status is Status.INVALID_ARGUMENT
        assert "--max-message-bytes" in (err.value.message or "")
        await until("pool released", lambda: guard.pools.used(key.key_id) == 0)
