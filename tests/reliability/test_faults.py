"""A faulty server, end to end: a real `edged run` uploads to `faulty_ingest.py` (the real
ingest with injected faults) while a writer produces uniquely numbered readings and files.

(a) 50% of DataSync calls answered UNAVAILABLE;
(b) server down at first (nothing listens on the port), then up;
(c) slow server: a share of calls held past the daemon's 1 s call deadline
    (DEADLINE_EXCEEDED on the client; the late handler still stores, so the ingest's
    de-duplication by item id is exercised too).

Each ends with everything delivered (zero missing; duplicates counted), a call count
consistent with the backoff schedule, and edged's RSS flat.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.reliability.common import (
    TORTURE,
    cycles,
    faulty_ingest,
    finish_writer,
    record,
    start_writer,
)
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, status, write_config
from tests.support.ingest_db import stored_seqs
from tests.support.processes import free_port
from tests.support.waiting import wait_for

BACKOFF_INITIAL, BACKOFF_MAX = 0.05, 0.5  # base_config's upload.backoff
WORKERS = 4


class RssProbe:
    """Samples edged's RSS whenever the test polls (no sampling thread)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[int] = []

    def sample(self) -> None:
        self.samples.append(self.proc.memory_info().rss)

    def restart(self) -> None:
        """Forget start-up samples: growth is measured from a running daemon on."""
        self.samples.clear()

    def poll(self, what: str, check: Any, timeout: float) -> None:
        def probe() -> bool:
            self.sample()
            return bool(check())

        wait_for(what, probe, timeout)

    @property
    def max_mib(self) -> float:
        return round(max(self.samples) / 2**20, 1)

    def growth_mib(self) -> float:
        """Last quarter's peak over the first quarter's peak: backlog must not show up here."""
        q = max(1, len(self.samples) // 4)
        return round((max(self.samples[-q:]) - max(self.samples[:q])) / 2**20, 1)


def delivered(data: Path) -> tuple[list[int], list[str]]:
    db = sqlite3.connect(f"file:{data / 'ingest.sqlite3'}?mode=ro", uri=True)
    try:
        seqs = stored_seqs(db)
        names = [str(r[0]) for r in db.execute("SELECT file_name FROM binaries")]
    finally:
        db.close()
    return seqs, names


def fault_config(tmp: Path, port: int, key: KeyFile, call_timeout: str = "60s") -> Path:
    body = base_config(tmp, port, key).replace(
        "upload:\n", f"upload:\n  workers: {WORKERS}\n  call_timeout: {call_timeout}\n"
    )
    return write_config(tmp / "edged.yaml", body)


def sizes() -> tuple[int, int, int]:
    """(capture files, readings per file, plain files) of the writer."""
    return (200, 100, 40) if TORTURE else (20, 100, 5)


def drain(cfg: Path, rss: RssProbe, capture: Path, written: int, timeout: float) -> dict[str, Any]:
    rss.poll("capture files retired", lambda: not list(capture.rglob("*.capture")), timeout)
    # Plain files are deleted once acknowledged: an empty outbox alone may only mean the
    # files source has not taken the last ones yet.
    uploads = capture.parent / "uploads"
    rss.poll("plain files retired", lambda: not list(uploads.glob("file-*.bin")), timeout)
    rss.poll("outbox drained", lambda: status(cfg)["outbox"]["items"] == 0, timeout)
    st = status(cfg)
    assert st["uploaded"]["readings"] >= written
    return st


def check_delivery(data: Path, written: int, plain: int) -> tuple[int, int]:
    seqs, names = delivered(data)
    missing = set(range(written)) - set(seqs)
    assert not missing, f"{len(missing)} readings lost, e.g. {sorted(missing)[:10]}"
    assert sorted(set(names)) == sorted(f"file-{n}" for n in range(plain))
    return len(seqs) - len(set(seqs)), len(names) - len(set(names))


def run_to_empty(cfg: Path, writer: subprocess.Popen[bytes], timeout: float) -> Drained:
    """Run edged on `cfg` while `writer` writes, until everything was delivered; then
    SIGTERM it, which must exit 0."""
    with daemon(cfg) as proc:
        rss = RssProbe(proc.pid)
        rss.poll("status socket", (cfg.parent / "edged.sock").exists, 30)
        rss.restart()
        written = finish_writer(writer)
        st = drain(cfg, rss, cfg.parent / "capture", written, timeout=timeout)
        assert proc.poll() is None
        proc.terminate()
        assert proc.wait(30) == 0
    return Drained(written, st, rss)


@dataclass(frozen=True)
class Drained:
    written: int
    status: dict[str, Any]
    rss: RssProbe


def delivery(data: Path, written: int, plain: int, rss: RssProbe) -> dict[str, Any]:
    """What every fault scenario records, once nothing was lost and memory stayed flat."""
    duplicates, file_duplicates = check_delivery(data, written, plain)
    assert rss.growth_mib() < 40
    return {
        "readings_offered": written,
        "files_offered": plain,
        "missing": 0,
        "duplicates": duplicates,
        "file_duplicates": file_duplicates,
        "max_rss_mib": rss.max_mib,
        "rss_growth_mib": rss.growth_mib(),
    }


def test_half_of_calls_unavailable(tmp_path: Path, key: KeyFile) -> None:
    files, per_file, plain = sizes()
    data = tmp_path / "ingest"
    with faulty_ingest(data, key, ["--unavailable", "0.5", "--seed", "7"]) as server:
        cfg = fault_config(tmp_path, server.port, key)
        writer = start_writer(tmp_path, files, per_file, plain)
        run = run_to_empty(cfg, writer, timeout=cycles(60, 600))
    counts = server.counts
    figures = delivery(data, run.written, plain, run.rss)
    successes = counts["calls"] - counts["unavailable"]
    # Each success is preceded by a geometric number of failures (p = 0.5, mean 1);
    # 4x plus slack is far past any seeded run, yet a retry storm would break it.
    assert counts["unavailable"] <= 4 * successes + 20, counts
    # The daemon's own attempt counter agrees with what reached the server (every
    # attempt connects; a refused connection would show up as a difference).
    cloud = run.status["cloud"]
    assert abs(cloud["calls"] - counts["calls"]) <= WORKERS, (cloud, counts)
    record(
        "fault-unavailable",
        **figures,
        server_calls=counts["calls"],
        unavailable=counts["unavailable"],
        successes=successes,
        calls_per_success=round(counts["calls"] / max(1, successes), 2),
    )


def test_server_down_then_up(tmp_path: Path, key: KeyFile) -> None:
    files, per_file, plain = sizes()
    down_s = cycles(4, 30)
    port = free_port()  # nothing listens here until the server comes up below
    data = tmp_path / "ingest"
    cfg = fault_config(tmp_path, port, key)
    writer = start_writer(tmp_path, files, per_file, plain)
    with daemon(cfg) as proc:
        rss = RssProbe(proc.pid)
        rss.poll("status socket", (tmp_path / "edged.sock").exists, 30)
        rss.restart()
        rss.poll("first failed call", lambda: status(cfg)["state"] == "offline", 30)
        calls_0, t0 = status(cfg)["cloud"]["calls"], time.monotonic()
        # The outage itself: a deliberate wall-clock window in which edged may only probe.
        deadline = t0 + down_s
        while time.monotonic() < deadline:
            rss.sample()
            st = status(cfg)
            assert st["state"] == "offline" and proc.poll() is None
            time.sleep(0.2)
        calls_down = status(cfg)["cloud"]["calls"] - calls_0
        elapsed = time.monotonic() - t0
        rate = calls_down / elapsed
        written = finish_writer(writer)
        with faulty_ingest(data, key, ["--listen", f"127.0.0.1:{port}"]) as server:
            up_at = time.monotonic()
            rss.poll("first success", lambda: status(cfg)["cloud"]["last_success_at"], 30)
            recovered_s = time.monotonic() - up_at
            st = drain(cfg, rss, tmp_path / "capture", written, timeout=cycles(60, 300))
            proc.terminate()
            assert proc.wait(30) == 0
    figures = delivery(data, written, plain, rss)
    # Full jitter, capped at 0.5 s: one probe at a time, mean gap 0.25 s once capped,
    # so about 4 calls/s. 12/s means a hammering client; under 0.5/s means no probing.
    assert 0.5 <= rate <= 12, f"{calls_down} calls in {elapsed:.1f}s while down"
    # The next probe is at most one capped backoff away when the server returns.
    assert recovered_s < BACKOFF_MAX + 5
    record(
        "fault-down-then-up",
        down_s=round(elapsed, 1),
        calls_while_down=calls_down,
        calls_per_s_down=round(rate, 2),
        recovered_after_s=round(recovered_s, 2),
        **figures,
        server_calls=server.counts["calls"],
        total_calls=st["cloud"]["calls"],
    )


def test_slow_server_deadline_exceeded(tmp_path: Path, key: KeyFile) -> None:
    files, per_file, plain = sizes()
    data = tmp_path / "ingest"
    args = ["--delay", "1.5", "--delay-share", "0.3", "--seed", "3"]
    with faulty_ingest(data, key, args) as server:
        cfg = fault_config(tmp_path, server.port, key, call_timeout="1s")
        writer = start_writer(tmp_path, files, per_file, plain)
        run = run_to_empty(cfg, writer, timeout=cycles(90, 900))
    counts = server.counts
    log = cfg.with_suffix(".log").read_text()
    assert "DEADLINE_EXCEEDED" in log, "no call ran into its deadline: the delay did not bite"
    figures = delivery(data, run.written, plain, run.rss)
    # A held call counts once on each side; successes are the calls not held, and each
    # item needs one of those. 30% held: 4x the successes plus slack is a loose ceiling.
    successes = counts["calls"] - counts["delayed"]
    assert counts["delayed"] <= 4 * successes + 20, counts
    cloud = run.status["cloud"]
    assert abs(cloud["calls"] - counts["calls"]) <= WORKERS, (cloud, counts)
    record(
        "fault-slow-server",
        call_timeout_s=1,
        server_delay_s=1.5,
        delayed_share=0.3,
        **figures,
        server_calls=counts["calls"],
        deadline_exceeded=counts["delayed"],
        successes=successes,
    )
