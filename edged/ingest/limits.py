"""What one query may spend, and the runner that enforces it outside the event loop.

SQL and MQL queries are arbitrary work a tenant chooses. They run on their own small
thread pool (uploads keep the default one, so they never queue behind a query), at most
`per_org` at a time for one organisation, and each under a `QueryControl`: a deadline
enforced both by SQLite's progress handler and by a timer that interrupts the connection
(one expensive VM step cannot outrun it), and a cancel that the handler fires when the
client disconnects or its deadline passes. Every limit has a safe default and a flag on
`edged ingest` (edged/cli.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from edged.ingest.flags import flag_field

MiB = 1024 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True)
class QueryLimits:
    """Per-query bounds, each declared once with its `edged ingest` flag."""

    timeout_s: float = flag_field(10.0, "--query-timeout", "seconds per query")
    max_rows: int = flag_field(
        100_000, "--query-max-rows", "rows (SQL) or documents (MQL) per answer", "count"
    )
    max_result_bytes: int = flag_field(
        64 * MiB, "--query-max-result-bytes", "bytes of one encoded SQL/MQL answer", "size"
    )
    max_value_bytes: int = flag_field(
        16 * MiB, "--query-max-value-bytes", "bytes of one SQL value or MQL document", "size"
    )
    max_pipeline_nodes: int = flag_field(
        10_000, "--query-max-pipeline-nodes", "values in one MQL pipeline", "count"
    )
    workers: int = flag_field(
        4, "--query-workers", "threads running queries, all organisations", "count"
    )
    per_org: int = flag_field(
        2, "--query-max-per-org", "queries one organisation runs at once", "count"
    )
    queue_wait_s: float = flag_field(
        2.0, "--query-queue-wait", "seconds an extra query waits for a slot"
    )
    max_page_binary_bytes: int = flag_field(
        64 * MiB, "--max-page-binary-bytes", "blob bytes in one BinaryData answer", "size"
    )
    sqlite_heap_bytes: int = flag_field(
        1024 * MiB, "--sqlite-heap-limit", "all SQLite memory in the process", "size"
    )


class LimitExceeded(Exception):
    """A query hit one of its bounds: RESOURCE_EXHAUSTED; the message names the limit."""


class Interruptible(Protocol):
    """What a query runs on: sqlite3.Connection, or pgsql's canceller of a PostgreSQL one."""

    def interrupt(self) -> None: ...


class QueryControl:
    """Deadline and cancellation of one query, shared by the event loop and its thread."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.cancelled = False
        self.timed_out = False
        self._lock = threading.Lock()
        self._conn: Interruptible | None = None

    def attach(self, conn: Interruptible | None) -> None:
        """The connection to interrupt (None once it is about to close)."""
        with self._lock:
            self._conn = conn
            if conn is not None and self.cancelled:
                conn.interrupt()

    def cancel(self, *, timed_out: bool = False) -> None:
        """Stop the query at SQLite's next instruction and Python's next check."""
        with self._lock:
            self.timed_out = self.timed_out or timed_out
            self.cancelled = True
            if self._conn is not None:
                self._conn.interrupt()

    def stopped(self) -> bool:
        """True once cancelled or past the deadline (then it counts as timed out)."""
        if not self.cancelled and time.monotonic() > self.deadline:
            self.cancel(timed_out=True)
        return self.cancelled

    def progress(self) -> int:
        """An SQLite progress handler: non-zero aborts the statement."""
        return 1 if self.stopped() else 0

    def too_long(self, hint: str) -> LimitExceeded:
        return LimitExceeded(
            f"query took too long (limit {self.timeout_s:g} s, --query-timeout); {hint}"
        )


def set_sqlite_heap_limit(limit_bytes: int) -> None:
    """Cap all SQLite memory in this process (SQLITE_NOMEM beyond it), so no query can
    make SQLite alone exhaust the machine. Process-wide by SQLite's design; 0 = none."""
    if limit_bytes > 0:
        conn = sqlite3.connect(":memory:")
        try:
            conn.execute(f"PRAGMA hard_heap_limit={int(limit_bytes)}")
        finally:
            conn.close()


class QueryRunner:
    """The query thread pool plus the per-organisation gate."""

    def __init__(self, limits: QueryLimits) -> None:
        self.limits = limits
        self.executor = ThreadPoolExecutor(max(1, limits.workers), thread_name_prefix="query")
        self._slots: dict[str, asyncio.Semaphore] = {}  # one per organisation (API key)
        self._controls: set[QueryControl] = set()

    async def _acquire(self, org: str) -> asyncio.Semaphore:
        limit = self.limits.per_org
        slots = self._slots.setdefault(org, asyncio.Semaphore(max(1, limit)))
        try:
            await asyncio.wait_for(slots.acquire(), self.limits.queue_wait_s)
        except TimeoutError:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"organisation {org!r} already runs {limit} queries (--query-max-per-org);"
                " retry when one has finished",
            ) from None
        return slots

    async def run(self, org: str, fn: Callable[[QueryControl], _T]) -> _T:
        """Run `fn(control)` on the query pool within the org's slots and the deadline.

        The slot is held until the thread has returned, not merely until the caller
        gave up: a client that disconnects and retries cannot pile up work."""
        slots = await self._acquire(org)
        loop = asyncio.get_running_loop()
        control = QueryControl(self.limits.timeout_s)
        self._controls.add(control)
        try:
            cfut: Future[_T] = self.executor.submit(fn, control)
        except BaseException:
            self._controls.discard(control)
            slots.release()
            raise

        def done(_: Future[_T]) -> None:
            self._controls.discard(control)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(slots.release)

        cfut.add_done_callback(done)
        timer = loop.call_later(self.limits.timeout_s, lambda: control.cancel(timed_out=True))
        try:
            return await asyncio.wrap_future(cfut)
        except asyncio.CancelledError:
            control.cancel()  # the client went away or its deadline passed
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        """Interrupt running queries and drop queued ones; threads end promptly."""
        for control in list(self._controls):
            control.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
