"""The upload bandwidth cap's token bucket, on a clock the test drives: the timer the
shaper sets fires only when the test advances time, so nothing here sleeps."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

import pytest

from edged.daemon.shaper import CONFIG, OVERRIDE, Cap, Shaper, burst_for, cap_in_force

KiB = 1024
MiB = 1024 * KiB


class FakeTime:
    """A monotonic clock and a timer queue: `advance` moves time, firing due timers."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(callback)
        heapq.heappush(self._timers, (self.now + max(0.0, delay), next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        until = self.now + seconds
        for _ in range(100_000):
            live = [t for t in self._timers if not t[2].cancelled]
            if not live or min(live)[0] > until:
                break
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, when)
            timer.cancelled = True
            timer.callback()
        self.now = until

    @property
    def pending(self) -> int:
        return sum(not t[2].cancelled for t in self._timers)


class _Timer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def shaper(fake: FakeTime, rate: int, chunk: int = 64 * KiB) -> Shaper:
    return Shaper(rate, chunk=chunk, clock=fake.clock, call_later=fake.call_later)


async def settle() -> None:
    """Let woken tasks run (a grant resolves a future; its task resumes next turn)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_burst_is_a_quarter_second_and_at_least_a_chunk() -> None:
    assert burst_for(2 * MiB, 64 * KiB) == 512 * KiB
    assert burst_for(100 * KiB, 64 * KiB) == 64 * KiB
    assert burst_for(0, 64 * KiB) == 64 * KiB


def test_a_runtime_limit_overrides_the_config_until_cleared() -> None:
    assert cap_in_force(2 * MiB, None) == Cap(2 * MiB, CONFIG)
    assert cap_in_force(2 * MiB, 0) == Cap(0, OVERRIDE)  # `edged limit off`
    assert cap_in_force(0, KiB) == Cap(KiB, OVERRIDE)


async def test_unlimited_never_waits_but_counts(fake: FakeTime) -> None:
    s = shaper(fake, 0)
    for _ in range(100):
        await s.acquire(MiB)
    assert s.granted_bytes == 100 * MiB
    assert s.waiting == 0 and fake.pending == 0


async def test_rate_over_many_acquires_is_the_cap(fake: FakeTime) -> None:
    rate, chunk = 2 * MiB, 64 * KiB
    s = shaper(fake, rate, chunk)
    tasks = [asyncio.create_task(s.acquire(chunk)) for _ in range(200)]  # 12.5 MiB
    await settle()
    assert s.granted_bytes == s.burst  # the full bucket went at once, the rest queued
    for _ in range(5):
        before = s.granted_bytes
        fake.advance(1.0)
        await settle()
        assert abs(s.granted_bytes - before - rate) <= chunk  # each second: the cap
    assert s.measured() == pytest.approx(rate, rel=0.1)
    fake.advance(2.0)
    await asyncio.gather(*tasks)
    assert s.waiting == 0 and fake.pending == 0


async def test_burst_goes_at_once_then_the_rate_holds(fake: FakeTime) -> None:
    s = shaper(fake, 4 * MiB, 64 * KiB)  # bucket: 1 MiB
    for _ in range(16):
        await s.acquire(64 * KiB)  # a full bucket: no waiting
    assert s.tokens == pytest.approx(0)
    task = asyncio.create_task(s.acquire(64 * KiB))
    await settle()
    assert not task.done()
    fake.advance((64 * KiB) / (4 * MiB) - 0.001)
    await settle()
    assert not task.done()
    fake.advance(0.002)
    await settle()
    assert task.done()


async def test_a_message_larger_than_the_bucket_passes_as_debt(fake: FakeTime) -> None:
    s = shaper(fake, 1 * MiB, 64 * KiB)  # bucket: 256 KiB
    await s.acquire(4 * MiB)  # a full bucket lets it go: no deadlock
    assert s.tokens == pytest.approx(256 * KiB - 4 * MiB)
    task = asyncio.create_task(s.acquire(KiB))
    await settle()
    assert not task.done()  # the debt is repaid first
    fake.advance(3.7)
    await settle()
    assert not task.done()
    fake.advance(0.1)
    await settle()
    assert task.done()
    assert s.waiting == 0


async def test_waiters_go_by_priority_then_arrival(fake: FakeTime) -> None:
    s = shaper(fake, 64 * KiB, 64 * KiB)
    await s.acquire(64 * KiB)  # empty the bucket
    order: list[str] = []

    async def take(name: str, priority: int) -> None:
        await s.acquire(64 * KiB, priority)
        order.append(name)

    tasks = []
    for name, priority in (("file-1", 0), ("file-2", 0), ("telemetry", 5), ("file-3", 0)):
        tasks.append(asyncio.create_task(take(name, priority)))
        await settle()
    tasks.append(asyncio.create_task(take("alarm", 9)))
    await settle()
    for _ in range(5):
        fake.advance(1.0)
        await settle()
    await asyncio.gather(*tasks)
    assert order == ["alarm", "telemetry", "file-1", "file-2", "file-3"]


async def test_a_newcomer_never_passes_a_waiting_head_of_its_priority(fake: FakeTime) -> None:
    s = shaper(fake, 1 * MiB, 64 * KiB)  # bucket: 256 KiB
    await s.acquire(256 * KiB)
    big = asyncio.create_task(s.acquire(256 * KiB))  # needs a full bucket: 0.25 s
    await settle()
    fake.advance(0.1)  # enough for a small one, not for the big one
    small = asyncio.create_task(s.acquire(KiB))
    await settle()
    assert not big.done() and not small.done()
    fake.advance(0.15)
    await settle()
    assert big.done() and not small.done()
    fake.advance(0.001)
    await settle()
    assert small.done()


async def test_cancelled_waiters_leave_nothing_behind(fake: FakeTime) -> None:
    s = shaper(fake, 64 * KiB, 64 * KiB)
    await s.acquire(64 * KiB)
    first = asyncio.create_task(s.acquire(64 * KiB))
    second = asyncio.create_task(s.acquire(64 * KiB))
    await settle()
    assert s.waiting == 2
    first.cancel()  # the head, before its grant
    await settle()
    assert first.cancelled()
    assert s.waiting == 1
    fake.advance(1.0)
    await settle()
    assert second.done()  # the cancelled head took no tokens and held nobody up
    assert s.tokens == pytest.approx(0)
    # Granted, then cancelled before it could send: its tokens come back.
    third = asyncio.create_task(s.acquire(32 * KiB))
    await settle()
    fake.advance(0.5)  # the grant resolves the future; the task has not resumed yet
    assert s.waiting == 0
    third.cancel()
    await settle()
    assert third.cancelled()
    assert s.tokens == pytest.approx(32 * KiB)
    assert s.waiting == 0 and fake.pending == 0


async def test_a_rate_change_applies_to_queued_waiters(fake: FakeTime) -> None:
    s = shaper(fake, 64 * KiB, 64 * KiB)
    await s.acquire(64 * KiB)
    slow = asyncio.create_task(s.acquire(64 * KiB))
    await settle()
    s.set_rate(1 * MiB)  # 16x faster: due in 1/16 s instead of 1 s
    fake.advance(0.07)
    await settle()
    assert slow.done()
    slower = asyncio.create_task(s.acquire(64 * KiB))
    await settle()
    s.set_rate(16 * KiB)  # now 4 s for the chunk
    fake.advance(1.0)
    await settle()
    assert not slower.done()
    s.set_rate(0)  # `edged limit off`: everyone goes now
    await settle()
    assert slower.done()
    assert s.waiting == 0 and fake.pending == 0
