"""fleet: 50 simulated robots uploading at once into 1 and into 2 `edged ingest` replicas
sharing one PostgreSQL (pgserver, the tests' PgServer) and one S3 endpoint (moto, the
tests' s3_server), all on this machine.

Each robot is its own `UploadClient` (its own connection and API key; ten organisations)
and sends, all robots at once: tabular calls of 1000 readings (phase 1), then files
(phase 2). Robots are spread round-robin over the replicas (per-connection balancing:
what a plain TCP balancer gives gRPC). Figures per phase: readings/s or file MB/s over
the phase's wall time, p50/p99 ack latency per call, CPU% (100 = one core) of each
replica, of PostgreSQL (postmaster and its backends) and of moto, and the 1-minute load
average before the run. The load generator runs in this process, on the same 2 cores:
it competes with what it measures (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench import common
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import UploadClient, upload_metadata
from tests.support.credentials import KeyFile, make_key_file
from tests.support.pg import PgServer
from tests.support.processes import edged_cmd
from tests.support.s3server import S3Endpoint, s3_server

NAME = "fleet"
ROBOTS = 50
ORGS = 10
READINGS_PER_CALL = 1000


def _readings(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        r = pb.SensorData()
        r.struct.update({"x": i * 0.5, "y": -i, "ok": True, "label": f"r{i % 17}"})
        r.metadata.time_requested.FromNanoseconds(1_767_225_600_000_000_000 + i * 1_000_000)
        out.append(r.SerializeToString())
    return out


def _postgres_pids(data_dir: str) -> list[int]:
    """The postmaster whose command line names `data_dir`, and its children now (backends
    come with the replicas' connections: ask again at each measurement)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and "postgres" in cmd[0] and any(data_dir in part for part in cmd):
            return [proc.pid, *(c.pid for c in proc.children(recursive=True))]
    return []


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[pid] = t.user + t.system
    return out


def _cpu_since(before: dict[int, float], now: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots; a process new since `before` from 0 (one
    that exited in between is lost: PostgreSQL backends live as long as the pools)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())


async def _robot(
    port: int,
    key: KeyFile,
    *,
    calls: int,
    files: int,
    file_bytes: bytes,
    readings: list[bytes],
    phase: asyncio.Barrier,
    latencies: dict[str, list[float]],
) -> None:
    meta = upload_metadata(
        f"robot-{key.key_id[:8]}",
        pb.DATA_TYPE_TABULAR_SENSOR,
        component_type="rdk:component:sensor",
        component_name="imu",
        method_name="Readings",
    )
    fmeta = upload_metadata(
        f"robot-{key.key_id[:8]}", pb.DATA_TYPE_FILE, file_name="log", file_extension=".bin"
    )
    async with UploadClient(
        f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False, timeout=300
    ) as up:
        await up.upload_readings(meta, readings[:1])  # connect and authenticate first
        await phase.wait()
        for _ in range(calls):
            t0 = time.perf_counter()
            await up.upload_readings(meta, readings, item_id=uuid.uuid4().hex)
            latencies["tabular"].append(time.perf_counter() - t0)
        await phase.wait()  # tabular done
        await phase.wait()  # files: go
        for _ in range(files):
            t0 = time.perf_counter()
            await up.upload_file(fmeta, file_bytes, item_id=uuid.uuid4().hex)
            latencies["file"].append(time.perf_counter() - t0)
        await phase.wait()


async def _fleet(
    ports: list[int],
    keys: list[KeyFile],
    meters: dict[str, Callable[[], list[int]]],
    *,
    calls: int,
    files: int,
    file_size: int,
) -> list[common.Figures]:
    readings = _readings(READINGS_PER_CALL)
    file_bytes = os.urandom(file_size)
    latencies: dict[str, list[float]] = {"tabular": [], "file": []}
    phase = asyncio.Barrier(len(keys) + 1)
    robots = [
        asyncio.create_task(
            _robot(
                ports[i % len(ports)],
                key,
                calls=calls,
                files=files,
                file_bytes=file_bytes,
                readings=readings,
                phase=phase,
                latencies=latencies,
            )
        )
        for i, key in enumerate(keys)
    ]
    rows: list[common.Figures] = []
    try:
        for kind in ("tabular", "file"):
            cpu0 = {name: _cpu_by_pid(pids()) for name, pids in meters.items()}
            here = common.CpuMeter({"client": None})
            await _all_at(phase, robots, 300)  # everyone ready: go
            t0 = time.perf_counter()
            here.start()
            await _all_at(phase, robots, 900)  # everyone done
            wall = time.perf_counter() - t0
            _, client = here.stop()
            row: common.Figures = {"wall_s": wall, "cpu_client_pct": client["client"]}
            for name, pids in meters.items():
                spent = _cpu_since(cpu0[name], _cpu_by_pid(pids()))
                row[f"cpu_{name}_pct"] = 100 * spent / wall
            lat = latencies[kind]
            row["p50_ms"] = 1000 * common.percentile(lat, 50)
            row["p99_ms"] = 1000 * common.percentile(lat, 99)
            row["calls"] = len(lat)
            if kind == "tabular":
                row["readings_per_s"] = len(lat) * READINGS_PER_CALL / wall
            else:
                row["mb_per_s"] = len(lat) * file_size / wall / 1e6
            rows.append(row)
        await asyncio.gather(*robots)
    finally:
        for task in robots:
            task.cancel()
        await asyncio.gather(*robots, return_exceptions=True)
    return rows


async def _all_at(phase: asyncio.Barrier, robots: list[asyncio.Task[None]], limit: float) -> None:
    """Wait at the barrier with the robots; a robot that fails first is raised at once."""
    waiter = asyncio.ensure_future(phase.wait())
    done, _ = await asyncio.wait([waiter, *robots], timeout=limit, return_when="FIRST_COMPLETED")
    if waiter in done:
        return
    waiter.cancel()
    for task in done:
        task.result()
    raise TimeoutError(f"the fleet did not reach the barrier within {limit:g}s")


@contextmanager
def _services() -> Iterator[tuple[PgServer, S3Endpoint]]:
    with ExitStack() as stack:
        pg = PgServer()
        stack.callback(pg.stop)
        s3 = stack.enter_context(s3_server())
        yield pg, s3


def _create_bucket(s3: S3Endpoint, name: str) -> None:
    async def go() -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "s3", endpoint_url=s3.url, region_name=s3.env["AWS_REGION"]
        ) as c:
            await c.create_bucket(Bucket=name)

    asyncio.run(go())


