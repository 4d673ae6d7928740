"""Uploads over an uplink slower than any rate edged could assume.

The uplink is a throttling TCP relay on loopback between the client and a real
`edged ingest`: it forwards client→server at a fixed rate through small socket buffers,
so the backlog builds up in the client's kernel send queue as behind congested LTE or a
satellite link. A stream must be judged by its progress, not by a guess of the rate: a
big file arrives once however slow the link, and only a link that stops moving fails.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.events import RecvRequest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import FileSlice, UploadClient, sensor_metadata, upload_metadata
from edged.daemon.config import BackoffConfig, UploadConfig
from edged.daemon.outbox import KIND_FILE, Claim, FileRef, Outbox
from edged.daemon.uploader import Uploader
from edged.errors import UploadError
from edged.ingest import IngestServer
from tests.support.hooked_server import hooked_server
from tests.support.relay import KiB, Relay

CALL_TIMEOUT = 3.0
# Over the unary limit, so streamed. The old rule gave it CALL_TIMEOUT + size/128 KiB/s
# (11.4 s); at 64 KiB/s it needs about 17 s.
BIG = 1_100_000
SLOW_RATE = 64 * KiB


class Calls:
    """DataSync calls the server saw (a retry from byte 0 would be a second one)."""

    def __init__(self) -> None:
        self.n = 0

    async def hook(self, event: RecvRequest) -> None:
        if "DataSyncService" in event.method_name:
            self.n += 1


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
async def server(tmp_path: Path, calls: Calls) -> AsyncIterator[IngestServer]:
    async with hooked_server(tmp_path / "ingest", calls.hook) as srv:
        yield srv


async def _run_until_empty_or_failed(up: Uploader, limit_s: float) -> None:
    """Drain the outbox, but stop at the first failed call (a restart from byte 0 is
    already the bug) rather than waiting out the retries."""
    run = asyncio.create_task(up.run(until_empty=True))
    try:
        async with asyncio.timeout(limit_s):
            while not run.done() and up.last_error is None:
                await asyncio.wait({run}, timeout=0.2)
    finally:
        up.stop()  # a call in flight may take long: cut it, the outcome is already known
        await asyncio.wait({run}, timeout=5)
        run.cancel()
        await asyncio.wait({run})


def _port(server: IngestServer) -> int:
    return int(server.address.rsplit(":", 1)[1])


async def test_big_file_over_a_slow_link_arrives_once(
    server: IngestServer, calls: Calls, tmp_path: Path
) -> None:
    payload = random.Random(7).randbytes(BIG)
    path = tmp_path / "run.bag"
    path.write_bytes(payload)
    meta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="run", file_extension=".bag")
    box = await Outbox.open(tmp_path / "state")
    try:
        await box.enqueue_item(
            KIND_FILE,
            meta.SerializeToString(),
            FileRef(str(path), 0, BIG),
            claim=Claim(str(path), BIG, 0, True),
        )
        # A second worker and a lease far shorter than the upload: only a renewed lease
        # keeps that worker from sending the same file again alongside.
        settings = UploadConfig(
            workers=2,
            call_timeout=CALL_TIMEOUT,
            lease=CALL_TIMEOUT,
            backoff=BackoffConfig(initial=0.01, max=0.05),
        )
        async with Relay(_port(server), SLOW_RATE) as relay:
            async with UploadClient(relay.address, tls=False) as client:
                up = Uploader(box, client, settings, idle_poll_s=0.1, rng=random.Random(1))
                await _run_until_empty_or_failed(up, 90)
            assert up.last_error is None
            assert (relay.connections, up.calls, calls.n) == (1, 1, 1)
    finally:
        await box.close()
    [stored] = await server.store.binaries()
    assert stored.size == BIG
    assert stored.path.read_bytes() == payload


async def test_dead_link_fails_the_stream_for_lack_of_progress(
    server: IngestServer, tmp_path: Path
) -> None:
    path = tmp_path / "run.bag"
    path.write_bytes(random.Random(8).randbytes(BIG))
    meta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="run")
    loop = asyncio.get_running_loop()
    async with Relay(_port(server), 0) as relay, UploadClient(relay.address, tls=False) as c:
        started = loop.time()
        with pytest.raises(UploadError) as caught:
            await asyncio.wait_for(
                c.upload_file(meta, FileSlice(path, 0, BIG), item_id="i", timeout=CALL_TIMEOUT),
                30,
            )
        took = loop.time() - started
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert caught.value.transport
    assert f"no upload progress for {CALL_TIMEOUT:g}s" in caught.value.message
    assert CALL_TIMEOUT <= took < 30
    assert await server.store.binaries() == []


async def test_unary_call_keeps_its_whole_call_deadline(server: IngestServer) -> None:
    """A unary body is at most 1 MB: its call_timeout bounds the whole call, progress or
    not, as before."""
    reading = pb.SensorData(metadata=sensor_metadata(None), binary=b"x" * 900_000)
    meta = upload_metadata("part-1", pb.DATA_TYPE_BINARY_SENSOR, file_extension=".bin")
    async with Relay(_port(server), 32 * KiB) as relay, UploadClient(relay.address, tls=False) as c:
        with pytest.raises(UploadError) as caught:  # the body needs ~28 s at this rate
            await asyncio.wait_for(
                c.upload_readings(meta, [reading.SerializeToString()], timeout=1.0), 30
            )
    assert caught.value.status is Status.DEADLINE_EXCEEDED
    assert caught.value.message == "call deadline exceeded"
