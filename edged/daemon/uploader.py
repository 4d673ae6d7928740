"""Workers that lease outbox items and deliver them through a sink (the upload client).

One global gate keeps a down server from being hammered: after a transient failure
every worker waits, and only one probe call at a time goes out, spaced by the
backoff schedule, until a call succeeds. Auth failures pause everything until
`resume()` (or a config reload) because no item can succeed with bad credentials.
Every message of every worker is charged to one `Shaper` (the bandwidth cap) before it
goes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, Unpack

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.client import ByteSource, FileSlice, Pace, UploadOptions, UploadResult
from edged.daemon.config import UploadConfig
from edged.daemon.metrics import DaemonMetrics
from edged.daemon.outbox import KIND_BINARY, KIND_FILE, KIND_TABULAR, Item, Outbox
from edged.daemon.policy import Action, backoff_delay, binary_route, cert_problem, on_failure
from edged.daemon.safefs import locate, open_under
from edged.daemon.schedule import lease_floor
from edged.daemon.shaper import Cap, Shaper, cap_in_force
from edged.errors import OutboxFull, SourceError, UploadError

log = logging.getLogger("edged.uploader")

STATE_RUNNING = "running"
STATE_PAUSED = "paused"
STATE_OFFLINE = "offline"
STATE_AUTH_FAILED = "auth_failed"
STATE_TLS_FAILED = "tls_failed"
STATE_DRAINING = "draining"
MAX_TRACKED_STRIKES = 10_000  # items with item-specific failures remembered at once


class Sink(Protocol):
    """What the uploader needs from a DataSync client (UploadClient implements it).

    `timeout` bounds a unary call; for the two streams it bounds a stall (no progress for
    that long), never the total time, which depends on the file and the link. `pace` is
    awaited with each message's size before it goes (the bandwidth cap)."""

    async def upload_readings(
        self, metadata: pb.UploadMetadata, readings: Sequence[bytes], **call: Unpack[UploadOptions]
    ) -> UploadResult: ...

    async def upload_binary_stream(
        self,
        metadata: pb.UploadMetadata,
        sensor: pb.SensorMetadata,
        source: ByteSource,
        **call: Unpack[UploadOptions],
    ) -> UploadResult: ...

    async def upload_file(
        self, metadata: pb.UploadMetadata, source: ByteSource, **call: Unpack[UploadOptions]
    ) -> UploadResult: ...


class Gate:
    """Global connectivity gate: open, or closed until `open_at` with one probe at a time."""

    def __init__(
        self, initial: float, maximum: float, rng: random.Random, clock: Callable[[], float]
    ) -> None:
        self._initial, self._max, self._rng, self._clock = initial, maximum, rng, clock
        self.failures = 0
        self.open_at = 0.0
        self.probe = asyncio.Lock()
        self._kick = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.failures > 0

    def wait_s(self) -> float:
        return max(0.0, self.open_at - self._clock())

    async def wait_open(self) -> None:
        """Sleep until the next probe may go out (or `open_now` cuts the wait short)."""
        while (left := self.wait_s()) > 0:
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):  # not wait_for: it can drop a cancel (3.11)
                    await self._kick.wait()

    def success(self) -> None:
        self.failures = 0
        self.open_at = 0.0

    def failure(self) -> float:
        self.failures += 1
        delay = backoff_delay(self.failures, self._initial, self._max, self._rng)
        self.open_at = self._clock() + delay
        return delay

    def open_now(self) -> None:
        self.open_at = 0.0
        self._kick.set()


