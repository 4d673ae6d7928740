"""Prometheus metrics: the `/metrics` endpoint (ingest and daemon share it) and the
ingest server's own metrics, observed at the one place every call passes.

Promised for the endpoint, which is off unless a listen address is given:
- plain HTTP/1.1, one request per connection, `GET`/`HEAD /metrics` only;
- bounded for hostile peers: a request head of at most `MAX_HEAD` bytes that must
  arrive within `HEAD_TIMEOUT_S`, at most `MAX_CONNECTIONS` connections at once (more
  are answered 503 and closed), a reply that must drain within `WRITE_TIMEOUT_S`;
- served from the caller's event loop: no thread, nothing left listening after
  `stop()`.
Every server owns its registry (never prometheus_client's global one), so several
servers or daemons in one process never share or collide on a metric.

Not promised: authentication. Bind it to loopback (the default everywhere) or to a
network only your scraper reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from edged.ingest.retention import Expired

log = logging.getLogger("edged.metrics")
access_log = logging.getLogger("edged.ingest.access")

MAX_HEAD = 8 * 1024
HEAD_TIMEOUT_S = 5.0
WRITE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 8
CALL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {408: "Request Timeout", 431: "Request Header Fields Too Large"}
_REASONS |= {503: "Service Unavailable"}


def route(head: bytes) -> int:
    """The HTTP status for a request head (pure): 200 only for GET/HEAD of /metrics."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return 404
    return 200 if method in (b"GET", b"HEAD") else 405


