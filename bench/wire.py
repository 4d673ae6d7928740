"""wire: upload throughput client -> `edged ingest` over loopback gRPC (plaintext, auth on).

Each run starts a fresh `edged ingest` child (empty data dir, one API key) and a fresh
client child (`python -m bench.wire --worker SPEC`), so CPU% and peak RSS of client and
server are measured separately. The server keeps its durable defaults: SQLite
synchronous=FULL and fsync per blob.

Scenarios:
- tabular seed:   `tabular_data_capture_upload(list_of_dicts, ...)`; encoding is timed;
- tabular daemon: `upload_readings(metadata, [SensorData bytes])`, pre-encoded before the
                  timed region (the daemon encodes at enqueue);
  each with 1, 2 and 4 tasks sharing one client, 1000 readings per call;
- file path:      `file_upload_from_path` of a random file;
- binary stream:  `upload_binary_stream` with a Path source.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common
from tests.support.credentials import KeyFile
from tests.support.processes import peak_rss_bytes

NAME = "wire"
BATCH = 1000
TASKS = (1, 2, 4)
PART = "bench-part"

# (calls per tabular run, file MiB, runs per scenario)
FULL = (200, 200, 5)
QUICK = (40, 50, 3)

TABULAR_COLUMNS: list[common.Column] = [
    ("path", "path", ""),
    ("tasks", "tasks", "d"),
    ("readings_per_s", "readings/s", ",.0f"),
    ("calls_per_s", "calls/s", ".1f"),
    ("p50_ms", "p50 ms", ".1f"),
    ("p99_ms", "p99 ms", ".1f"),
    *common.CLIENT_SERVER,
]
FILE_COLUMNS: list[common.Column] = [
    ("path", "path", ""),
    ("size_mib", "size MiB", ".0f"),
    ("mib_per_s", "MiB/s", ".1f"),
    ("seconds", "s", ".2f"),
    *common.CLIENT_SERVER,
]


# -- client worker (runs in its own process) -----------------------------------------------


def _row(i: int) -> dict[str, Any]:
    return {
        "temperature_c": 20.0 + (i % 100) / 10,
        "humidity_pct": 40.0 + (i % 37) / 3,
        "pressure_hpa": 1013.25 - (i % 11),
        "battery_v": 3.7,
        "status": "ok",
        "seq": i,
    }


async def _tabular(spec: dict[str, Any]) -> common.Figures:
    from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
    from edged.client import sensor_metadata

    calls, tasks, seed = int(spec["calls"]), int(spec["tasks"]), spec["path"] == "seed"
    base = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    times = [
        (base + dt.timedelta(milliseconds=i), base + dt.timedelta(milliseconds=i + 1))
        for i in range(BATCH)
    ]
    rows = [_row(i) for i in range(BATCH)]
    meta = common.tabular_upload_metadata(PART)
    blobs: list[bytes] = []
    if not seed:  # what the daemon does at enqueue, outside the timed region
        for i, row in enumerate(rows):
            r = pb.SensorData(metadata=sensor_metadata(times[i]))
            r.struct.update(row)
            blobs.append(r.SerializeToString())

    latencies: list[float] = []
    async with common.client_for(spec) as client:

        async def one_call() -> None:
            if seed:
                await client.tabular_data_capture_upload(
                    list(rows),
                    PART,
                    "rdk:component:sensor",
                    "bench",
                    "Readings",
                    data_request_times=times,
                )
            else:
                await client.upload_readings(meta, blobs)

        await client.authenticate()
        await one_call()  # warm-up: connection, auth token, server-side first insert

        async def task(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                await one_call()
                latencies.append(time.perf_counter() - t)

        meter = common.CpuMeter({"client": None, "server": int(spec["server_pid"])})
        meter.start()
        await asyncio.gather(*(task(calls // tasks) for _ in range(tasks)))
        wall, cpu = meter.stop()

    done = len(latencies)
    return {
        "seconds": wall,
        "calls": done,
        "readings_per_s": done * BATCH / wall,
        "calls_per_s": done / wall,
        "p50_ms": 1000 * common.percentile(latencies, 50),
        "p99_ms": 1000 * common.percentile(latencies, 99),
        "cpu_client_pct": cpu["client"],
        "cpu_server_pct": cpu["server"],
        "rss_client_mib": peak_rss_bytes(os.getpid()) / common.MiB,
    }


async def _file(spec: dict[str, Any]) -> common.Figures:
    from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
    from edged.client import sensor_metadata, upload_metadata

    path = Path(spec["file"])
    size = path.stat().st_size
    async with common.client_for(spec) as client:
        await client.authenticate()
        meter = common.CpuMeter({"client": None, "server": int(spec["server_pid"])})
        meter.start()
        if spec["path"] == "file_upload_from_path":
            await client.file_upload_from_path(str(path), PART, tags=["bench"])
        else:
            now = dt.datetime.now(dt.UTC)
            meta = upload_metadata(
                PART,
                pb.DATA_TYPE_BINARY_SENSOR,
                component_type="rdk:component:camera",
                component_name="bench",
                method_name="ReadImage",
                file_extension=".bin",
            )
            await client.upload_binary_stream(meta, sensor_metadata((now, now)), path)
        wall, cpu = meter.stop()
    return {
        "seconds": wall,
        "size_mib": size / common.MiB,
        "mib_per_s": size / common.MiB / wall,
        "cpu_client_pct": cpu["client"],
        "cpu_server_pct": cpu["server"],
        "rss_client_mib": peak_rss_bytes(os.getpid()) / common.MiB,
    }


# -- driver --------------------------------------------------------------------------------


def _one_run(tmp: Path, key: KeyFile, spec: dict[str, Any]) -> common.Figures:
    """Fresh server + fresh client for one measured run; the server's data dir is removed."""
    data = Path(tempfile.mkdtemp(prefix="ingest-", dir=tmp))
    try:
        return common.run_client_worker("bench.wire", data, key, spec, log=tmp / "ingest.log")
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _make_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(common.MiB))


