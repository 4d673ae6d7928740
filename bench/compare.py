"""compare: the stock seed client (viam-sdk) and edged against one acknowledging server.

`python -m bench compare` (`make bench-compare`; `--quick`: 50 files, 100 MB file). One
process tree, one run: an acknowledging-only DataSync server (`bench.acksrv`, stores
nothing) is started once and both clients upload to it:

- tabular: edged one-shot (`edged run --until-empty`) over 200 capture files x 1000
  readings, from process start to exit; the seed client (`.venv-interop`, stock viam-sdk,
  `bench/seed_client.py`) sends the same readings in 1000-reading
  `tabular_data_capture_upload` calls. edged is also run once over an empty capture
  directory, and its start-up (wall and CPU) is subtracted for the "net" figures.
- file: one 500 MB file, edged one-shot with a `files` source vs. the seed's
  `file_upload_from_path`.
- ingest: edged's `UploadClient.upload_readings` (4 tasks, 1000 readings per call) into
  a durable `edged ingest` (synchronous=FULL); readings/s stored and counted back.

CPU of every child comes from wait4() (user+system), its peak RSS from VmHWM sampled
while it runs; psutil measures the long-running ingest server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import common
from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter
from tests.support.credentials import KeyFile
from tests.support.ingest_db import ingest_count
from tests.support.processes import peak_rss_bytes, read_line, stop_process

NAME = "compare"
MB = 1_000_000
INTEROP_PYTHON = common.REPO / ".venv-interop" / "bin" / "python"
SEED_SCRIPT = common.REPO / "bench" / "seed_client.py"
FULL = {"files": 200, "per_file": 1000, "file_mb": 500, "ingest_calls": 200, "runs": 3}
QUICK = {"files": 50, "per_file": 1000, "file_mb": 100, "ingest_calls": 50, "runs": 1}
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# Children may cache bytecode as an installed edged (and the pip-installed seed) does:
# without it every start would compile edged's modules again (~0.6 s of CPU).
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def reading(seq: int) -> dict[str, Any]:
    """The same struct bench/seed_client.py sends (that file cannot import this one)."""
    return {"seq": float(seq), "x": 1.5, "y": -2.25, "temp_c": 21.5, "humidity": 40.0}


# -- processes -------------------------------------------------------------------------


def _peak_rss(pid: int, done: threading.Event, peak: list[int]) -> None:
    """Sample the child's VmHWM until it exits. (wait4's ru_maxrss would not do: Linux
    carries the parent's high-water mark over the fork and exec into the child's.)"""
    while not done.wait(0.02):
        with contextlib.suppress(OSError, RuntimeError):  # gone, or a zombie
            peak[0] = max(peak[0], peak_rss_bytes(pid))


def run_measured(cmd: Sequence[str], log: Path, timeout_s: float = 900) -> dict[str, Any]:
    """Run a child to its exit: wall s, CPU s (user+sys) from wait4, peak RSS (VmHWM
    sampled while it runs), stdout."""
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=common.REPO, env=_ENV)
        assert proc.stdout is not None
        done, peak = threading.Event(), [0]
        sampler = threading.Thread(target=_peak_rss, args=(proc.pid, done, peak), daemon=True)
        sampler.start()
        deadline = time.monotonic() + timeout_s
        out = b""
        while chunk := proc.stdout.read(65536):
            out += chunk
            if time.monotonic() > deadline:
                proc.kill()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}; see {log}")
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "rss_mib": peak[0] / common.MiB,
        "stdout": out.decode(),
    }


@contextlib.contextmanager
def ack_server(tmp: Path, key: KeyFile) -> Iterator[tuple[int, dict[str, int]]]:
    """`bench.acksrv` as a child; yields (port, totals filled in at exit)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.acksrv", *key.ingest_args()],
        stdout=subprocess.PIPE,
        stderr=open(tmp / "acksrv.log", "wb"),  # noqa: SIM115 - the child owns it
        cwd=common.REPO,
    )
    totals: dict[str, int] = {}
    try:
        port = int(read_line(proc, 30).decode().rsplit(":", 1)[1])
        yield port, totals
    finally:
        stop_process(proc)
        assert proc.stdout is not None
        rest = proc.stdout.read().decode().strip().splitlines()
        proc.stdout.close()
        if rest:
            totals.update(json.loads(rest[-1]))