class RateMeter:
    """Readings and bytes per second over a sliding window, for status."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._window, self._clock = window_s, clock
        self._events: collections.deque[tuple[float, int, int]] = collections.deque()

    def add(self, readings: int, nbytes: int) -> None:
        self._events.append((self._clock(), readings, nbytes))
        self._trim()

    def _trim(self) -> None:
        cutoff = self._clock() - self._window
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()

    def rates(self) -> tuple[float, float]:
        self._trim()
        return (
            sum(e[1] for e in self._events) / self._window,
            sum(e[2] for e in self._events) / self._window,
        )


class Uploader:
    def __init__(
        self,
        outbox: Outbox,
        sink: Sink,
        config: UploadConfig,
        *,
        idle_poll_s: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self.outbox = outbox
        self.sink = sink
        self.config = config
        self.idle_poll_s = idle_poll_s  # how often an idle worker looks again (tests: less)
        self.metrics = metrics or DaemonMetrics()
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall = wall_clock
        self.gate = Gate(config.backoff.initial, config.backoff.max, self._rng, clock)
        self.rates = RateMeter(clock=clock)
        self.shaper = Shaper(config.max_bandwidth, chunk=config.chunk_size, clock=clock)
        self.bandwidth_override: int | None = None  # `edged limit`, until reload
        self.paused = False
        self.auth_failed = False
        self.tls_failed: str | None = None  # why the server's certificate was rejected
        self.draining = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._stop = asyncio.Event()
        self._idle_turn = asyncio.Lock()  # held by the one idle worker watching for work
        self.inflight = 0
        self.inflight_below_top = 0  # calls of items under the top priority (lease_floor)
        self._leasing = 0
        self.calls = 0
        self.last_success_at: float | None = None
        # Monotonic times for ages in `edged status`: the daemon's own clock, immune to
        # wall-clock steps and to the reader's clock.
        self.last_success_mono: float | None = None
        self.last_error_mono: float | None = None
        self._last_error: str | None = None
        self._acks = 0  # calls the server accepted, to tell a poison item from an outage
        self._strikes: dict[str, tuple[int, int]] = {}  # uid -> (failures, _acks at first)

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @last_error.setter
    def last_error(self, text: str | None) -> None:
        self._last_error = text
        self.last_error_mono = None if text is None else self._clock()

    def ages(self) -> tuple[float | None, float | None]:
        """Seconds since the last success and since the last error (None: never)."""
        now = self._clock()
        return (
            None if self.last_success_mono is None else now - self.last_success_mono,
            None if self.last_error_mono is None else now - self.last_error_mono,
        )

    # -- control -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.draining:
            return STATE_DRAINING
        if self.auth_failed:
            return STATE_AUTH_FAILED
        if self.tls_failed is not None:
            return STATE_TLS_FAILED
        if self.paused:
            return STATE_PAUSED
        if self.gate.closed:
            return STATE_OFFLINE
        return STATE_RUNNING

    def pause(self) -> None:
        self.paused = True
        self._resumed.clear()

    @property
    def halted(self) -> bool:
        """Stopped until an operator acts: refused credentials or a rejected certificate."""
        return self.auth_failed or self.tls_failed is not None

    def clear_auth_failure(self) -> None:
        """A config reload: retry with the (maybe new) key, but keep an operator's pause."""
        if self.halted:
            self.auth_failed = False
            self.tls_failed = None
            if not self.paused:
                self._resumed.set()
            self.gate.open_now()
            self.outbox.work_available.set()

    def resume(self) -> None:
        """Clears pause and auth stop (operators call it after fixing credentials)."""
        self.paused = False
        self.auth_failed = False
        self.tls_failed = None
        self._resumed.set()
        self.gate.open_now()
        self.outbox.work_available.set()

    @property
    def cap(self) -> Cap:
        return cap_in_force(self.config.max_bandwidth, self.bandwidth_override)

    def limit_bandwidth(self, rate: int | None) -> Cap:
        """`edged limit`: bytes/s (0: unlimited) over the config until a reload, or None
        to go back to `upload.max_bandwidth`. Applies at once, to calls in flight too."""
        self.bandwidth_override = rate
        return self.apply_bandwidth()

    def apply_bandwidth(self) -> Cap:
        """Put the cap in force into the shaper (after a limit or a config change)."""
        cap = self.cap
        self.shaper.set_rate(cap.rate, chunk=self.config.chunk_size)
        return cap

    async def sync_now(self) -> None:
        await self.outbox.make_all_due()
        self.gate.open_now()

    def stop(self) -> None:
        """Stop taking new items; calls in flight finish (the caller bounds the wait)."""
        self.draining = True
        self._stop.set()
        self._resumed.set()
        self.gate.open_now()
        self.outbox.work_available.set()

    # -- running -------------------------------------------------------------------------

    async def run(self, *, until_empty: bool = False) -> None:
        """Run the workers until `stop()`; with `until_empty`, also stop once nothing is
        left that could be sent now or later (dead letters excepted): arq's burst mode."""
        self._until_empty = until_empty
        async with asyncio.TaskGroup() as tg:
            for n in range(self.config.workers):
                tg.create_task(self._worker(n), name=f"upload-worker-{n}")

    async def _worker(self, n: int) -> None:
        while not self._stop.is_set():
            if self.paused or self.halted:
                await self._resumed.wait()
                continue
            try:
                if self.gate.closed:
                    async with self.gate.probe:
                        await self.gate.wait_open()
                        if not self._stop.is_set() and not self.paused and not self.halted:
                            await self._one()
                else:
                    await self._one()
            except (OutboxFull, sqlite3.Error) as exc:
                # The outbox could not record an outcome (disk full): the item's lease runs
                # out and it is sent again under the same id, which the server de-duplicates.
                self.last_error = f"outbox: {exc}"
                log.warning("worker %d: %s; pausing this worker for 1s", n, exc)
                await asyncio.sleep(1.0)
            except Exception as exc:
                # A bug or an unforeseen OS error must not silently stop every worker (the
                # TaskGroup would end while status still said "running"): say it, go on.
                self.last_error = f"worker: {type(exc).__name__}: {exc}"
                log.exception("worker %d: unexpected error; carrying on in 1s", n)
                await asyncio.sleep(1.0)

    async def _one(self) -> None:
        s = self.config
        self.outbox.work_available.clear()
        priorities = self.outbox.priorities
        # A lease under way may take a lower item: count it so, or two workers leasing
        # at once could both take one and leave none kept for the top priority.
        floor = lease_floor(priorities, self.inflight_below_top + self._leasing, s.workers)
        self._leasing += 1
        try:
            item = await self.outbox.lease(
                lease_s=s.lease,
                max_readings=s.batch_max_readings,
                max_bytes=s.batch_max_bytes,
                floor=floor,
            )
        finally:
            self._leasing -= 1
        if item is None:
            await self._idle(floored=floor is not None)
            return
        if item.more_due:  # let the next idle worker look (it would lease nothing otherwise)
            self.outbox.work_available.set()
        below = item.priority < max(priorities.values(), default=0)
        self.inflight += 1
        self.inflight_below_top += below
        try:
            await self._deliver(item)
        finally:
            self.inflight -= 1
            self.inflight_below_top -= below
            if below:
                self.outbox.work_available.set()  # a worker kept for the top may take it

    async def _idle(self, floored: bool = False) -> None:
        """Wait for work. One idle worker at a time waits on `work_available`, the others
        queue for that turn: an enqueue wakes one worker, which wakes the next only when
        its lease saw more due (`Item.more_due`), instead of every worker leasing and
        all but one finding nothing. The poll stays as a fallback for items coming due.
        A worker kept for the top priority (`floored`) does not count lower items as
        due: it waits for an enqueue or for a lower call to end."""
        if self._until_empty and self.inflight == 0 and await self.outbox.next_due_in() is None:
            self.stop()
            return
        async with self._idle_turn:
            if self._stop.is_set() or self.paused or self.halted:
                return
            if self.outbox.work_available.is_set():
                return  # set since our lease looked: look again
            due = None if floored else await self.outbox.next_due_in()
            wait = self.idle_poll_s if due is None else min(due, self.idle_poll_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.01)):  # not wait_for (see Gate.wait_open)
                    await self.outbox.work_available.wait()

    @contextlib.asynccontextmanager
    async def _holding(self, item: Item) -> AsyncIterator[None]:
        """Renew `item`'s lease while its call runs: a stream has no overall deadline (only
        a progress one), and an expired lease would hand it to a second worker mid-upload.
        Stopped before the outcome is recorded, so it never re-leases a settled item."""

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.config.lease / 2)
                await self.outbox.extend_lease(item, self.config.lease)

        renewer = asyncio.create_task(renew(), name=f"lease-{item.uid}")
        try:
            yield
        finally:
            renewer.cancel()
            await asyncio.wait({renewer})
            if not renewer.cancelled() and renewer.exception() is not None:
                log.warning("item %s: lease renewal failed: %s", item.uid, renewer.exception())

    async def _deliver(self, item: Item) -> None:
        started = self._clock()
        try:
            self.calls += 1
            with _pinned(item) as opener:
                async with self._holding(item):
                    await self._send(item, opener)
        except UploadError as exc:
            took = self._clock() - started
            self.metrics.call_ended(item.kind, took, exc.status.name)
            await self._failed(item, exc, took)
            return
        except SourceError as exc:
            log.warning(
                "item %s dead-lettered: %s",
                item.uid,
                exc,
                extra=_fields(item, "dead_lettered", status="SOURCE"),
            )
            await self.outbox.dead_letter(item, "SOURCE", str(exc))
            self.metrics.dead_lettered.labels("SOURCE").inc()
            return
        took = self._clock() - started
        self.metrics.call_ended(item.kind, took, "OK")
        await self.outbox.ack(item)
        self.metrics.uploaded(item.kind, item.count, item.bytes)
        self._acks += 1
        self._strikes.pop(item.uid, None)
        self.gate.success()
        self.last_success_at = self._wall()
        self.last_success_mono = self._clock()
        self.rates.add(item.count, item.bytes)
        # One line per file at info; tabular batches and binary readings only at debug.
        log.log(
            logging.INFO if item.kind == KIND_FILE else logging.DEBUG,
            "uploaded %s %s: %d reading(s), %d bytes in %.0f ms",
            item.kind,
            item.path if item.path is not None and not item.stored else item.uid,
            item.count,
            item.bytes,
            took * 1000,
            extra=_fields(item, "uploaded", status="OK", duration_ms=round(took * 1000, 3)),
        )

    async def _failed(self, item: Item, exc: UploadError, took: float = 0.0) -> None:
        self.last_error = f"{exc.status.name}: {exc.message}"
        fields = _fields(
            item, "upload_failed", status=exc.status.name, duration_ms=round(took * 1000, 3)
        )
        strikes, ok_at_first = self._strikes.pop(item.uid, (0, self._acks))
        cert = cert_problem(exc)
        action = on_failure(
            exc.status,
            transport=exc.transport,
            strikes=strikes + 1,
            others_ok=self._acks > ok_at_first,
            max_attempts=self.config.max_attempts,
            cert_rejected=cert is not None,
        )
        if action is Action.RETRY:
            self._remember_strike(item.uid, strikes + 1, ok_at_first)
            delay = self._item_delay(item)
            await self.outbox.retry_later(item, delay, self.last_error)
            self.metrics.retries.labels(item.kind).inc()
            log.info(
                "item %s: %s (failure %d of at most %d while others get through);"
                " retrying it in %.1fs",
                item.uid,
                self.last_error,
                strikes + 1,
                self.config.max_attempts,
                delay,
                extra=fields | {"retry_in_s": round(delay, 3)},
            )
        elif action is Action.OUTAGE:
            if strikes:
                self._remember_strike(item.uid, strikes, ok_at_first)
            delay = self._item_delay(item)
            await self.outbox.retry_later(item, delay, self.last_error)
            self.metrics.retries.labels(item.kind).inc()
            gate_delay = self.gate.failure()
            log.info(
                "item %s: %s; retrying it in %.1fs, next probe in %.1fs",
                item.uid,
                self.last_error,
                delay,
                gate_delay,
                extra=fields | {"retry_in_s": round(delay, 3)},
            )
        elif action is Action.DEAD:
            log.warning(
                "item %s dead-lettered: %s",
                item.uid,
                self.last_error,
                extra=fields | {"event": "dead_lettered"},
            )
            await self.outbox.dead_letter(item, exc.status.name, exc.message)
            self.metrics.dead_lettered.labels(exc.status.name).inc()
        elif action is Action.TLS_FAILED:
            await self.outbox.release(item)
            self.last_error = f"the server's TLS certificate failed verification: {cert}"
            if self.tls_failed is None:
                log.error(
                    "uploads stopped: %s; fix cloud.ca_file or the server's certificate (name,"
                    " expiry, the robot's clock), then run `edged resume` or reload the config",
                    self.last_error,
                )
            self.tls_failed = cert
            self._resumed.clear()
        else:
            await self.outbox.release(item)
            if not self.auth_failed:
                log.error(
                    "uploads paused: the server refused our credentials (%s); fix the API key"
                    " and run `edged resume` or reload the config",
                    self.last_error,
                    extra=fields | {"event": "auth_failed"},
                )
            self.auth_failed = True
            self._resumed.clear()

    def _item_delay(self, item: Item) -> float:
        b = self.config.backoff
        return backoff_delay(item.attempts + 1, b.initial, b.max, self._rng)

    def _remember_strike(self, uid: str, strikes: int, ok_at_first: int) -> None:
        """In memory on purpose: a restart gives a poison item `max_attempts` more tries,
        which is bounded; the map is capped so a server failing everything stays cheap."""
        if len(self._strikes) >= MAX_TRACKED_STRIKES:
            self._strikes.pop(next(iter(self._strikes)))
        self._strikes[uid] = (strikes, ok_at_first)

    async def _send(self, item: Item, opener: Callable[[], int] | None) -> UploadResult:
        s = self.config
        meta = pb.UploadMetadata.FromString(item.metadata)
        # The cap's waiters go by the item's priority: telemetry's chunks pass video's.
        pace: Pace = functools.partial(self.shaper.acquire, priority=item.priority)
        if item.kind == KIND_TABULAR:
            readings = await self.outbox.readings_of(item)
            return await self.sink.upload_readings(
                meta, readings, item_id=item.uid, timeout=s.call_timeout, pace=pace
            )
        piece: FileSlice | None = None
        payload: ByteSource
        if item.inline is not None:
            payload = item.inline
        else:
            payload = piece = FileSlice(_path(item), item.offset, item.length, opener)
        timeout = s.call_timeout  # for a stream: how long it may go without progress
        if item.kind == KIND_BINARY:
            sensor = pb.SensorMetadata.FromString(item.sensor or b"")
            if binary_route(item.length) == "unary":
                data = item.inline if piece is None else await _read_slice(piece)
                assert data is not None
                reading = pb.SensorData(metadata=sensor, binary=data).SerializeToString()
                return await self.sink.upload_readings(
                    meta, [reading], item_id=item.uid, timeout=s.call_timeout, pace=pace
                )
            return await self.sink.upload_binary_stream(
                meta, sensor, payload, item_id=item.uid, timeout=timeout, pace=pace
            )
        return await self.sink.upload_file(
            meta, payload, item_id=item.uid, timeout=timeout, pace=pace
        )


