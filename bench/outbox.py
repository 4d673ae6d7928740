"""outbox: enqueue and drain rates of the durable outbox, and its RSS against backlog size.

Every measurement runs in a fresh child (`python -m bench.outbox --worker SPEC`), so CPU%
and peak RSS (VmHWM) are the child's own. The outbox keeps its durable default,
SQLite synchronous=FULL (one fsync'd transaction per enqueue call).

Scenarios:
- enqueue: N readings (realistic SensorData: a 5-number struct and both timestamps,
  ~148 bytes encoded) into a fresh outbox, in `enqueue_readings` calls of 100 and of
  1000 readings (capture-file chunks); encoding happens before the timed region, as the
  capture source hands over the raw records of a file;
- drain: a child opens a backlog of N readings (1000-reading enqueues), `Outbox.open` +
  `recover()` timed (the READY-time proxy), then an Uploader (4 workers, 1000 readings
  per batch) sends it to a fresh `edged ingest` child (synchronous=FULL) until empty;
  the server's readings table is counted afterwards;
- both at N = 10k, 100k and 1M (quick: 10k, 100k): peak RSS must not grow with N.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from tests.support.credentials import KeyFile
from tests.support.ingest_db import ingest_count
from tests.support.processes import peak_rss_bytes

NAME = "outbox"
PART = "bench-part"
CHUNKS = (100, 1000)
DRAIN_CHUNK = 1000  # the backlog the drain starts from (capture source chunk size)
WORKERS = 4
BATCH = 1000
TEMPLATES = 1000  # distinct pre-encoded readings, cycled

# (backlog sizes, runs per scenario)
FULL = ((10_000, 100_000, 1_000_000), 3)
QUICK = ((10_000, 100_000), 3)

ENQUEUE_COLUMNS: list[common.Column] = [
    ("readings", "readings", ",d"),
    ("chunk", "per call", "d"),
    ("readings_per_s", "readings/s", ",.0f"),
    ("mb_per_s", "MB/s", ".2f"),
    ("calls_per_s", "calls/s", ".0f"),
    *common.CPU_RSS,
    ("disk_mib", "outbox on disk MiB", ".1f"),
    ("disk_bytes_per_reading", "disk B/reading", ".0f"),
]
DRAIN_COLUMNS: list[common.Column] = [
    ("readings", "backlog", ",d"),
    ("open_s", "open+recover s", ".3f"),
    ("stats_s", "stats() s", ".3f"),
    ("readings_per_s", "drain readings/s", ",.0f"),
    ("seconds", "drain s", ".1f"),
    ("cpu_drainer_pct", "CPU% drainer", ".0f"),
    ("cpu_server_pct", "CPU% ingest", ".0f"),
    ("rss_drainer_mib", "peak RSS drainer MiB", ".1f"),
    ("rss_server_mib", "peak RSS ingest MiB", ".1f"),
]


# -- workers (each in its own process) ------------------------------------------------------


def _templates() -> tuple[bytes, list[bytes]]:
    """(UploadMetadata bytes, TEMPLATES distinct encoded SensorData readings)."""
    from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
    from edged.client import sensor_metadata

    meta = common.tabular_upload_metadata(PART).SerializeToString()
    base = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    out: list[bytes] = []
    for i in range(TEMPLATES):
        t = base + dt.timedelta(milliseconds=50 * i, microseconds=i % 997)
        r = pb.SensorData(metadata=sensor_metadata((t, t + dt.timedelta(microseconds=1234))))
        r.struct.update(
            {
                "temperature_c": 20.0 + (i % 100) / 7,
                "humidity_pct": 40.0 + (i % 37) / 3,
                "pressure_hpa": 1013.25 - (i % 11) / 9,
                "battery_v": 3.7 - (i % 13) / 1000,
                "seq": 100_000 + i,
            }
        )
        out.append(r.SerializeToString())
    return meta, out


def _disk_bytes(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.glob("outbox.sqlite3*"))


async def _enqueue(spec: dict[str, Any]) -> common.Figures:
    from edged.daemon.config import OutboxConfig
    from edged.daemon.outbox import Outbox

    n, chunk, state = int(spec["n"]), int(spec["chunk"]), Path(spec["state_dir"])
    meta, readings = _templates()
    rss_before = peak_rss_bytes(os.getpid())
    # No backpressure in the way: the backlog is the point (1M x ~150 B is far below 2 GiB).
    box = await Outbox.open(state, OutboxConfig(min_free_disk=0))
    total_bytes = 0
    calls = 0
    meter = common.CpuMeter({"self": None})
    meter.start()
    done = 0
    while done < n:
        k = min(chunk, n - done)
        start = done % TEMPLATES
        batch = readings[start : start + k]
        if len(batch) < k:
            batch = batch + readings[: k - len(batch)]
        await box.enqueue_readings(meta, batch)
        total_bytes += sum(len(r) for r in batch)
        calls += 1
        done += k
    wall, cpu = meter.stop()
    await box.close()  # last connection: checkpoints and removes the WAL
    return {
        "seconds": wall,
        "readings_per_s": n / wall,
        "mb_per_s": total_bytes / 1e6 / wall,
        "calls_per_s": calls / wall,
        "cpu_pct": cpu["self"],
        "rss_mib": peak_rss_bytes(os.getpid()) / common.MiB,
        "rss_before_open_mib": rss_before / common.MiB,
        "payload_bytes_per_reading": total_bytes / n,
        "disk_mib": _disk_bytes(state) / common.MiB,
        "disk_bytes_per_reading": _disk_bytes(state) / n,
    }


async def _drain(spec: dict[str, Any]) -> common.Figures:
    from edged.daemon.config import OutboxConfig, UploadConfig
    from edged.daemon.outbox import Outbox
    from edged.daemon.uploader import Uploader

    state = Path(spec["state_dir"])
    t0 = time.perf_counter()
    box = await Outbox.open(state, OutboxConfig(min_free_disk=0))
    await box.recover()
    open_s = time.perf_counter() - t0
    rss_open = peak_rss_bytes(os.getpid())
    t0 = time.perf_counter()
    before = await box.stats()
    stats_s = time.perf_counter() - t0
    async with common.client_for(spec) as client:
        uploader = Uploader(box, client, UploadConfig(workers=WORKERS, batch_max_readings=BATCH))
        meter = common.CpuMeter({"drainer": None, "server": int(spec["server_pid"])})
        meter.start()
        await asyncio.wait_for(uploader.run(until_empty=True), float(spec["timeout_s"]))
        wall, cpu = meter.stop()
    after = await box.stats()
    await box.close()
    if after.readings or after.dead_letters:
        raise RuntimeError(f"drain left {after.readings} readings, {after.dead_letters} dead")
    return {
        "open_s": open_s,
        "stats_s": stats_s,
        "backlog_readings": float(before.readings),
        "seconds": wall,
        "calls": float(uploader.calls),
        "readings_per_s": before.readings / wall,
        "cpu_drainer_pct": cpu["drainer"],
        "cpu_server_pct": cpu["server"],
        "rss_after_open_mib": rss_open / common.MiB,
        "rss_drainer_mib": peak_rss_bytes(os.getpid()) / common.MiB,
    }


# -- driver ---------------------------------------------------------------------------------


def _enqueue_run(tmp: Path, n: int, chunk: int, keep: Path | None, _run: int) -> common.Figures:
    state = Path(tempfile.mkdtemp(prefix="outbox-", dir=tmp))
    try:
        spec = {"kind": "enqueue", "n": n, "chunk": chunk, "state_dir": str(state)}
        figures = common.run_worker("bench.outbox", spec, timeout_s=900)
        if keep is not None and not keep.exists():
            shutil.copytree(state, keep)  # the backlog the drain runs start from
        return figures
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _drain_run(tmp: Path, backlog: Path, n: int, key: KeyFile, _run: int) -> common.Figures:
    state = tmp / "drain-state"
    data = Path(tempfile.mkdtemp(prefix="ingest-", dir=tmp))
    shutil.copytree(backlog, state)
    try:
        spec = {"kind": "drain", "state_dir": str(state), "timeout_s": 600}
        figures = common.run_client_worker("bench.outbox", data, key, spec, log=tmp / "ingest.log")
        received = ingest_count(data)
        if received < n:
            raise RuntimeError(f"ingest stored {received} of {n} readings")
        figures["server_readings"] = float(received)
        return figures
    finally:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)


def run(quick: bool = False, runs: int | None = None) -> Path:
    sizes, reps = QUICK if quick else FULL
    reps = runs or reps
    machine = common.machine_info()
    enqueue: list[dict[str, Any]] = []
    drain: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp_s:
        tmp = Path(tmp_s)
        key = common.api_key(tmp)
        for n in sizes:
            backlog = tmp / f"backlog-{n}"
            for chunk in CHUNKS:
                keep = backlog if chunk == DRAIN_CHUNK else None
                med, all_runs = common.run_n(
                    reps,
                    functools.partial(_enqueue_run, tmp, n, chunk, keep),
                    f"outbox enqueue {n:,} x{chunk}",
                )
                enqueue.append({"readings": n, "chunk": chunk, **med, "runs": all_runs})
            med, all_runs = common.run_n(
                reps,
                functools.partial(_drain_run, tmp, backlog, n, key),
                f"outbox drain {n:,}",
            )
            drain.append({"readings": n, **med, "runs": all_runs})
            shutil.rmtree(backlog, ignore_errors=True)

    return common.report(
        NAME,
        {
            "runs_per_scenario": reps,
            "settings": {
                "reading": "SensorData: struct of 5 doubles + both timestamps, pre-encoded",
                "enqueue_chunks": list(CHUNKS),
                "drain_backlog_enqueued_in": DRAIN_CHUNK,
                "uploader": {"workers": WORKERS, "batch_max_readings": BATCH},
                "outbox": "SQLite WAL, synchronous=FULL",
                "server": "edged ingest over loopback, SQLite synchronous=FULL, API key auth",
                "figures": "medians over runs, each key independently",
            },
            "enqueue": enqueue,
            "drain": drain,
        },
        machine,
        quick,
        [
            ("outbox: enqueue (synchronous=FULL)", enqueue, ENQUEUE_COLUMNS),
            (
                f"outbox: drain to edged ingest ({WORKERS} workers, {BATCH} readings/batch)",
                drain,
                DRAIN_COLUMNS,
            ),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    workers = {"enqueue": _enqueue, "drain": _drain}
    return common.module_main("python -m bench.outbox", workers, run, argv)


if __name__ == "__main__":
    sys.exit(main())