def _edged_once(run_dir: Path, port: int, key: KeyFile, source: str) -> common.Figures:
    cfg = common.edged_config(run_dir, port, key, f"  - {source}")
    cmd = [sys.executable, "-m", "edged", "run", "--until-empty", "-c", str(cfg)]
    r = run_measured(cmd, run_dir / "edged.log")
    return {k: v for k, v in r.items() if k != "stdout"}


def _seed(args: Sequence[str], log: Path) -> common.Figures:
    r = run_measured([str(INTEROP_PYTHON), str(SEED_SCRIPT), *args], log)
    inner = json.loads(r["stdout"].strip().splitlines()[-1])
    return {"wall_s": inner["wall_s"], "cpu_s": inner["cpu_s"], "rss_mib": r["rss_mib"]}


# -- scenarios -------------------------------------------------------------------------


def write_capture_files(root: Path, files: int, per_file: int) -> None:
    seq = 0
    for _ in range(files):
        with CaptureWriter(root, common.TABULAR_META, max_file_bytes=1 << 30) as w:
            for _ in range(per_file):
                t = T0 + timedelta(milliseconds=seq)
                w.write_tabular(reading(seq), time_requested=t, time_received=t)
                seq += 1


def tabular(tmp: Path, port: int, key: KeyFile, p: dict[str, int], i: int) -> common.Figures:
    n = p["files"] * p["per_file"]
    empty = tmp / f"empty-{i}"
    (empty / "capture").mkdir(parents=True)
    base = _edged_once(empty, port, key, f"{{kind: capture, path: {empty}/capture}}")
    run_dir = tmp / f"tab-{i}"
    write_capture_files(run_dir / "capture", p["files"], p["per_file"])
    src = f"{{kind: capture, path: {run_dir}/capture}}"
    edged = _edged_once(run_dir, port, key, src)
    left = list((run_dir / "capture").rglob("*.capture"))
    if left:
        raise RuntimeError(f"edged left {len(left)} capture files behind")
    address = f"127.0.0.1:{port}"
    counts = [str(p["files"]), str(p["per_file"])]
    seed = _seed(["tabular", address, key.key_id, str(key.path), *counts], tmp / "seed.log")
    net_wall = edged["wall_s"] - base["wall_s"]
    net_cpu = edged["cpu_s"] - base["cpu_s"]
    return {
        "readings": n,
        "edged_readings_per_s": n / edged["wall_s"],
        "edged_net_readings_per_s": n / net_wall,
        "edged_us_per_reading": 1e6 * edged["cpu_s"] / n,
        "edged_net_us_per_reading": 1e6 * net_cpu / n,
        "edged_cpu_pct": 100 * edged["cpu_s"] / edged["wall_s"],
        "edged_rss_mib": edged["rss_mib"],
        "edged_startup_s": base["wall_s"],
        "edged_startup_cpu_s": base["cpu_s"],
        "seed_readings_per_s": n / seed["wall_s"],
        "seed_us_per_reading": 1e6 * seed["cpu_s"] / n,
        "seed_cpu_pct": 100 * seed["cpu_s"] / seed["wall_s"],
        "seed_rss_mib": seed["rss_mib"],
        "ratio_readings_per_s": (n / edged["wall_s"]) / (n / seed["wall_s"]),
        "ratio_net_readings_per_s": (n / net_wall) / (n / seed["wall_s"]),
    }


def _big_file(path: Path, mb: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MB)
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)