def _fields(item: Item, event: str, **more: Any) -> dict[str, Any]:
    """The structured fields of a log line about `item` (JSON logs; docs/operations.md)."""
    fields: dict[str, Any] = {
        "event": event,
        "item_id": item.uid,
        "kind": item.kind,
        "readings": item.count,
        "bytes": item.bytes,
        "attempt": item.attempts + 1,
    }
    if item.path is not None and not item.stored:
        fields["path"] = item.path
    return fields | more


def _path(item: Item) -> Path:
    assert item.path is not None
    return Path(item.path)


@contextlib.contextmanager
def _pinned(item: Item) -> Iterator[Callable[[], int] | None]:
    """For a reference into a source file: an opener of that very file, opened once here,
    below its root without links and only if it is still the file queued, so a swap
    before or during the upload sends nothing else. None for inline and spooled items."""
    if item.path is None or item.stored:
        yield None
        return
    try:
        fd = open_under(*locate(item.path, item.root), item.ident)  # Swapped passes through
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise SourceError(f"cannot read {item.path}: {why}") from exc
    try:
        yield lambda: os.dup(fd)
    finally:
        os.close(fd)


async def _read_slice(piece: FileSlice) -> bytes:
    def read() -> bytes:
        try:
            fd = (
                os.open(piece.path, os.O_RDONLY | os.O_CLOEXEC)
                if piece.opener is None
                else piece.opener()
            )
            with os.fdopen(fd, "rb") as f:
                f.seek(piece.offset)
                data = f.read(piece.length)
        except OSError as exc:
            raise SourceError(f"cannot read {piece.path}: {exc.strerror}") from exc
        if len(data) != piece.length:
            raise SourceError(f"{piece.path} holds {len(data)} of the {piece.length} queued bytes")
        return data

    return await asyncio.to_thread(read)
