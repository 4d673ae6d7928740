"""sources: capture files from disk into the outbox: throughput and detection latency.

Every measurement runs in a fresh child (`python -m bench.sources --worker SPEC`), so CPU%
and peak RSS (VmHWM) are the child's own; the outbox keeps synchronous=FULL.

Scenarios:
- scan: M capture files of 500 tabular readings each (5-number struct + timestamps),
  written once with `CaptureWriter.write_tabular` and copied afresh for every run, are
  committed into a fresh outbox by one timed `CaptureSource.scan_once()` (read, commit
  with claim and offset, delete, forget the claim);
- latency: `CaptureSource.run()` watches an empty capture directory while a writer
  thread in the same process writes 100-reading capture files steadily (5 groups of
  20 readings spread over each 1/RATE s period) and closes one every 1/RATE s.
  Latency = from `CaptureWriter.rotate()` returning (fsync'd, renamed to `.capture`)
  to the commit of the `enqueue_readings` call that carries the file's claim. Same
  process on purpose: one monotonic clock, and the commit time is taken at the commit
  itself (a wrapper around the outbox method) instead of by polling the database.
  Run twice: on the machine as it is, and under load, with HOGS busy-looping child
  process(es) competing for the CPU for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common
from tests.support.processes import peak_rss_bytes

NAME = "sources"
PART = "bench-part"
READINGS_PER_FILE = 500
LATENCY_READINGS_PER_FILE = 100
RATE = 20.0  # files closed per second in the latency scenario
HOGS = 1  # busy-looping processes of the "under load" latency run
SLICES = 5  # each latency file is written in 5 groups of readings spread over its period

# (scan files, latency files, runs per scenario)
FULL = (2000, 200, 3)
QUICK = (300, 60, 3)

SCAN_COLUMNS: list[common.Column] = [
    ("files", "files", ",d"),
    ("readings", "readings", ",d"),
    ("files_per_s", "files/s", ",.0f"),
    ("readings_per_s", "readings/s", ",.0f"),
    ("mib_per_s", "MiB/s", ".1f"),
    ("seconds", "s", ".2f"),
    *common.CPU_RSS,
]
LATENCY_COLUMNS: list[common.Column] = [
    ("load", "load", ""),
    ("files", "files", ",d"),
    ("rate", "files/s", ".0f"),
    ("p50_ms", "p50 ms", ".1f"),
    ("p90_ms", "p90 ms", ".1f"),
    ("p99_ms", "p99 ms", ".1f"),
    ("max_ms", "max ms", ".1f"),
    *common.CPU_RSS,
]


def _capture_metadata() -> Any:
    from edged._proto.app.datasync.v1 import data_sync_pb2 as pb

    return pb.DataCaptureMetadata(
        component_type="rdk:component:sensor",
        component_name="bench",
        method_name="Readings",
        type=pb.DATA_TYPE_TABULAR_SENSOR,
    )


def _row(i: int) -> dict[str, float]:
    return {
        "temperature_c": 20.0 + (i % 100) / 7,
        "humidity_pct": 40.0 + (i % 37) / 3,
        "pressure_hpa": 1013.25 - (i % 11) / 9,
        "battery_v": 3.7 - (i % 13) / 1000,
        "seq": float(i),
    }


def _write_files(root: Path, files: int, per_file: int) -> list[Path]:
    """`files` capture files of `per_file` tabular readings each, written as a robot does."""
    from edged.capture import CaptureWriter

    base = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    with CaptureWriter(
        root, _capture_metadata(), max_file_bytes=1 << 30, max_file_readings=per_file
    ) as writer:
        for i in range(files * per_file):
            t = base + dt.timedelta(milliseconds=50 * i)
            writer.write_tabular(
                _row(i), time_requested=t, time_received=t + dt.timedelta(microseconds=1234)
            )
    return list(writer.closed_paths)


# -- workers (each in its own process) ------------------------------------------------------


async def _open_source(spec: dict[str, Any]) -> Any:
    from edged.daemon.config import OutboxConfig
    from edged.daemon.outbox import Outbox
    from edged.daemon.sources.base import SourceContext
    from edged.daemon.sources.capture import CaptureConfig, CaptureSource

    state = Path(spec["state_dir"])
    box = await Outbox.open(state, OutboxConfig(min_free_disk=0))
    ctx = SourceContext(PART, box, state)
    return CaptureSource(CaptureConfig(path=Path(spec["root"])), ctx)


async def _scan(spec: dict[str, Any]) -> common.Figures:
    source = await _open_source(spec)
    box = source.ctx.outbox
    files, readings = int(spec["files"]), int(spec["readings"])
    size = sum(p.stat().st_size for p in Path(spec["root"]).rglob("*.capture"))
    meter = common.CpuMeter({"self": None})
    meter.start()
    await source.scan_once()
    wall, cpu = meter.stop()
    stats = await box.stats()
    await box.close()
    if source.stats.files_done != files or stats.readings != readings:
        raise RuntimeError(
            f"scan committed {source.stats.files_done}/{files} files,"
            f" {stats.readings}/{readings} readings"
        )
    left = list(Path(spec["root"]).rglob("*.capture"))
    if left:
        raise RuntimeError(f"{len(left)} capture files left after the scan")
    return {
        "seconds": wall,
        "files_per_s": files / wall,
        "readings_per_s": readings / wall,
        "mib_per_s": size / common.MiB / wall,
        "cpu_pct": cpu["self"],
        "rss_mib": peak_rss_bytes(os.getpid()) / common.MiB,
    }


def _writer_thread(
    root: Path, files: int, per_file: int, rate: float, closed: dict[str, float]
) -> None:
    """A steady writer: each file gets its readings in SLICES groups spread over 1/rate s
    and is closed at the end of its period (fixed schedule); each close time is noted."""
    from edged.capture import CaptureWriter

    writer = CaptureWriter(
        root, _capture_metadata(), max_file_bytes=1 << 30, max_file_readings=per_file
    )
    start = time.monotonic()
    seq = 0
    for i in range(files):
        for k in range(SLICES):
            delay = start + (i + k / SLICES) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = dt.datetime.now(dt.UTC)
            for _ in range(per_file // SLICES):
                writer.write_tabular(_row(seq), time_requested=now, time_received=now)
                seq += 1
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        path = writer.rotate()
        closed[str(path and path.name)] = time.monotonic()
    writer.close()


async def _latency(spec: dict[str, Any]) -> common.Figures:
    from edged.daemon.outbox import Claim

    root = Path(spec["root"])
    root.mkdir(parents=True, exist_ok=True)
    files, rate = int(spec["files"]), float(spec["rate"])
    source = await _open_source(spec)
    box = source.ctx.outbox
    committed: dict[str, float] = {}
    closed: dict[str, float] = {}
    all_in = asyncio.Event()

    enqueue = box.enqueue_readings

    async def timed_enqueue(metadata: bytes, readings: Sequence[bytes], **kw: Any) -> None:
        """The outbox's own call, whatever its keywords; then the claim's commit time."""
        await enqueue(metadata, readings, **kw)
        claim: Claim | None = kw.get("claim")
        if claim is not None:  # the file's last chunk: every reading is committed now
            committed[Path(claim.path).name] = time.monotonic()
            if len(committed) >= files:
                all_in.set()

    box.enqueue_readings = timed_enqueue
    ready = asyncio.Event()
    scan = source.scan_once

    async def first_scan() -> None:
        await scan()
        ready.set()

    source.scan_once = first_scan
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(ready.wait(), 30)
    await asyncio.sleep(0.2)  # the watcher thread is running by now
    meter = common.CpuMeter({"self": None})
    meter.start()
    writer = threading.Thread(
        target=_writer_thread,
        args=(root, files, int(spec["per_file"]), rate, closed),
        daemon=True,
    )
    writer.start()
    timeout = files / rate + 30
    with contextlib.suppress(TimeoutError):  # missing files are reported below
        await asyncio.wait_for(all_in.wait(), timeout)
    wall, cpu = meter.stop()
    await asyncio.to_thread(writer.join, 10)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await box.close()
    lat = [1000 * (committed[name] - t) for name, t in closed.items() if name in committed]
    missing = files - len(lat)
    if missing:
        raise RuntimeError(f"{missing} of {files} files not committed within {timeout:.0f}s")
    return {
        "seconds": wall,
        "p50_ms": common.percentile(lat, 50),
        "p90_ms": common.percentile(lat, 90),
        "p99_ms": common.percentile(lat, 99),
        "max_ms": max(lat),
        "min_ms": min(lat),
        "cpu_pct": cpu["self"],
        "rss_mib": peak_rss_bytes(os.getpid()) / common.MiB,
    }


# -- driver ---------------------------------------------------------------------------------


def _scan_run(tmp: Path, master: Path, files: int) -> common.Figures:
    root, state = tmp / "scan-root", tmp / "scan-state"
    shutil.copytree(master, root)
    try:
        spec = {
            "kind": "scan",
            "root": str(root),
            "state_dir": str(state),
            "files": files,
            "readings": files * READINGS_PER_FILE,
        }
        return common.run_worker("bench.sources", spec, timeout_s=900)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def _hogs(n: int) -> Any:
    """`n` child processes spinning on the CPU while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _latency_run(tmp: Path, files: int, hogs: int = 0) -> common.Figures:
    root, state = tmp / "watch-root", tmp / "watch-state"
    try:
        spec = {
            "kind": "latency",
            "root": str(root),
            "state_dir": str(state),
            "files": files,
            "per_file": LATENCY_READINGS_PER_FILE,
            "rate": RATE,
        }
        with _hogs(hogs):
            return common.run_worker("bench.sources", spec, timeout_s=files / RATE + 120)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def run(quick: bool = False, runs: int | None = None) -> Path:
    scan_files, latency_files, reps = QUICK if quick else FULL
    reps = runs or reps
    machine = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="edged-bench-") as tmp_s:
        tmp = Path(tmp_s)
        master = tmp / "master"
        t0 = time.perf_counter()
        _write_files(master, scan_files, READINGS_PER_FILE)
        write_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in master.rglob("*.capture"))
        print(
            f"  sources: wrote {scan_files} capture files ({size / common.MiB:.1f} MiB)"
            f" in {write_s:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        med, scan_runs = common.run_n(
            reps, lambda _i: _scan_run(tmp, master, scan_files), "sources scan"
        )
        scan = {
            "files": scan_files,
            "readings": scan_files * READINGS_PER_FILE,
            "file_bytes": size,
            **med,
            "runs": scan_runs,
        }
        latency = []
        for hogs in (0, HOGS):

            def once(_i: int, hogs: int = hogs) -> common.Figures:
                return _latency_run(tmp, latency_files, hogs)

            med, lat_runs = common.run_n(reps, once, f"sources latency, {hogs} CPU hogs")
            load = f"{hogs} CPU hog(s)" if hogs else "as is"
            latency.append(
                {"load": load, "files": latency_files, "rate": RATE, **med, "runs": lat_runs}
            )

    return common.report(
        NAME,
        {
            "runs_per_scenario": reps,
            "settings": {
                "reading": "tabular SensorData: struct of 5 doubles + both timestamps",
                "scan_readings_per_file": READINGS_PER_FILE,
                "latency_readings_per_file": LATENCY_READINGS_PER_FILE,
                "latency_rate_files_per_s": RATE,
                "latency": "CaptureWriter.rotate() returned -> enqueue with claim committed",
                "outbox": "SQLite WAL, synchronous=FULL",
                "figures": "medians over runs, each key independently",
            },
            "scan": scan,
            "latency": latency,
        },
        machine,
        quick,
        [
            (
                f"sources: capture scan ({READINGS_PER_FILE} readings/file, median of {reps})",
                [scan],
                SCAN_COLUMNS,
            ),
            (
                f"sources: detection latency (close -> committed, median of {reps})",
                latency,
                LATENCY_COLUMNS,
            ),
        ],
    )


def main(argv: list[str] | None = None) -> int:
    workers = {"scan": _scan, "latency": _latency}
    return common.module_main("python -m bench.sources", workers, run, argv)


if __name__ == "__main__":
    sys.exit(main())
