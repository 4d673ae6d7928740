"""The upload bandwidth cap against a real loopback `edged ingest`: the rate the server
acknowledges stays at the cap across workers, and waiting on the cap is never taken for
a stalled stream or eats into a unary call's deadline.

The rate assertion is the issue's acceptance criterion (a ratio to the cap over several
seconds' worth of data), not a speed benchmark: loopback is far faster than the cap."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import FileSlice, UploadClient, sensor_metadata, upload_metadata
from edged.daemon.config import BackoffConfig, UploadConfig
from edged.daemon.outbox import KIND_FILE, Claim, FileRef, Outbox
from edged.daemon.shaper import Shaper
from edged.daemon.uploader import Uploader
from edged.ingest import IngestServer, IngestSettings

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[IngestServer]:
    settings = IngestSettings(data_dir=tmp_path / "ingest", synchronous="NORMAL")
    async with IngestServer(settings) as srv:
        yield srv


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(tmp_path / "state")
    yield ob
    await ob.close()


def _tabular(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        r = pb.SensorData(metadata=sensor_metadata(None))
        r.struct.update({"seq": i, "pad": "x" * 200})
        out.append(r.SerializeToString())
    return out


@pytest.mark.timeout(60)
async def test_acknowledged_rate_stays_within_ten_percent_of_the_cap(
    server: IngestServer, box: Outbox, tmp_path: Path
) -> None:
    cap = 2 * MiB
    rng = random.Random(3)
    fmeta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="f").SerializeToString()
    total = 0
    for i in range(4):  # 4 x 2000 KiB files for 4 workers: the cap is shared, not per worker
        size = 2000 * KiB
        path = tmp_path / f"run{i}.bag"
        path.write_bytes(rng.randbytes(size))
        await box.enqueue_item(
            KIND_FILE, fmeta, FileRef(str(path), 0, size), claim=Claim(str(path), size, 0, True)
        )
        total += size
    tmeta = upload_metadata(
        "part-1", pb.DATA_TYPE_TABULAR_SENSOR, component_name="imu", method_name="Readings"
    ).SerializeToString()
    readings = _tabular(2000)  # ~0.45 MiB in tabular batches of 500 KiB at most
    await box.enqueue_readings(tmeta, readings)
    total += sum(len(r) for r in readings)
    assert total >= 8 * MiB

    config = UploadConfig(
        workers=4,
        batch_max_bytes=500 * KiB,
        max_bandwidth=cap,
        backoff=BackoffConfig(initial=0.01, max=0.05),
    )
    async with UploadClient(server.address, tls=False) as client:
        up = Uploader(box, client, config, idle_poll_s=0.05)
        started = time.monotonic()
        await asyncio.wait_for(up.run(until_empty=True), 40)
        took = time.monotonic() - started
    assert up.last_error is None
    assert (await box.stats()).items == 0
    acknowledged = (await box.stats()).counters["uploaded_bytes"]
    assert acknowledged == total
    assert 0.9 <= (acknowledged / took) / cap <= 1.1, f"{acknowledged / took / MiB:.2f} MiB/s"
    assert len(await server.store.binaries()) == 4
    assert len(await server.store.readings()) == 2000


async def test_waiting_on_the_cap_is_not_a_stalled_stream(
    server: IngestServer, tmp_path: Path
) -> None:
    """Each chunk waits about 1 s for the cap; the stream's progress limit is 0.3 s."""
    path = tmp_path / "run.bag"
    path.write_bytes(random.Random(4).randbytes(192 * KiB))
    shaper = Shaper(64 * KiB, chunk=64 * KiB)
    await shaper.acquire(64 * KiB)  # an empty bucket: every chunk waits for the cap
    meta = upload_metadata("part-1", pb.DATA_TYPE_FILE, file_name="run")
    async with UploadClient(server.address, tls=False) as client:
        await asyncio.wait_for(
            client.upload_file(
                meta, FileSlice(path, 0, 192 * KiB), item_id="i", timeout=0.3, pace=shaper.acquire
            ),
            30,
        )
    assert shaper.waited_s >= 2.5  # three chunks held back, none cut as a stall
    [stored] = await server.store.binaries()
    assert stored.size == 192 * KiB


async def test_a_unary_call_waits_for_the_cap_before_its_deadline_starts(
    server: IngestServer,
) -> None:
    shaper = Shaper(64 * KiB, chunk=64 * KiB)
    await shaper.acquire(64 * KiB)
    readings = _tabular(200)  # ~45 KiB: about 0.7 s of the cap
    meta = upload_metadata("part-1", pb.DATA_TYPE_TABULAR_SENSOR, component_name="imu")
    async with UploadClient(server.address, tls=False) as client:
        await asyncio.wait_for(
            client.upload_readings(meta, readings, timeout=0.3, pace=shaper.acquire), 30
        )
    assert shaper.waited_s >= 0.5
    assert len(await server.store.readings()) == 200