def file(tmp: Path, port: int, key: KeyFile, p: dict[str, int], i: int) -> common.Figures:
    mb = p["file_mb"]
    run_dir = tmp / f"file-{i}"
    big = run_dir / "drop" / "big.bin"
    _big_file(big, mb)
    src = f"{{kind: files, path: {run_dir}/drop, settle: 0s}}"
    edged = _edged_once(run_dir, port, key, src)
    if big.exists():
        raise RuntimeError(f"edged did not upload and delete {big}")
    seed_file = tmp / f"seed-{i}.bin"
    _big_file(seed_file, mb)
    address = f"127.0.0.1:{port}"
    seed = _seed(["file", address, key.key_id, str(key.path), str(seed_file)], tmp / "seed.log")
    seed_file.unlink()
    return {
        "mb": mb,
        "edged_mb_per_s": mb / edged["wall_s"],
        "edged_cpu_pct": 100 * edged["cpu_s"] / edged["wall_s"],
        "edged_rss_mib": edged["rss_mib"],
        "seed_mb_per_s": mb / seed["wall_s"],
        "seed_cpu_pct": 100 * seed["cpu_s"] / seed["wall_s"],
        "seed_rss_mib": seed["rss_mib"],
        "ratio_mb_per_s": (mb / edged["wall_s"]) / (mb / seed["wall_s"]),
    }


def _ingest_worker(spec: dict[str, Any]) -> None:
    """Child: pre-encode readings, then send `calls` 1000-reading calls from 4 tasks."""
    meta = common.tabular_upload_metadata("bench")
    per, calls = int(spec["per_call"]), int(spec["calls"])
    batches = []
    for c in range(calls):
        batch = []
        for j in range(per):
            sd = pb.SensorData()
            sd.struct.update(reading(c * per + j))
            sd.metadata.time_requested.FromDatetime(T0 + timedelta(milliseconds=c * per + j))
            sd.metadata.time_received.CopyFrom(sd.metadata.time_requested)
            batch.append(sd.SerializeToString())
        batches.append(batch)

    async def go() -> float:
        async with common.client_for(spec) as client:
            queue = list(enumerate(batches))
            print("ready", flush=True)
            sys.stdin.readline()  # the parent starts its meters, then says go
            t0 = time.perf_counter()

            async def task() -> None:
                while queue:
                    idx, b = queue.pop()
                    await client.upload_readings(meta, b, item_id=f"bench-{idx}")

            await asyncio.gather(*(task() for _ in range(int(spec["tasks"]))))
            return time.perf_counter() - t0

    print(json.dumps({"wall_s": asyncio.run(go())}), flush=True)