def run(quick: bool = False, runs: int | None = None) -> Path:
    calls, file_mib, n = QUICK if quick else FULL
    n = runs or n
    machine = common.machine_info()
    tabular: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp_s:
        tmp = Path(tmp_s)
        key = common.api_key(tmp)

        def measure(spec: dict[str, Any]) -> Callable[[int], common.Figures]:
            return lambda _run: _one_run(tmp, key, spec)

        for path in ("seed", "daemon"):
            for tasks in TASKS:
                spec = {"kind": "tabular", "path": path, "tasks": tasks, "calls": calls}
                label = f"wire tabular {path} x{tasks}"
                med, all_runs = common.run_n(n, measure(spec), label)
                tabular.append({"path": path, "tasks": tasks, **med, "runs": all_runs})

        blob = tmp / "payload.bin"
        _make_file(blob, file_mib)
        for path in ("file_upload_from_path", "upload_binary_stream"):
            spec = {"kind": "file", "path": path, "file": str(blob)}
            med, all_runs = common.run_n(n, measure(spec), f"wire {path}")
            files.append({"path": path, **med, "runs": all_runs})

    return common.report(
        NAME,
        {
            "runs_per_scenario": n,
            "settings": {
                "transport": "loopback 127.0.0.1, plaintext h2, API key auth",
                "readings_per_call": BATCH,
                "calls_per_tabular_run": calls,
                "file_mib": file_mib,
                "server": "edged ingest, SQLite synchronous=FULL, fsync per blob",
                "figures": "medians over runs, each key independently",
            },
            "tabular": tabular,
            "files": files,
        },
        machine,
        quick,
        [
            (
                f"wire: tabular ({BATCH} readings/call, {calls} calls/run, median of {n})",
                tabular,
                TABULAR_COLUMNS,
            ),
            (f"wire: files ({file_mib} MiB, median of {n})", files, FILE_COLUMNS),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    workers = {"tabular": _tabular, "file": _file}
    return common.module_main("python -m bench.wire", workers, run, argv)


if __name__ == "__main__":
    sys.exit(main())