def response(status: int, body: bytes, content_type: str, *, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


class MetricsServer:
    """`/metrics` of one registry; `refresh` runs before each scrape (e.g. to read a
    status snapshot that collectors then turn into samples without awaiting)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.registry = registry
        self.host, self.port = host, port
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self._tasks: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._scrape = asyncio.Lock()  # one refresh at a time, however many scrapers

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Cut the connections rather than cancel their tasks: a handler then ends on its
        # own (Python 3.11's stream callback reports a cancelled handler as an error).
        for writer in list(self._tasks.values()):
            writer.transport.abort()
        if self._tasks and (await asyncio.wait(list(self._tasks), timeout=2.0))[1]:
            for task in list(self._tasks):
                task.cancel()  # stuck in a refresh: the last resort
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        try:
            if len(self._tasks) > MAX_CONNECTIONS:
                await self._reply(writer, 503, b"too many scrapers at once\n", "text/plain")
                return
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                await self._reply(writer, 408, b"request head too slow\n", "text/plain")
                return
            except asyncio.LimitOverrunError:
                await self._reply(writer, 431, b"request head too large\n", "text/plain")
                return
            except asyncio.IncompleteReadError:
                return
            status = route(head)
            if status != 200:
                await self._reply(writer, status, b"only GET /metrics is served\n", "text/plain")
                return
            body = await self.render()
            head_only = head.startswith(b"HEAD ")
            await self._reply(writer, 200, body, CONTENT_TYPE_LATEST, head_only=head_only)
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self._tasks.pop(task, None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def render(self) -> bytes:
        """The exposition text, after `refresh` (a failing refresh costs its own samples
        only: the rest is still served)."""
        async with self._scrape:
            if self._refresh is not None:
                try:
                    await self._refresh()
                except Exception:
                    log.exception("metrics refresh failed; serving the other metrics")
            return generate_latest(self.registry)

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        *,
        head_only: bool = False,
    ) -> None:
        writer.write(response(status, body, content_type, head_only=head_only))
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()


# --------------------------------------------------------------------------- ingest


@dataclass
class CallRecord:
    """What one call stored, filled in by the handler (see `stored`)."""

    kind: str = ""
    readings: int = 0
    bytes: int = 0


_call: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "edged_ingest_call", default=None
)


def stored(kind: str, readings: int, nbytes: int) -> None:
    """A handler committed `readings` new readings (`nbytes` of payload) of `kind`:
    booked on the call in flight (the access line and the counters read it)."""
    record = _call.get()
    if record is not None:
        record.kind, record.readings, record.bytes = kind, readings, nbytes


class IngestMetrics:
    """The ingest server's metrics, in a registry of its own."""

    def __init__(self, access_log_level: int = logging.INFO) -> None:
        self.access_log_level = access_log_level
        r = self.registry = CollectorRegistry()
        self.calls = Counter(
            "edged_ingest_calls",
            "gRPC calls ended, by method and status",
            ["method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "edged_ingest_call_duration_seconds",
            "time from the call's start to its end (uploads and queries), by method",
            ["method"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.received = Counter(
            "edged_ingest_received_bytes",
            "request bytes received, by method",
            ["method"],
            registry=r,
        )
        self.sent = Counter(
            "edged_ingest_sent_bytes", "response bytes sent, by method", ["method"], registry=r
        )
        self.stored_readings = Counter(
            "edged_ingest_stored_readings",
            "readings committed (a binary reading or a file counts one), by kind",
            ["kind"],
            registry=r,
        )
        self.stored_bytes = Counter(
            "edged_ingest_stored_bytes", "payload bytes committed, by kind", ["kind"], registry=r
        )
        self.active_calls = Gauge("edged_ingest_active_calls", "calls in flight", registry=r)
        self.connections = Gauge("edged_ingest_connections", "open connections", registry=r)
        self.refused_connections = Gauge(
            "edged_ingest_refused_connections",
            "connections refused at the connection cap since start",
            registry=r,
        )

        self.retention_runs = Counter(
            "edged_ingest_retention_runs",
            "retention runs (--retention), by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.expired_readings = Counter(
            "edged_ingest_expired_readings",
            "readings removed by retention (rows of dropped partitions included)",
            registry=r,
        )
        self.dropped_partitions = Counter(
            "edged_ingest_dropped_partitions",
            "monthly readings partitions dropped by retention (PostgreSQL)",
            registry=r,
        )

    def retention_ran(self, result: Expired | None) -> None:
        """One retention run (retention.expire_forever): None when it failed."""
        self.retention_runs.labels("failed" if result is None else "ok").inc()
        if result is not None:
            self.expired_readings.inc(result.readings)
            self.dropped_partitions.inc(result.partitions)

    def watch(self, connections: Callable[[], int], refused: Callable[[], int]) -> None:
        """Gauges read at scrape time from the server's own counts."""
        self.connections.set_function(lambda: float(connections()))
        self.refused_connections.set_function(lambda: float(refused()))

    async def observe(
        self,
        inner: Callable[[Any], Awaitable[None]],
        stream: Any,
        method: str,
        org: str,
    ) -> None:
        """Run one call's handler, then count it and write its access line."""
        record = CallRecord()
        _call.set(record)  # this task runs exactly this call's handler
        started = time.monotonic()
        status = Status.UNKNOWN
        self.active_calls.inc()
        try:
            await inner(stream)
            status = Status.OK
        except GRPCError as exc:
            status = exc.status
            raise
        except TimeoutError:
            status = Status.DEADLINE_EXCEEDED
            raise
        except (asyncio.CancelledError, StreamTerminatedError):
            status = _cancel_status(stream)
            raise
        finally:
            self.active_calls.dec()
            h2 = getattr(stream, "_stream", None)  # grpclib's HTTP/2 stream: its byte counts
            self.ended(
                method,
                org,
                peer_name(stream.peer),
                status,
                time.monotonic() - started,
                received=int(getattr(h2, "data_received", 0) or 0),
                sent=int(getattr(h2, "data_sent", 0) or 0),
                record=record,
            )

    def ended(
        self,
        method: str,
        org: str,
        peer: str,
        status: Status,
        seconds: float,
        *,
        received: int = 0,
        sent: int = 0,
        record: CallRecord | None = None,
    ) -> None:
        """Count one finished (or refused) call and write its access line: who, what,
        how it ended; never a header value, so never a key or token."""
        self.calls.labels(method, status.name).inc()
        self.duration.labels(method).observe(seconds)
        self.received.labels(method).inc(received)
        self.sent.labels(method).inc(sent)
        readings = record.readings if record else 0
        if record is not None and record.readings:
            self.stored_readings.labels(record.kind).inc(record.readings)
            self.stored_bytes.labels(record.kind).inc(record.bytes)
        access_log.log(
            self.access_log_level,
            "%s %s org=%r peer=%s %.1f ms in=%d out=%d",
            method,
            status.name,
            org,
            peer,
            seconds * 1000,
            received,
            sent,
            extra={
                "event": "call",
                "method": method,
                "org": org,
                "peer": peer,
                "status": status.name,
                "duration_ms": round(seconds * 1000, 3),
                "bytes_in": received,
                "bytes_out": sent,
                "readings": readings,
            },
        )


def _cancel_status(stream: Any) -> Status:
    """A call cut by the guard (progress timeout) carries its GRPCError on grpclib's
    wrapper; anything else that cancels a call is the client going away."""
    wrapper = getattr(getattr(stream, "_stream", None), "wrapper", None)
    error = getattr(wrapper, "_error", None)
    return error.status if isinstance(error, GRPCError) else Status.CANCELLED


def peer_name(peer: Any) -> str:
    try:
        addr = peer.addr()
    except Exception:  # the connection may be gone already
        return "-"
    return "-" if not addr else f"{addr[0]}:{addr[1]}"
