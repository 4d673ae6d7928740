"""SIGTERM at random moments of large uploads: `edged run` exits within its grace every
time, a second signal stops it at once, and no file is lost or stored twice across the
restarts. Real daemon and ingest subprocesses, real files."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from edged.daemon.app import CANCEL_WAIT_S, SHUTDOWN_GRACE_S, cancel_within
from edged.daemon.sources.watch import DirWatcher
from tests.reliability.common import cycles, record
from tests.support.credentials import KeyFile
from tests.support.daemon import cloud_section, daemon, status, write_config
from tests.support.ingest_db import ingest_count
from tests.support.processes import edged_cmd, ingest_process
from tests.support.waiting import wait_for

MiB = 1024 * 1024
EXIT_BOUND_S = SHUTDOWN_GRACE_S + CANCEL_WAIT_S + 5  # grace, cancel wait, closing


def files_config(tmp: Path, port: int, key: KeyFile) -> str:
    return f"""\
part_id: robot-stop
state_dir: {tmp / "state"}
{cloud_section(port, key)}sources:
  - kind: files
    path: {tmp / "uploads"}
    settle: 200ms
upload:
  backoff: {{initial: 50ms, max: 500ms}}
status:
  socket: {tmp / "edged.sock"}
"""


def drop_file(root: Path, name: str, size: int, fill: int) -> None:
    tmp = root / f".{name}.tmp"
    tmp.write_bytes(bytes([fill]) * size)
    tmp.rename(root / name)


def wait_exit(proc: subprocess.Popen[bytes], bound: float, what: str) -> float:
    start = time.monotonic()
    try:
        rc = proc.wait(bound)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"edged did not exit within {bound:.0f}s after {what}") from None
    assert rc == 0, f"edged exited {rc} after {what}"
    return time.monotonic() - start


def test_sigterm_at_random_moments_of_large_uploads(tmp_path: Path, key: KeyFile) -> None:
    seed = int(os.environ.get("EDGED_SEED", random.randrange(1 << 32)))
    print(f"\n[shutdown] seed={seed} (EDGED_SEED={seed} replays it)")
    rng = random.Random(seed)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    n = cycles(20, 100)
    names: list[str] = []
    slowest = 0.0
    second_signals = 0
    with ingest_process(tmp_path / "ingest", key.ingest_args()) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", files_config(tmp_path, port, key))
        log = cfg.with_suffix(".log")
        for cycle in range(n):
            name = f"big-{cycle}.bin"
            names.append(name)
            size = rng.randint(1, 8) * MiB
            moment = rng.choice(("leaves", "delay", "delay", "queued"))
            with daemon(cfg) as proc:
                wait_for("status socket", (tmp_path / "edged.sock").exists)
                drop_file(uploads, name, size, cycle % 256)
                target = uploads / name
                if moment == "leaves":  # the moment: the file leaves the directory
                    wait_for("file retired", lambda t=target: not t.exists(), 60)  # type: ignore[misc]
                elif moment == "queued":
                    wait_for(
                        "file queued",
                        lambda t=target: not t.exists() or status(cfg)["outbox"]["items"] > 0,  # type: ignore[misc]
                        60,
                    )
                else:  # anywhere in settle, lease, stream or ack
                    time.sleep(rng.uniform(0.0, 1.5))  # a fault-injection point, not a sync
                seen = len(log.read_text())
                proc.send_signal(signal.SIGTERM)
                if rng.random() < 0.25:
                    second_signals += 1
                    wait_for("first signal", lambda n=seen: "shutting down" in log.read_text()[n:])  # type: ignore[misc]
                    proc.send_signal(signal.SIGTERM)
                    took = wait_exit(proc, CANCEL_WAIT_S + 5, f"a second SIGTERM (cycle {cycle})")
                else:
                    took = wait_exit(proc, EXIT_BOUND_S, f"SIGTERM (cycle {cycle}, {moment})")
                slowest = max(slowest, took)
        # One last run drains whatever the signals left queued.
        drain = subprocess.run(
            edged_cmd("run", "-c", str(cfg), "--until-empty"),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert drain.returncode == 0, drain.stderr.decode()[-2000:]
        wait_for("every file stored", lambda: ingest_count(tmp_path / "ingest", "binaries") >= n)
        assert ingest_count(tmp_path / "ingest", "binaries") == n  # each file exactly once
        assert not list(uploads.iterdir())
    assert "ignored cancellation" not in log.read_text()
    record(
        "sigterm during uploads",
        seed=seed,
        cycles=n,
        second_signals=second_signals,
        slowest_exit_s=round(slowest, 2),
    )


async def test_watcher_wait_honours_a_cancel_that_lands_with_its_event(tmp_path: Path) -> None:
    """Python 3.11's wait_for drops a cancellation that arrives in the loop turn in which
    the awaited event fired; the source loop then never stopped on SIGTERM."""
    watcher = DirWatcher(tmp_path, debounce_s=0.0)  # no observer: events come from note()
    for turns in range(6):  # every loop turn between the event and the wake-up
        task = asyncio.create_task(watcher.wait(30))
        await asyncio.sleep(0)
        watcher.note(tmp_path / "x")
        for _ in range(turns):
            await asyncio.sleep(0)
        if task.cancel():  # still running: it must end cancelled, not return
            await asyncio.wait({task}, timeout=5)
            assert task.cancelled(), f"cancel swallowed {turns} loop turn(s) after the event"


async def test_cancel_within_abandons_a_task_that_ignores_cancellation() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the kind of bug the shutdown must survive

    async def polite() -> None:
        await asyncio.Event().wait()

    bad, good = asyncio.create_task(stubborn()), asyncio.create_task(polite())
    await asyncio.sleep(0)  # let both start (a task cancelled before its first step just ends)
    try:
        left = await cancel_within([bad, good], 0.3)
        assert left == {bad} and good.cancelled()
    finally:
        release.set()
        await asyncio.wait({bad}, timeout=5)