def ingest(tmp: Path, key: KeyFile, p: dict[str, int], i: int) -> common.Figures:
    data = tmp / f"ingest-{i}"
    n = p["ingest_calls"] * 1000
    with common.ingest_server(data, key.ingest_args()) as (srv, port):
        spec = {
            "port": port,
            "key_id": key.key_id,
            "key": key.secret,
            "calls": p["ingest_calls"],
            "per_call": 1000,
            "tasks": 4,
        }
        worker = subprocess.Popen(
            [sys.executable, "-m", "bench.compare", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=common.REPO,
        )
        try:
            read_line(worker, 120)
            meter = common.CpuMeter({"ingest": srv.pid, "client": worker.pid})
            meter.start()
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
            wall = json.loads(read_line(worker, 600))["wall_s"]
            _, cpu = meter.stop()
            worker.wait(30)
        finally:
            stop_process(worker)
            for f in (worker.stdin, worker.stdout):
                if f:
                    f.close()
    stored = ingest_count(data)
    if stored != n:
        raise RuntimeError(f"ingest stored {stored} readings, expected {n}")
    return {
        "readings": n,
        "ingest_readings_per_s": n / wall,
        "ingest_cpu_pct": cpu["ingest"],
        "ingest_us_per_reading": cpu["ingest"] / 100 * wall / n * 1e6,
        "client_cpu_pct": cpu["client"],
    }


# -- driver ----------------------------------------------------------------------------


def run(quick: bool = False, runs: int | None = None) -> Path:
    if not INTEROP_PYTHON.exists():
        raise SystemExit(f"{INTEROP_PYTHON} is missing: `make bench-compare` builds it")
    p = QUICK if quick else FULL
    reps = runs or p["runs"]
    machine = common.machine_info()
    tab_runs: list[common.Figures] = []
    file_runs: list[common.Figures] = []
    ing_runs: list[common.Figures] = []
    with tempfile.TemporaryDirectory(prefix="edged-compare-") as d:
        tmp = Path(d)
        key = common.api_key(tmp)
        with ack_server(tmp, key) as (port, totals):
            for i in range(reps):
                tab_runs.append(tabular(tmp, port, key, p, i))
                print(f"  compare tabular: run {i + 1}/{reps} done", file=sys.stderr)
                file_runs.append(file(tmp, port, key, p, i))
                print(f"  compare file: run {i + 1}/{reps} done", file=sys.stderr)
        for i in range(reps):
            ing_runs.append(ingest(tmp, key, p, i))
            print(f"  compare ingest: run {i + 1}/{reps} done", file=sys.stderr)
    expected = reps * 2 * p["files"] * p["per_file"]
    acked = totals.get("readings", 0) - reps  # the seed's warm-up call sends one reading
    if acked != expected:
        raise RuntimeError(f"the ack server acknowledged {acked} readings, expected {expected}")
    tab, fil, ing = (common.median_figures(r) for r in (tab_runs, file_runs, ing_runs))
    print(f"\n## compare: seed client vs edged, acknowledging server (median of {reps})\n")
    rows = [
        {
            "who": "seed (viam-sdk, 1000/call)",
            "rps": tab["seed_readings_per_s"],
            "us": tab["seed_us_per_reading"],
            "cpu": tab["seed_cpu_pct"],
            "rss": tab["seed_rss_mib"],
        },
        {
            "who": "edged one-shot (with start-up)",
            "rps": tab["edged_readings_per_s"],
            "us": tab["edged_us_per_reading"],
            "cpu": tab["edged_cpu_pct"],
            "rss": tab["edged_rss_mib"],
        },
        {
            "who": "edged one-shot (net of start-up)",
            "rps": tab["edged_net_readings_per_s"],
            "us": tab["edged_net_us_per_reading"],
        },
    ]
    cols = [
        ("who", "tabular", ""),
        ("rps", "readings/s", ",.0f"),
        ("us", "CPU us/reading", ".1f"),
        ("cpu", "CPU%", ".0f"),
        ("rss", "peak RSS MiB", ".1f"),
    ]
    print(common.format_table(rows, cols))
    print(
        f"\nratio edged/seed readings/s: {tab['ratio_readings_per_s']:.2f}"
        f" (net of start-up {tab['ratio_net_readings_per_s']:.2f})\n"
    )
    frows = [
        {
            "who": "seed file_upload_from_path",
            "mbs": fil["seed_mb_per_s"],
            "cpu": fil["seed_cpu_pct"],
            "rss": fil["seed_rss_mib"],
        },
        {
            "who": "edged files source",
            "mbs": fil["edged_mb_per_s"],
            "cpu": fil["edged_cpu_pct"],
            "rss": fil["edged_rss_mib"],
        },
    ]
    print(
        common.format_table(
            frows,
            [
                ("who", f"{p['file_mb']} MB file", ""),
                ("mbs", "MB/s", ".0f"),
                ("cpu", "CPU%", ".0f"),
                ("rss", "peak RSS MiB", ".1f"),
            ],
        )
    )
    print(f"\nratio edged/seed MB/s: {fil['ratio_mb_per_s']:.2f}\n")
    print(
        common.format_table(
            [ing],
            [
                ("readings", "ingest readings", ",.0f"),
                ("ingest_readings_per_s", "stored readings/s", ",.0f"),
                ("ingest_us_per_reading", "server CPU us/reading", ".1f"),
                ("ingest_cpu_pct", "CPU% ingest", ".0f"),
                ("client_cpu_pct", "CPU% client", ".0f"),
            ],
        )
    )
    return common.write_result(
        NAME,
        {
            "params": p,
            "tabular": {**tab, "runs": tab_runs},
            "file": {**fil, "runs": file_runs},
            "ingest": {**ing, "runs": ing_runs},
            "ack_server_totals": totals,
        },
        machine,
        quick=quick,
    )


def _main() -> int:
    if "--worker" in sys.argv:
        _ingest_worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
        return 0
    quick = "--quick" in sys.argv
    print(json.dumps(run(quick=quick).name))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
