"""The upload bandwidth cap (`upload.max_bandwidth`, `edged limit`): one token bucket
shared by every upload worker, charged per message (a streamed chunk, a tabular request)
just before it is handed to the connection.

Promises:
- over any interval the bytes granted stay within `rate * interval + burst`, plus at
  most one message larger than the bucket: such a message passes once the bucket is
  full and leaves it in debt, which later grants repay, so it neither deadlocks nor beats
  the average rate;
- waiters are served highest priority first and FIFO within a priority; nobody passes
  the head of the queue (a small message slipping past a big one of the same priority
  would starve the big one);
- a waiter cancelled before its grant leaves nothing behind; one cancelled after its
  grant, before it could send, gives its tokens back;
- a rate change applies at once, to waiters already queued too; rate 0 is unlimited and
  releases every waiter.

Not promised: the rate the link itself achieves. The bytes counted are message bytes
(HTTP/2 and gRPC framing, a few bytes a message, are not).

Why not a library: aiolimiter (the well-kept asyncio limiter) refuses an `acquire`
larger than its bucket, has no priorities, reads the event loop's clock and cannot
change its rate under queued waiters; Greengrass stream manager and Vector cap per
exporter/sink the same way (one shared rate, work queued by priority), which is the
shape kept here.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

BURST_S = 0.25  # the bucket holds a quarter second of the rate (and at least a chunk)
_SLACK = 0.5  # bytes of float rounding a grant may be short by


class Handle(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Handle]


def burst_for(rate: int, chunk: int) -> int:
    """Bucket size for `rate`: a quarter second of it, so a burst runs at most 250 ms ahead
    of the cap (other traffic on the link queues behind it no longer than that), and at
    least one streamed chunk, so a chunk passes without debt and each wake-up sends one."""
    return max(chunk, int(rate * BURST_S))


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]  # (-priority, arrival): the heap's order
    nbytes: int = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)
    since: float = field(compare=False)


class _Window:
    """Bytes per second over the last `window_s` seconds (or since the first byte, when
    that is sooner), in one-second bins."""

    def __init__(self, window_s: float) -> None:
        self._window = window_s
        self._bins: deque[list[float]] = deque()  # [second, bytes]
        self._first: float | None = None

    def add(self, now: float, nbytes: int) -> None:
        if self._first is None:
            self._first = now
        second = float(int(now))
        if self._bins and self._bins[-1][0] == second:
            self._bins[-1][1] += nbytes
        else:
            self._bins.append([second, float(nbytes)])
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._bins and self._bins[0][0] + 1 <= now - self._window:
            self._bins.popleft()  # wholly before the window

    def rate(self, now: float) -> float:
        self._trim(now)
        if self._first is None:
            return 0.0
        span = min(self._window, max(1.0, now - self._first))
        return sum(b[1] for b in self._bins) / span


class Shaper:
    """Token bucket with priority waiters. `clock` and `call_later` (a timer: delay and
    callback, returning a cancellable handle) are injectable so tests drive time."""

    def __init__(
        self,
        rate: int = 0,
        *,
        chunk: int = 64 * 1024,
        clock: Callable[[], float] = time.monotonic,
        call_later: CallLater | None = None,
        window_s: float = 10.0,
    ) -> None:
        self._clock = clock
        self._call_later = call_later
        self._chunk = chunk
        self.rate = 0
        self.burst = 0
        self._tokens = 0.0
        self._stamp = clock()
        self._heap: list[_Waiter] = []
        self._arrivals = itertools.count()
        self._timer: Handle | None = None
        self._window = _Window(window_s)
        self.granted_bytes = 0  # bytes let through since start (sent, or being sent)
        self.waited_s = 0.0  # total time callers spent waiting for the cap
        self.set_rate(rate)

    @property
    def waiting(self) -> int:
        """Callers queued for the cap now."""
        return len(self._heap)

    @property
    def tokens(self) -> float:
        """Bytes that may go now (negative: debt from an oversized message)."""
        self._refill(self._clock())
        return self._tokens

    def measured(self) -> float:
        """Bytes per second let through over the last window (capped or not)."""
        return self._window.rate(self._clock())

    def set_rate(self, rate: int, *, chunk: int | None = None) -> None:
        """Change the cap (0: unlimited); queued waiters are re-timed at once. Going from
        unlimited to a cap starts with a full bucket; a lower cap keeps debt and trims
        savings to the new bucket."""
        if rate < 0:
            raise ValueError(f"a bandwidth cap cannot be negative, got {rate}")
        self._refill(self._clock())
        if chunk is not None:
            self._chunk = chunk
        unlimited_before = self.rate == 0
        self.rate = rate
        self.burst = burst_for(rate, self._chunk) if rate else 0
        self._tokens = float(self.burst) if unlimited_before else min(self._tokens, self.burst)
        self._pump()

    async def acquire(self, nbytes: int, priority: int = 0) -> None:
        """Wait until `nbytes` may be sent (higher `priority` sooner), then charge them."""
        if nbytes <= 0:
            return
        since = self._clock()
        if self.rate == 0 or (not self._heap and self._take(nbytes, since)):
            self._count(nbytes, since, since)
            return
        loop = asyncio.get_running_loop()
        waiter = _Waiter((-priority, next(self._arrivals)), nbytes, loop.create_future(), since)
        heapq.heappush(self._heap, waiter)
        self._pump()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._refill(self._clock())  # granted, never sent: the tokens come back
                self._tokens = min(self._tokens + nbytes, float(self.burst or nbytes))
            elif waiter in self._heap:
                self._heap.remove(waiter)
                heapq.heapify(self._heap)
            self._pump()  # the head or the tokens changed
            raise
        self._count(nbytes, since, self._clock())

    # -- the bucket (no I/O but the timer) -------------------------------------------

    def _refill(self, now: float) -> None:
        if self.rate:
            elapsed = max(0.0, now - self._stamp)
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._stamp = now

    def _need(self, nbytes: int) -> float:
        """Tokens that must be there before `nbytes` go: all of them, or a full bucket
        for a message bigger than the bucket (it then leaves the bucket in debt)."""
        return float(min(nbytes, self.burst))

    def _take(self, nbytes: int, now: float) -> bool:
        self._refill(now)
        if self._tokens + _SLACK < self._need(nbytes):
            return False
        self._tokens -= nbytes
        return True

    def _pump(self) -> None:
        """Grant from the head of the queue while the bucket allows; then set one timer
        for when the head can go."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock()
        while self._heap:
            head = self._heap[0]
            if head.future.done():  # cancelled, its task not yet resumed to remove it
                heapq.heappop(self._heap)
                continue
            if self.rate and not self._take(head.nbytes, now):
                delay = (self._need(head.nbytes) - self._tokens) / self.rate
                later = self._call_later or asyncio.get_running_loop().call_later
                self._timer = later(delay, self._pump)
                return
            heapq.heappop(self._heap)
            head.future.set_result(None)

    def _count(self, nbytes: int, since: float, now: float) -> None:
        self.granted_bytes += nbytes
        self.waited_s += now - since
        self._window.add(now, nbytes)


@dataclass(frozen=True)
class Cap:
    """The cap in force and where it comes from."""

    rate: int  # bytes/s, 0: unlimited
    source: str  # "config" or "edged limit"


CONFIG = "config"
OVERRIDE = "edged limit"


def cap_in_force(config_rate: int, override: int | None) -> Cap:
    """`edged limit RATE|off` overrides `upload.max_bandwidth` until `edged limit config`
    or a reload; otherwise the config's value holds."""
    if override is None:
        return Cap(config_rate, CONFIG)
    return Cap(override, OVERRIDE)
