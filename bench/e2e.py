"""e2e: a capture writer → `edged run` → loopback `edged ingest`, all real processes.

Scenarios (each figure is the median of runs; CPU% and peak RSS are per process):
- fixed load: a writer thread in this process closes a 1000-reading capture file every
  0.1 s (10k readings/s offered) for T s; latency = ingest `received_at_ns` of a file's
  last reading minus the moment its writer closed it (same machine, same clock);
- saturation: N readings already on disk when edged starts; readings/s until the last
  one is stored;
- per call: the same readings sent one per `tabular_data_capture_upload` call (the seed
  client's way), for the ratio edged / per-call;
- file: one large file in a `files` source; MB/s from start to ack, RSS of both sides;
- backlog: N readings committed to the outbox while the server is down, then edged is
  restarted with the server up: time to READY=1 (sd_notify), RSS, drain rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import common
from edged.capture import CaptureWriter
from edged.ingest.values import DATA_SQL, register_sql_functions
from tests.support.credentials import KeyFile
from tests.support.ingest_db import ingest_count
from tests.support.processes import peak_rss_bytes, stop_process
from tests.support.waiting import wait_for

NAME = "e2e"
QUICK = {"load_s": 6.0, "saturation": 100_000, "file_mib": 200, "backlog": 100_000, "runs": 1}
FULL = {"load_s": 20.0, "saturation": 500_000, "file_mib": 1024, "backlog": 1_000_000, "runs": 3}


def _config(tmp: Path, port: int, key: KeyFile, sources: str) -> Path:
    """Retries start at 50 ms: a bench run measures delivery, not the default backoff."""
    extra = "upload: {backoff: {initial: 50ms, max: 1s}}\n"
    return common.edged_config(tmp, port, key, sources, extra)


@contextlib.contextmanager
def _edged(cfg: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    log = open(cfg.with_suffix(".log"), "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "edged", "run", "-c", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=common.REPO,
        env={**os.environ, **(env or {})},
    )
    try:
        yield proc
    finally:
        stop_process(proc)
        log.close()


def _write_backlog(root: Path, n: int, per_file: int = 1000) -> None:
    now = datetime.now(UTC)
    for first in range(0, n, per_file):
        with CaptureWriter(root, common.TABULAR_META) as w:
            for seq in range(first, min(n, first + per_file)):
                w.write_tabular({"seq": seq, "v": 1.5}, time_requested=now, time_received=now)


# -- scenarios -----------------------------------------------------------------------------


def fixed_load(
    tmp: Path, seconds: float, rate: int = 10_000, per_file: int = 1000
) -> common.Figures:
    key = common.api_key(tmp)
    capture = tmp / "capture"
    capture.mkdir()
    closes: list[tuple[int, int]] = []  # (last seq of a file, close time ns)
    with common.ingest_server(tmp / "ingest", key.ingest_args()) as (ing, port):
        cfg = _config(tmp, port, key, f"  - {{kind: capture, path: {capture}}}")
        with _edged(cfg) as proc:
            wait_for("status socket", (tmp / "edged.sock").exists, 30)
            meter = common.CpuMeter({"edged": proc.pid, "ingest": ing.pid})
            meter.start()

            def writer() -> None:
                w = CaptureWriter(capture, common.TABULAR_META, max_file_bytes=1 << 30)
                seq, period, start = 0, per_file / rate, time.monotonic()
                for n in range(int(seconds * rate / per_file)):
                    now = datetime.now(UTC)
                    for _ in range(per_file):
                        w.write_tabular(
                            {"seq": seq, "v": 1.5}, time_requested=now, time_received=now
                        )
                        seq += 1
                    w.rotate()
                    closes.append((seq - 1, time.time_ns()))
                    time.sleep(max(0.0, start + (n + 1) * period - time.monotonic()))
                w.close()

            t = threading.Thread(target=writer)
            t.start()
            t.join()
            total = closes[-1][0] + 1
            wait_for("all readings stored", lambda: ingest_count(tmp / "ingest") >= total, 120)
            wall, cpu = meter.stop()
            rss_edged, rss_ingest = peak_rss_bytes(proc.pid), peak_rss_bytes(ing.pid)
    db = sqlite3.connect(f"file:{tmp / 'ingest' / 'ingest.sqlite3'}?mode=ro", uri=True)
    register_sql_functions(db)  # DATA_SQL: rows may hold the Struct's bytes alone
    received = dict(
        db.execute(
            f"SELECT CAST(json_extract({DATA_SQL}, '$.seq') AS INTEGER), received_at_ns"
            " FROM readings"
        ).fetchall()
    )
    db.close()
    lat = [(received[last] - closed) / 1e6 for last, closed in closes]
    return {
        "offered_readings_per_s": rate,
        "readings": total,
        "readings_per_s": total / wall,
        "latency_p50_ms": common.percentile(lat, 50),
        "latency_p99_ms": common.percentile(lat, 99),
        "latency_max_ms": max(lat),
        "cpu_edged": cpu["edged"],
        "cpu_ingest": cpu["ingest"],
        "rss_edged_mib": rss_edged / common.MiB,
        "rss_ingest_mib": rss_ingest / common.MiB,
    }


def saturation(tmp: Path, n: int) -> common.Figures:
    key = common.api_key(tmp)
    _write_backlog(tmp / "capture", n)
    with common.ingest_server(tmp / "ingest", key.ingest_args()) as (ing, port):
        cfg = _config(tmp, port, key, f"  - {{kind: capture, path: {tmp / 'capture'}}}")
        t0 = time.monotonic()
        with _edged(cfg) as proc:
            meter = common.CpuMeter({"edged": proc.pid, "ingest": ing.pid})
            meter.start()
            t1 = wait_for("all stored", lambda: ingest_count(tmp / "ingest") >= n, 600, 0.2)
            _, cpu = meter.stop()
            rss = peak_rss_bytes(proc.pid)
    return {
        "readings": n,
        "readings_per_s": n / (t1 - t0),
        "cpu_edged": cpu["edged"],
        "cpu_ingest": cpu["ingest"],
        "rss_edged_mib": rss / common.MiB,
    }


def per_call(tmp: Path, seconds: float = 3.0) -> common.Figures:
    key = common.api_key(tmp)
    with common.ingest_server(tmp / "ingest", key.ingest_args()) as (_, port):
        from edged.client import UploadClient

        async def go() -> int:
            async with UploadClient(
                f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
            ) as c:
                n, end = 0, time.monotonic() + seconds
                now = datetime.now(UTC)
                while time.monotonic() < end:
                    await c.tabular_data_capture_upload(
                        [{"seq": n, "v": 1.5}],
                        "bench",
                        "rdk:component:sensor",
                        "bench",
                        "Readings",
                        data_request_times=[(now, now)],
                    )
                    n += 1
                return n

        t0 = time.monotonic()
        n = asyncio.run(go())
        wall = time.monotonic() - t0
    return {"readings": n, "readings_per_s": n / wall}


def file_drain(tmp: Path, mib: int) -> common.Figures:
    key = common.api_key(tmp)
    drop = tmp / "drop"
    drop.mkdir()
    big = drop / "big.bin"
    with open(big, "wb") as f:
        block = os.urandom(common.MiB)
        for _ in range(mib):
            f.write(block)
    with common.ingest_server(tmp / "ingest", key.ingest_args()) as (ing, port):
        cfg = _config(tmp, port, key, f"  - {{kind: files, path: {drop}, settle: 0s}}")
        t0 = time.monotonic()
        with _edged(cfg) as proc:
            meter = common.CpuMeter({"edged": proc.pid, "ingest": ing.pid})
            meter.start()
            t1 = wait_for("file acked and deleted", lambda: not big.exists(), 600, 0.1)
            _, cpu = meter.stop()
            rss_e, rss_i = peak_rss_bytes(proc.pid), peak_rss_bytes(ing.pid)
    return {
        "mib": mib,
        "mib_per_s": mib / (t1 - t0),
        "cpu_edged": cpu["edged"],
        "cpu_ingest": cpu["ingest"],
        "rss_edged_mib": rss_e / common.MiB,
        "rss_ingest_mib": rss_i / common.MiB,
    }


def backlog(tmp: Path, n: int) -> common.Figures:
    key = common.api_key(tmp)
    _write_backlog(tmp / "capture", n)
    with socket.socket() as s:  # a port nobody listens on: the server is "down"
        s.bind(("127.0.0.1", 0))
        down = s.getsockname()[1]
    src = f"  - {{kind: capture, path: {tmp / 'capture'}}}"
    cfg = _config(tmp, down, key, src)
    with _edged(cfg):
        wait_for(
            "all committed to the outbox",
            lambda: not any((tmp / "capture").rglob("*.capture")),
            900,
            0.2,
        )
    with common.ingest_server(tmp / "ingest", key.ingest_args()) as (_, port):
        cfg = _config(tmp, port, key, src)
        notify = tmp / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(str(notify))
            listener.settimeout(120)
            t0 = time.monotonic()
            with _edged(cfg, {"NOTIFY_SOCKET": str(notify)}) as proc:
                while b"READY=1" not in listener.recv(4096):
                    pass
                ready = time.monotonic() - t0
                t1 = time.monotonic()
                t2 = wait_for("drained", lambda: ingest_count(tmp / "ingest") >= n, 900, 0.2)
                rss = peak_rss_bytes(proc.pid)
                rss_now = psutil.Process(proc.pid).memory_info().rss
    return {
        "readings": n,
        "ready_s": ready,
        "drain_readings_per_s": n / (t2 - t1),
        "rss_edged_mib": rss / common.MiB,
        "rss_edged_end_mib": rss_now / common.MiB,
    }


# -- driver --------------------------------------------------------------------------------


def _in_tmp(fn: Any, *args: Any) -> common.Figures:
    with tempfile.TemporaryDirectory(prefix="edged-e2e-") as d:
        result: common.Figures = fn(Path(d), *args)
        return result


def run(quick: bool = False, runs: int | None = None) -> Path:
    p = QUICK if quick else FULL
    reps = runs or int(p["runs"])
    machine = common.machine_info()
    load, load_runs = common.run_n(
        reps, lambda _: _in_tmp(fixed_load, p["load_s"]), "e2e fixed load"
    )
    sat, sat_runs = common.run_n(
        reps, lambda _: _in_tmp(saturation, int(p["saturation"])), "e2e saturation"
    )
    call, call_runs = common.run_n(reps, lambda _: _in_tmp(per_call), "e2e per-call")
    big, big_runs = common.run_n(1, lambda _: _in_tmp(file_drain, int(p["file_mib"])), "e2e file")
    back, back_runs = common.run_n(1, lambda _: _in_tmp(backlog, int(p["backlog"])), "e2e backlog")
    ratio = sat["readings_per_s"] / call["readings_per_s"]
    print("\n## e2e: capture writer → edged → edged ingest\n")
    print(
        common.format_table(
            [load],
            [
                ("offered_readings_per_s", "offered/s", ",.0f"),
                ("readings_per_s", "delivered/s", ",.0f"),
                ("latency_p50_ms", "p50 ms", ".0f"),
                ("latency_p99_ms", "p99 ms", ".0f"),
                ("cpu_edged", "CPU% edged", ".0f"),
                ("cpu_ingest", "CPU% ingest", ".0f"),
                ("rss_edged_mib", "RSS edged MiB", ".1f"),
                ("rss_ingest_mib", "RSS ingest MiB", ".1f"),
            ],
        )
    )
    print()
    print(
        common.format_table(
            [{**sat, "per_call": call["readings_per_s"], "ratio": ratio}],
            [
                ("readings", "readings", ",.0f"),
                ("readings_per_s", "edged readings/s", ",.0f"),
                ("per_call", "one per call/s", ",.0f"),
                ("ratio", "ratio", ".0f"),
                ("cpu_edged", "CPU% edged", ".0f"),
                ("rss_edged_mib", "RSS edged MiB", ".1f"),
            ],
        )
    )
    print()
    print(
        common.format_table(
            [big],
            [
                ("mib", "MiB", ",.0f"),
                ("mib_per_s", "MiB/s", ".1f"),
                ("cpu_edged", "CPU% edged", ".0f"),
                ("rss_edged_mib", "RSS edged MiB", ".1f"),
                ("rss_ingest_mib", "RSS ingest MiB", ".1f"),
            ],
        )
    )
    print()
    print(
        common.format_table(
            [back],
            [
                ("readings", "backlog", ",.0f"),
                ("ready_s", "READY s", ".2f"),
                ("drain_readings_per_s", "drain readings/s", ",.0f"),
                ("rss_edged_mib", "RSS edged MiB", ".1f"),
            ],
        )
    )
    return common.write_result(
        NAME,
        {
            "fixed_load": {**load, "runs": load_runs},
            "saturation": {**sat, "runs": sat_runs},
            "per_call": {**call, "runs": call_runs},
            "ratio_edged_per_call": ratio,
            "file": {**big, "runs": big_runs},
            "backlog": {**back, "runs": back_runs},
        },
        machine,
        quick=quick,
    )


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv).name))
