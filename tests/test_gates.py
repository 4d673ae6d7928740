"""Per-source gates on a real outbox: windows on an injected clock, condition commands
(real subprocesses) and files, pause/resume of one source, and max_age sweeps."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from edged.daemon.config import ConditionConfig, SourceConfig
from edged.daemon.gates import Gates, run_condition
from edged.daemon.outbox import Outbox
from tests.support.outbox_items import meta, reading, take


def src(name: str, **kw: object) -> SourceConfig:
    return SourceConfig(path=Path("/nonexistent"), name=name, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    ob = await Outbox.open(tmp_path / "state")
    yield ob
    await ob.close()


async def _until(check: Callable[[], object], what: str) -> None:
    """Wait for an observable condition, failing with `what` after 20 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    for _ in range(100_000):
        if check():
            return
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


async def test_nothing_uploads_outside_a_window_and_all_of_it_once_it_opens(box: Outbox) -> None:
    now = [datetime(2030, 1, 15, 21, 59, 0)]
    gates = Gates(box, local_now=lambda: now[0])
    gates.configure([src("video", windows=("22:00-06:00",)), src("imu")])
    await box.enqueue_readings(meta("cam"), [reading(i) for i in range(5)], source="video")
    await box.enqueue_readings(meta("imu"), [reading(9)], source="imu")
    assert box.held == {"video"}
    assert gates.view("video")["window"] == {
        "open": False,
        "next_change": "2030-01-15T22:00:00",
    }
    item = await take(box)
    assert item is not None and item.source == "imu"
    assert await take(box) is None
    box.work_available.clear()
    now[0] += timedelta(minutes=1)
    gates.refresh()
    assert box.held == frozenset() and box.work_available.is_set()  # workers woken
    item = await take(box)
    assert item is not None and (item.source, item.count) == ("video", 5)
    now[0] += timedelta(hours=8)  # 06:00: closed again
    gates.refresh()
    assert box.held == {"video"}


async def test_the_loop_wakes_at_the_window_edge(box: Outbox) -> None:
    """The loop sleeps until next_change (here 50 ms ahead on the injected clock)."""
    start = datetime(2030, 1, 15, 5, 59, 59, 950_000)
    t0 = asyncio.get_running_loop().time()

    def local() -> datetime:
        return start + timedelta(seconds=asyncio.get_running_loop().time() - t0)

    gates = Gates(box, local_now=local)
    gates.configure([src("video", windows=("06:00-07:00",))])
    assert box.held == {"video"}
    run = asyncio.create_task(gates.run())
    try:
        await _until(lambda: not box.held, "window never opened")
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_condition_command_and_file(box: Outbox, tmp_path: Path) -> None:
    flag = tmp_path / "on-wifi"
    ok = [
        sys.executable,
        "-c",
        "import sys, pathlib; sys.exit(0 if pathlib.Path(sys.argv[1]).exists() else 3)",
        str(flag),
    ]
    gates = Gates(box)
    gates.configure(
        [
            src("cmd", condition=ConditionConfig(command=tuple(ok), every=0.05)),
            src("file", condition=ConditionConfig(file=flag, every=0.05)),
        ]
    )
    assert box.held == {"cmd", "file"}  # not checked yet: closed
    run = asyncio.create_task(gates.run())
    try:
        await _until(lambda: "exited 3" in gates.view("cmd")["condition"]["why"], "cmd never ran")
        assert gates.view("cmd")["condition"]["ok"] is False
        assert "is missing" in gates.view("file")["condition"]["why"]
        flag.write_text("")
        await _until(lambda: not box.held, "conditions never held")
        flag.unlink()
        await _until(lambda: box.held == {"cmd", "file"}, "conditions never failed again")
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_a_hanging_or_missing_command_means_closed() -> None:
    held, why = await run_condition([sys.executable, "-c", "import time; time.sleep(60)"], 0.2)
    assert not held and "ran over 0.2s" in why
    held, why = await run_condition(["/nonexistent/edged-check"], 1)
    assert not held and "cannot run" in why


async def test_pause_source_holds_exactly_that_source(box: Outbox) -> None:
    gates = Gates(box)
    gates.configure([src("a"), src("b")])
    await box.enqueue_readings(meta("x"), [reading(1)], source="a")
    await box.enqueue_readings(meta("x"), [reading(2)], source="b")
    assert gates.pause("a") and not gates.pause("nope")
    assert gates.view("a")["paused"] and not gates.view("a")["upload_allowed"]
    item = await take(box)
    assert item is not None and item.source == "b"
    assert await take(box) is None
    assert gates.resume("a")
    item = await take(box)
    assert item is not None and item.source == "a"


async def test_max_age_sweep_logs_one_line_per_drop(
    box: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    gates = Gates(box)
    gates.configure([src("old", max_age=1.0)])
    await box.enqueue_readings(meta("x"), [reading(i) for i in range(4)], source="old")
    box.held = frozenset({"old"})
    run = asyncio.create_task(gates.run())
    try:
        await _until(
            lambda: any(getattr(r, "event", None) == "expired" for r in caplog.records),
            "never expired",
        )
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "expired"]
    assert (line.source, line.readings) == ("old", 4)  # type: ignore[attr-defined]
    assert (await box.stats()).counters["expired_readings:old"] == 4
