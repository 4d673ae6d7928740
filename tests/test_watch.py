"""The one watch loop all source kinds run (sources/watch.py): waits, errors, rescans."""

from __future__ import annotations

import asyncio
import errno
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import SourceContext, SourceStats
from edged.daemon.sources.watch import MIN_WAIT_S, DirWatcher, WatchLoop, ends_debounce, next_wait


@pytest.mark.parametrize(
    ("now", "next_scan", "wake", "blocked", "want"),
    [
        (0.0, 60.0, None, False, 60.0),  # nothing due: until the rescan
        (0.0, 60.0, 2.5, False, 2.5),  # a source timer first
        (0.0, 60.0, -5.0, False, MIN_WAIT_S),  # overdue: never a busy loop
        (0.0, 60.0, None, True, MIN_WAIT_S),  # backpressure: look again soon
        (0.0, 500.0, None, False, 60.0),  # never longer than rescan_s
        (100.0, 90.0, math.inf, False, MIN_WAIT_S),
    ],
)
def test_next_wait(
    now: float, next_scan: float, wake: float | None, blocked: bool, want: float
) -> None:
    assert next_wait(now, next_scan, wake, 60.0, blocked) == pytest.approx(want)


@pytest.mark.parametrize(
    ("event_type", "want"),
    [
        ("closed", True),  # IN_CLOSE_WRITE: the writer is done with it for now
        ("moved", True),  # a .prog renamed to .capture, a file renamed into place
        ("modified", False),  # an append: more may follow
        ("created", False),  # usually opened empty, about to be written
        ("deleted", False),
    ],
)
def test_ends_debounce(event_type: str, want: bool) -> None:
    assert ends_debounce(event_type) is want


async def test_a_close_or_rename_is_looked_at_without_the_debounce(tmp_path: Path) -> None:
    """A writer that closes or renames a file has told us it is done: a debounce far
    longer than the test's deadline must not delay it."""
    with DirWatcher(tmp_path, debounce_s=3600.0) as watcher:
        assert watcher.active
        (tmp_path / "a.prog").write_bytes(b"x")  # create, modify, close
        async with asyncio.timeout(30):
            changed: set[Path] = set()
            while tmp_path / "a.prog" not in changed:
                got = await watcher.wait(60.0)
                assert got is not None
                changed |= got
        os.replace(tmp_path / "a.prog", tmp_path / "a.capture")
        async with asyncio.timeout(30):
            changed = set()
            while tmp_path / "a.capture" not in changed:
                got = await watcher.wait(60.0)
                assert got is not None
                changed |= got


class Probe:
    """A source kind that records what the loop asks of it; its first change pass
    fails with EIO on a named file."""

    def __init__(self, ctx: SourceContext) -> None:
        self.name = "probe"
        self.ctx = ctx
        self.stats = SourceStats()
        self.scans = 0
        self.changes: list[set[Path]] = []

    async def scan_once(self) -> None:
        self.scans += 1

    async def on_changes(self, changed: set[Path]) -> None:
        self.changes.append(changed)
        if len(self.changes) == 1:
            raise OSError(errno.EIO, "Input/output error", "/robot/disk/bad-sector")

    def wake_at(self) -> float | None:
        return None

    def wants_scan(self) -> bool:
        return False

    def blocked(self) -> bool:
        return False


async def _until(what: str, check: Callable[[], bool], deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_an_error_in_a_pass_is_named_and_not_fatal(tmp_path: Path) -> None:
    box = await Outbox.open(tmp_path / "state", OutboxConfig(min_free_disk=0))
    root = tmp_path / "watched"
    root.mkdir()
    probe = Probe(SourceContext("p", box, tmp_path / "state", rescan_s=3600.0))
    loop = WatchLoop(probe, root)
    task = asyncio.create_task(loop.run())
    try:
        await _until("the first scan", lambda: probe.scans == 1)
        await _until("the watcher", lambda: loop._watcher is not None and loop._watcher.active)
        (root / "a").write_bytes(b"1")
        await _until("the failing pass", lambda: probe.stats.last_error is not None)
        assert probe.stats.last_error == "/robot/disk/bad-sector: Input/output error"
        (root / "b").write_bytes(b"2")
        await _until("a pass after the error", lambda: len(probe.changes) >= 2)
        assert not task.done()
        loop.request_rescan()  # sync-now: a full pass, in the loop
        await _until("the requested rescan", lambda: probe.scans == 2)
    finally:
        task.cancel()
        async with asyncio.timeout(5):
            with pytest.raises(asyncio.CancelledError):
                await task
        await box.close()
