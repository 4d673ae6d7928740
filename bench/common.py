"""Shared bench helpers: child processes and the `edged ingest` they upload to, CPU%/peak
RSS, medians, machine info, JSON + tables. Benches use them as `common.X`.

Every figure is a median over N runs (the machine is shared and noisy). CPU% is process
CPU time (user+system, all threads) over wall time of the timed region, so 100 = one core
busy. Peak RSS is the kernel's high-water mark (VmHWM) of a fresh process per run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from tests.support.capture_files import tabular_metadata
from tests.support.credentials import KeyFile, make_key_file
from tests.support.processes import ingest_process, peak_rss_bytes

if TYPE_CHECKING:
    from edged._proto.app.datasync.v1.data_sync_pb2 import UploadMetadata
    from edged.client import UploadClient

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MiB = 1024 * 1024

Figures = dict[str, float]
Worker = Callable[[dict[str, Any]], Coroutine[Any, Any, Figures]]
"""One measurement in a child process: its spec in, its figures out."""
TABULAR_META = tabular_metadata(component_name="bench", tags=[])
"""The capture metadata of the benches' tabular readings."""


def tabular_upload_metadata(part_id: str) -> UploadMetadata:
    """The upload header of the benches' tabular readings, sent straight by a client."""
    from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
    from edged.client import upload_metadata

    return upload_metadata(
        part_id,
        pb.DATA_TYPE_TABULAR_SENSOR,
        component_type="rdk:component:sensor",
        component_name="bench",
        method_name="Readings",
    )


# -- statistics ----------------------------------------------------------------------------


def median_figures(runs: Sequence[Mapping[str, float]]) -> Figures:
    """Per-key median over runs (each key independently)."""
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: float(statistics.median(r[k] for r in runs)) for k in keys}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def run_n(n: int, once: Callable[[int], Figures], label: str = "") -> tuple[Figures, list[Figures]]:
    """Call `once(i)` n times; return (median figures, all runs)."""
    runs: list[Figures] = []
    for i in range(n):
        runs.append(once(i))
        if label:
            print(f"  {label}: run {i + 1}/{n} done", file=sys.stderr, flush=True)
    return median_figures(runs), runs


# -- processes -----------------------------------------------------------------------------


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads); None = this process."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


@dataclass
class CpuMeter:
    """CPU% of a set of processes over a region: start(), then stop() -> {name: percent}."""

    pids: dict[str, int | None]
    _t0: float = 0.0
    _cpu0: dict[str, float] | None = None

    def start(self) -> None:
        self._cpu0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._t0 = time.perf_counter()

    def stop(self) -> tuple[float, dict[str, float]]:
        """(wall seconds, {name: CPU% of one core})."""
        wall = time.perf_counter() - self._t0
        assert self._cpu0 is not None, "start() first"
        pct = {k: 100 * (cpu_seconds(p) - self._cpu0[k]) / wall for k, p in self.pids.items()}
        return wall, pct