def _scenario(
    pg: PgServer, s3: S3Endpoint, tmp: Path, replicas: int, *, calls: int, files: int, size: int
) -> list[dict[str, Any]]:
    db = pg.create_database()
    url = pg.url(db)
    bucket = f"fleet-{uuid.uuid4().hex[:8]}"
    _create_bucket(s3, bucket)
    keydir = tmp / f"keys-{replicas}"
    keydir.mkdir()
    keys = [make_key_file(keydir) for _ in range(ROBOTS)]
    subprocess.run(edged_cmd("ingest", "migrate", "--database", url), check=True, timeout=120)
    flags = ["--database", url, "--no-migrate", "--blobs", f"s3://{bucket}/fleet"]
    flags += ["--s3-endpoint", s3.url]
    for i, key in enumerate(keys):
        flags += ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]
        flags += ["--org-id", f"org-{i % ORGS}"]
    try:
        with ExitStack() as stack:
            servers = [
                stack.enter_context(common.ingest_server(tmp / f"replica-{replicas}-{r}", flags))
                for r in range(replicas)
            ]
            meters: dict[str, Callable[[], list[int]]] = {
                f"replica{r}": functools.partial(list, [proc.pid])
                for r, (proc, _) in enumerate(servers)
            }
            meters["postgres"] = functools.partial(_postgres_pids, str(pg._dir))
            meters["moto"] = functools.partial(list, [s3.pid])
            load = os.getloadavg()[0]
            rows = asyncio.run(
                _fleet(
                    [port for _, port in servers], keys, meters, calls=calls, files=files,
                    file_size=size,
                )
            )  # fmt: skip
    finally:
        pg.drop_database(db)
    out: list[dict[str, Any]] = []
    for kind, row in zip(("tabular", "file"), rows, strict=True):
        out.append({"scenario": f"{replicas} replica(s), {kind}", "load_avg_1m": load, **row})
    return out


def run(quick: bool = False, runs: int | None = None) -> Path:
    """One run per scenario (the fleet is the repetition: 50 robots x calls)."""
    del runs
    calls, files, size = (2, 1, 256 * 1024) if quick else (10, 2, common.MiB)
    machine = common.machine_info()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edged-bench-fleet-") as tmp, _services() as (pg, s3):
        for name, value in s3.env.items():
            os.environ[name] = value  # the replicas' S3 credentials (AWS_* environment)
        for replicas in (1, 2):
            rows += _scenario(pg, s3, Path(tmp), replicas, calls=calls, files=files, size=size)
            print(f"fleet: {replicas} replica(s) done", file=sys.stderr, flush=True)
    columns = [
        ("scenario", "scenario", ""),
        ("readings_per_s", "readings/s", ",.0f"),
        ("mb_per_s", "files MB/s", ".1f"),
        ("p50_ms", "p50 ack ms", ".0f"),
        ("p99_ms", "p99 ack ms", ".0f"),
        ("cpu_replica0_pct", "CPU% replica 0", ".0f"),
        ("cpu_replica1_pct", "CPU% replica 1", ".0f"),
        ("cpu_postgres_pct", "CPU% PostgreSQL", ".0f"),
        ("cpu_moto_pct", "CPU% moto", ".0f"),
        ("cpu_client_pct", "CPU% robots", ".0f"),
        ("load_avg_1m", "load 1m", ".1f"),
    ]
    print(
        f"\nfleet ({ROBOTS} robots, {ORGS} orgs; {calls} x {READINGS_PER_CALL} readings and"
        f" {files} x {size // 1024} KiB file(s) per robot)"
    )
    print(common.format_table(rows, columns))
    spec = {"robots": ROBOTS, "orgs": ORGS, "calls_per_robot": calls}
    spec |= {"readings_per_call": READINGS_PER_CALL, "files_per_robot": files, "file_bytes": size}
    return common.write_result(NAME + ("-quick" if quick else ""), {**spec, "rows": rows}, machine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, help="ignored: one run per scenario")
    args = parser.parse_args(argv)
    run(args.quick, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
