"""The capture source end to end: robot-made fixtures → outbox → real ingest.

The fixtures were written by an independent implementation; the manifest says what
must arrive. Everything runs for real: files on disk, SQLite outbox, loopback server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edged.capture import CaptureWriter, frame
from edged.client import UploadClient
from edged.daemon.config import BackoffConfig, UploadConfig
from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.capture import (
    CHUNK_READINGS,
    CaptureConfig,
    CaptureSource,
    lease_free,
    prog_wait_s,
    writer_gone,
)
from edged.daemon.uploader import Uploader
from edged.ingest import IngestServer, IngestSettings
from tests.support.capture_files import copy_tree, tabular_metadata, tabular_reading
from tests.support.paths import FIXTURES
from tests.support.processes import read_line

FAST = UploadConfig(workers=2, backoff=BackoffConfig(initial=0.01, max=0.05))
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no fixtures at {FIXTURES}")


def ns(text: str) -> int:
    t = dt.datetime.fromisoformat(text)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Outbox, IngestServer, SourceContext]]:
    box = await Outbox.open(tmp_path / "state")
    async with IngestServer(
        IngestSettings(data_dir=tmp_path / "ingest", synchronous="NORMAL")
    ) as server:
        yield box, server, SourceContext("robot-1", box, tmp_path / "state")
    await box.close()


async def drain(box: Outbox, server: IngestServer) -> None:
    async with UploadClient(server.address, tls=False) as client:
        await asyncio.wait_for(
            Uploader(box, client, FAST, idle_poll_s=0.05, rng=random.Random(0)).run(
                until_empty=True
            ),
            60,
        )


@pytest.mark.parametrize(
    "mtime,now,grace,watched,wait",
    [
        (1000.0, 1030.0, 60.0, 0.0, 30.0),
        (1000.0, 1060.0, 60.0, 0.0, 0.0),
        (1000.0, 1030.0, 60.0, 45.0, 15.0),  # watched longer than the mtime says
        (1000.0, 1001.0, 0.0, 0.0, 0.0),  # no grace
        # mtime in the future (clock stepped back, stale clock at boot): only watching counts
        (5000.0, 1000.0, 60.0, 0.0, 60.0),
        (5000.0, 1000.0, 60.0, 59.0, 1.0),
        (5000.0, 1000.0, 60.0, 60.0, 0.0),
    ],
)
def test_prog_wait_rule(
    mtime: float, now: float, grace: float, watched: float, wait: float
) -> None:
    assert prog_wait_s(mtime, now, grace, watched) == pytest.approx(wait)


@pytest.mark.parametrize(
    "lease,mtime,booted,gone",
    [
        (True, 2000.0, 1500.0, True),  # nobody has it open
        (False, 1000.0, 1500.0, False),  # held open, even if "written before this boot"
        (False, 2000.0, 1500.0, False),
        (None, 1000.0, 1500.0, True),  # cannot probe: written before this boot
        (None, 2000.0, 1500.0, False),  # cannot probe, written since: assume a writer
    ],
)
def test_writer_gone_rule(lease: bool | None, mtime: float, booted: float, gone: bool) -> None:
    assert writer_gone(lease, mtime, booted) is gone


def test_lease_probe_sees_an_open_descriptor(tmp_path: Path) -> None:
    f = tmp_path / "x.prog"
    f.write_bytes(b"")
    assert lease_free(tmp_path, f) is True
    with f.open("ab"):
        assert lease_free(tmp_path, f) is False
    assert lease_free(tmp_path, tmp_path / "missing.prog") is None
    other = tmp_path / "other.prog"
    other.write_bytes(b"")
    assert lease_free(tmp_path, f, other.stat()) is False  # not the file we saw


async def test_prog_with_mtime_in_the_future_is_recovered_after_grace_by_watching(
    env: tuple[Outbox, IngestServer, SourceContext], tmp_path: Path
) -> None:
    box, _, _ = env
    mono = [1000.0]
    ctx = SourceContext("robot-1", box, tmp_path / "state", monotonic=lambda: mono[0])
    root = tmp_path / "capture"
    prog = root / "rdk_component_sensor" / "temp1" / "Readings" / "2026-01-01T00_00_00.000000Z.prog"
    prog.parent.mkdir(parents=True)
    prog.write_bytes(
        frame(tabular_metadata().SerializeToString())
        + frame(tabular_reading(0).SerializeToString())
    )
    ahead = time.time() + 30 * 86400  # written while the clock was a month ahead
    os.utime(prog, (ahead, ahead))
    source = CaptureSource(CaptureConfig(path=root, prog_grace=60.0), ctx)
    await source.scan_once()
    assert prog.exists()  # just seen: not yet untouched for the grace period
    mono[0] += 61.0
    await source.scan_once()
    assert not prog.exists(), "a future mtime kept the orphan waiting for the clock"
    assert (await box.stats()).readings == 1


async def test_a_closed_prog_brings_its_renamed_capture_along(
    env: tuple[Outbox, IngestServer, SourceContext], tmp_path: Path
) -> None:
    """The writer closes the `.prog` and renames it at once; the close event alone (the
    rename's event can come later) gets the `.capture` committed and retired."""
    _, _, ctx = env
    root = tmp_path / "capture"
    d = root / "rdk_component_sensor" / "temp1" / "Readings"
    d.mkdir(parents=True)
    prog = d / "2026-01-01T00_00_00.000000Z.prog"
    prog.write_bytes(
        frame(tabular_metadata().SerializeToString())
        + frame(tabular_reading(0).SerializeToString())
    )
    final = prog.with_suffix(".capture")
    os.replace(prog, final)
    source = CaptureSource(CaptureConfig(path=root), ctx)
    await source.on_changes({prog})
    assert not final.exists()
    assert (await ctx.outbox.stats()).readings == 1


async def test_a_file_of_one_full_chunk_is_one_transaction(
    env: tuple[Outbox, IngestServer, SourceContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file of exactly CHUNK_READINGS readings used to be committed as the chunk and
    then an empty write carrying the claim: two fsync'd commits for one file."""
    box, _, ctx = env
    root = tmp_path / "capture"
    with CaptureWriter(root, tabular_metadata(), max_file_readings=CHUNK_READINGS) as writer:
        for i in range(2 * CHUNK_READINGS):
            writer.write_tabular({"seq": i})
    assert len(writer.closed_paths) == 2
    writes: list[tuple[int, bool]] = []
    real = box.enqueue_readings

    async def counted(metadata: bytes, readings: Any, **kw: Any) -> None:
        writes.append((len(readings), kw.get("claim") is not None))
        await real(metadata, readings, **kw)

    monkeypatch.setattr(box, "enqueue_readings", counted)
    await CaptureSource(CaptureConfig(path=root), ctx).scan_once()
    assert writes == [(CHUNK_READINGS, True), (CHUNK_READINGS, True)]
    assert (await box.stats()).readings == 2 * CHUNK_READINGS
    assert not list(root.rglob("*.capture"))


async def test_header_less_prog_of_a_dead_writer_is_removed_not_quarantined(
    env: tuple[Outbox, IngestServer, SourceContext],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, _, ctx = env
    root = tmp_path / "capture"
    d = root / "rdk_component_sensor" / "temp1" / "Readings"
    d.mkdir(parents=True)
    empty = d / "2026-01-01T00_00_00.000000Z.prog"
    empty.write_bytes(b"")  # killed before its first 4 KiB flush
    cut = d / "2026-01-01T00_00_01.000000Z.prog"
    cut.write_bytes(b"\x80")  # ...or in the middle of writing the header
    finished = d / "2026-01-01T00_00_02.000000Z.capture"
    finished.write_bytes(b"")  # a finished file without a header is corrupt
    live = d / "2026-01-01T00_00_03.000000Z.prog"
    live.write_bytes(b"")
    source = CaptureSource(CaptureConfig(path=root, prog_grace=0.0), ctx)
    with caplog.at_level("INFO", "edged.sources.capture"), live.open("ab"):  # a live writer
        await source.scan_once()
        assert live.exists()  # its header is still in the writer's buffer
    assert not empty.exists() and not cut.exists()
    assert source.stats.quarantined == 1
    [moved] = [p for p in ctx.quarantine_dir.iterdir() if p.suffix != ".reason"]
    assert moved.name.endswith(finished.name)
    assert any("no complete header" in r.getMessage() for r in caplog.records)


@needs_fixtures
async def test_robot_fixtures_arrive_as_the_manifest_says(
    env: tuple[Outbox, IngestServer, SourceContext], tmp_path: Path
) -> None:
    box, server, ctx = env
    copy_tree(FIXTURES, tmp_path / "robot")
    root = tmp_path / "robot" / "capture"
    hour_ago = time.time() - 3600  # the orphan's writer "died an hour ago"
    for prog in root.rglob("*.prog"):
        os.utime(prog, (hour_ago, hour_ago))
    manifest: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
    source = CaptureSource(CaptureConfig(path=root, tags=("edge",)), ctx)
    await source.scan_once()
    await drain(box, server)

    tabular = [e for e in manifest["entries"] if e["kind"] == "tabular"]
    binary = [e for e in manifest["entries"] if e["kind"] == "binary"]
    readings = await server.store.readings()
    key = lambda r: (r[0], r[1])  # noqa: E731
    got = sorted(
        (
            (
                r.component_name,
                r.time_requested_ns,
                r.time_received_ns,
                r.method_name,
                r.component_type,
                tuple(r.tags),
                json.dumps(r.data, sort_keys=True),
            )
            for r in readings
        ),
        key=key,
    )
    want = sorted(
        (
            (
                e["component_name"],
                ns(e["time_requested"]),
                ns(e["time_received"]),
                e["method"],
                e["component_type"],
                (*e["tags"], "edge"),
                json.dumps(e["struct"], sort_keys=True),
            )
            for e in tabular
        ),
        key=key,
    )
    assert len(readings) == len(tabular) == 50 * 3 + 7 + 9
    assert got == want
    assert {r.part_id for r in readings} == {"robot-1"}
    stored = await server.store.binaries()
    assert sorted((b.sha256, b.size) for b in stored) == sorted(
        (e["sha256"], e["length"]) for e in binary
    )
    for b in stored:
        assert hashlib.sha256(b.path.read_bytes()).hexdigest() == b.sha256
        assert (b.component_name, b.method_name) == ("cam1", "ReadImage")
    # Every source file is retired; the corrupt one is in quarantine with its reason.
    assert [p for p in root.rglob("*") if p.is_file()] == []
    quarantined = sorted((ctx.quarantine_dir).iterdir())
    reasons = [p for p in quarantined if p.name.endswith(".reason")]
    assert len(reasons) == 1 and len(quarantined) == 2
    text = reasons[0].read_text()
    assert "2026-01-01T07_00_08.600000Z.capture" in text and "byte offset" in text
    assert source.stats.quarantined == 1 and source.stats.truncated >= 1
    # A rescan finds nothing more to do, and the outbox is empty.
    await source.scan_once()
    assert (await box.stats()).items == 0


@pytest.mark.timeout(600)
async def test_thousands_of_files_appearing_while_running(
    env: tuple[Outbox, IngestServer, SourceContext], tmp_path: Path
) -> None:
    box, _, ctx = env
    root = tmp_path / "capture"
    source = CaptureSource(CaptureConfig(path=root), ctx)
    task = asyncio.create_task(source.run())
    try:
        seq = 0
        for n in range(2000):
            meta = tabular_metadata(component_name=f"s{n % 4}")
            with CaptureWriter(root, meta) as writer:
                for _ in range(3):
                    writer.write(tabular_reading(seq))
                    seq += 1
        # Wait while the source makes progress; fail only when it stalls (a loaded
        # machine is slow, not wrong). The per-test timeout bounds the whole.
        done, stalled_since = 0, time.monotonic()
        while (now := (await box.stats()).readings) < seq:
            if now > done:
                done, stalled_since = now, time.monotonic()
            stall = time.monotonic() - stalled_since
            assert stall < 30, f"no progress for 30 s at {now}/{seq} readings"
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert (await box.stats()).readings == seq  # exactly once
    assert [p for p in root.rglob("*.capture")] == []


WRITER_CHILD = """
import sys
from pathlib import Path
from edged.capture import CaptureWriter, frame
from tests.support.capture_files import tabular_metadata, tabular_reading

writer = CaptureWriter(Path(sys.argv[1]), tabular_metadata(), max_file_bytes=2048)
for seq in range(10**7):
    writer.write(tabular_reading(seq))
    if seq % 50 == 49:
        writer.flush()
        print(seq, flush=True)
"""


def _kill_writer_midway(root: Path) -> int:
    """Run a CaptureWriter in a child, SIGKILL it after some flushes; last flushed seq."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, str(root)],
        stdout=subprocess.PIPE,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    flushed = 0
    for _ in range(8):
        flushed = int(read_line(proc, 30))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.stdout is not None
    proc.stdout.close()
    return flushed


async def test_writer_killed_mid_write_every_whole_reading_arrives_once(
    env: tuple[Outbox, IngestServer, SourceContext], tmp_path: Path
) -> None:
    box, server, ctx = env
    root = tmp_path / "capture"
    flushed = await asyncio.to_thread(_kill_writer_midway, root)
    # After "a restart": the .prog is older than its grace period.
    source = CaptureSource(CaptureConfig(path=root, prog_grace=0.0), ctx)
    await source.scan_once()
    await drain(box, server)
    seqs = sorted(int(r.data["seq"]) for r in await server.store.readings())
    assert seqs == list(range(len(seqs)))  # no gaps, no duplicates
    assert len(seqs) > flushed  # at least everything flushed before the kill
    assert [p for p in root.rglob("*") if p.is_file()] == []