@contextmanager
def ingest_server(
    data: Path, extra: Sequence[str] = (), log: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`edged ingest` run from the repo, its stderr in `log` (or discarded); yields
    (process, port). The one definition is the tests' (tests/support/processes.py)."""
    with ingest_process(data, extra, cwd=REPO, log=log or Path(os.devnull)) as server:
        yield server


def api_key(directory: Path) -> KeyFile:
    """A fresh API key (id, secret, file) for a run's server, daemon and clients."""
    return make_key_file(directory)


def edged_config(run_dir: Path, port: int, key: KeyFile, sources: str, extra: str = "") -> Path:
    """`run_dir/edged.yaml`: a daemon sending to 127.0.0.1:`port` in plaintext with its
    state, socket and log in `run_dir`; `sources` and `extra` are YAML lines."""
    cfg, key_id, key_file = run_dir / "edged.yaml", key.key_id, key.path
    cfg.write_text(f"""\
part_id: bench
state_dir: {run_dir / "state"}
cloud: {{address: "127.0.0.1:{port}", api_key_id: {key_id}, api_key_file: {key_file}, tls: false}}
sources:
{sources}
{extra}status: {{socket: {run_dir / "edged.sock"}}}
log: {{level: warning}}
""")
    return cfg


def run_worker(module: str, spec: Mapping[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """`python -m MODULE --worker JSON` as a fresh child; its last stdout line is JSON."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--worker", json.dumps(spec)],
        capture_output=True,
        cwd=REPO,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"bench worker {module} failed ({done.returncode}):\n{done.stderr.decode()[-4000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def run_client_worker(
    module: str, data: Path, key: KeyFile, spec: Mapping[str, Any], log: Path
) -> Figures:
    """A fresh `edged ingest` on `data` (stderr to `log`) and one `module` worker child
    uploading to it; the worker's spec gains what `client_for` needs and `server_pid`,
    its figures the server's peak RSS (`rss_server_mib`)."""
    with ingest_server(data, key.ingest_args(), log=log) as (proc, port):
        server = {"port": port, "server_pid": proc.pid, "key_id": key.key_id, "key": key.secret}
        figures: Figures = run_worker(module, {**spec, **server})
        figures["rss_server_mib"] = peak_rss_bytes(proc.pid) / MiB
    return figures


def client_for(spec: Mapping[str, Any]) -> UploadClient:
    """In a worker: a client of the `edged ingest` its spec names (as `run_client_worker`
    passes it: port, key_id, key)."""
    from edged.client import UploadClient

    address = f"127.0.0.1:{spec['port']}"
    return UploadClient(address, api_key_id=spec["key_id"], api_key=spec["key"], tls=False)


# -- reporting -----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_result(
    name: str,
    payload: Mapping[str, Any],
    machine: Mapping[str, Any] | None = None,
    *,
    quick: bool | None = None,
) -> Path:
    """bench/results/<name>.json; pass `machine` taken at the start (load average then).
    A quick (smoke) run goes to <name>-quick.json: it never overwrites the full figures."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if quick is not None:
        name = f"{name}-quick" if quick else name
        payload = {"quick": quick, **payload}
    doc = {
        "name": name,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": dict(machine) if machine is not None else machine_info(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


Column = tuple[str, str, str]
"""(key in the row, header, format spec such as ',.0f')."""

CPU_RSS: list[Column] = [
    ("cpu_pct", "CPU%", ".0f"),
    ("rss_mib", "peak RSS MiB", ".1f"),
]
"""The measured process's CPU% and peak RSS (one-process tables)."""

CLIENT_SERVER: list[Column] = [
    ("cpu_client_pct", "CPU% client", ".0f"),
    ("cpu_server_pct", "CPU% server", ".0f"),
    ("rss_client_mib", "peak RSS client MiB", ".1f"),
    ("rss_server_mib", "peak RSS server MiB", ".1f"),
]
"""CPU% and peak RSS of the client and of the server (two-process tables)."""


def report(
    name: str,
    payload: Mapping[str, Any],
    machine: Mapping[str, Any],
    quick: bool,
    tables: Sequence[tuple[str, Sequence[Mapping[str, Any]], Sequence[Column]]],
) -> Path:
    """`write_result`, then each (heading, rows, columns) as a titled table, then where
    the figures went."""
    out = write_result(name, payload, machine, quick=quick)
    for heading, rows, columns in tables:
        print(f"\n## {heading}\n")
        print(format_table(rows, columns))
    print(f"\nwrote {out}")
    return out


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[head for _, head, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key, "")
            line.append(format(value, spec) if isinstance(value, int | float) else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def fmt(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])


def module_main(
    prog: str,
    workers: Mapping[str, Worker],
    run: Callable[[bool], Path],
    argv: list[str] | None = None,
) -> int:
    """`python -m bench.X [--quick]` runs the benchmark; `--worker SPEC` is one child
    measurement (so its CPU% and RSS are its own): `workers[SPEC["kind"]]`, whose figures
    are its last stdout line (what `run_worker` reads)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--worker", metavar="SPEC", help="internal: run one measurement")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(asyncio.run(workers[spec["kind"]](spec))), flush=True)
    else:
        run(args.quick)
    return 0
