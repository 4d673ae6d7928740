"""`edged ingest`: the reference DataSync + auth server on grpclib, with the query API
(DataService, DatasetService) over what it stored.

Shutdown is two-stage like grpclib's own advice: refuse new calls with UNAVAILABLE
(clients retry elsewhere or later), let in-flight uploads finish within a grace
period, then close connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from edged.errors import ConfigError
from edged.ingest import retention
from edged.ingest.auth import ApiKey, AuthLimits, AuthService, KeyStore
from edged.ingest.blobs import open_blob_store, sweep_forever
from edged.ingest.datasets import DatasetService
from edged.ingest.datasync import DataSyncService
from edged.ingest.guard import (
    Guard,
    GuardedConnection,
    GuardedHandler,
    Limits,
    connections_for,
    raise_nofile_limit,
    server_config,
)
from edged.ingest.limits import QueryLimits, QueryRunner, set_sqlite_heap_limit
from edged.ingest.metrics import IngestMetrics, MetricsServer, peer_name
from edged.ingest.query import DataQueryService
from edged.ingest.storage import IngestStore

MiB = 1024 * 1024


@dataclass(frozen=True)
class IngestSettings:
    data_dir: Path
    blobs: str | None = None  # s3://BUCKET[/PREFIX]; None: blobs under data_dir
    s3_endpoint: str | None = None  # an S3-compatible endpoint URL; None: AWS S3
    database: str | None = None  # postgresql:// URL: the index there (pg.py), not in data_dir
    migrate: bool = True  # False (--no-migrate): refuse an index at another schema version
    retention_s: float | None = None  # --retention: readings older go (retention.py); None: off
    retention_interval_s: float = retention.INTERVAL_S
    clock: Callable[[], float] = time.time  # the wall clock retention measures from
    host: str = "127.0.0.1"
    port: int = 0
    keys: tuple[ApiKey, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_upload_bytes: int = 64 * 1024 * MiB
    shutdown_grace_s: float = 10.0
    synchronous: str = "FULL"
    query_limits: QueryLimits = field(default_factory=QueryLimits)
    extra_hooks: tuple[Callable[[RecvRequest], Coroutine[Any, Any, None]], ...] = field(default=())
    limits: Limits = field(default_factory=Limits)
    auth: AuthLimits = field(default_factory=AuthLimits)
    metrics_listen: tuple[str, int] | None = None  # (host, port) of /metrics; None: off
    access_log_level: int = logging.INFO  # one line per call (metrics.IngestMetrics.ended)


class _RequestCodec(ProtoCodec):
    """Sizes are checked before buffering (guard.py); this maps undecodable bodies."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        return decode_request(data, message_type)


def decode_request(data: bytes, message_type: Any) -> Any:
    """A request that is not a valid message of its type is INVALID_ARGUMENT (grpclib would
    let protobuf's DecodeError surface as UNKNOWN)."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"the request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc})",
        ) from None


class _Server(Server):
    """grpclib's server with our guard on every connection (see guard.py); also tracks
    connections, because grpclib's close() leaves accepted ones open."""

    def __init__(self, handlers: list[Any], guard: Guard) -> None:
        super().__init__(handlers, codec=_RequestCodec(), config=server_config())
        self._guard = guard
        self._protocols: weakref.WeakSet[Any] = weakref.WeakSet()

    def _protocol_factory(self) -> Any:
        self.__gc_step__()
        handler = GuardedHandler(
            self._guard, self._mapping, self._codec, self._status_details_codec, self.__dispatch__
        )
        self._handlers.add(handler)
        proto = GuardedConnection(self._guard, handler, self._config, self._h2_config)
        self._protocols.add(proto)
        return proto

    def close_connections(self) -> None:
        for proto in list(self._protocols):
            conn = getattr(proto, "connection", None)  # absent if the handshake never finished
            if conn is not None:
                conn.close()


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


class IngestServer:
    """Owns the store and the gRPC server; use as `async with IngestServer(settings)`."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.keys = KeyStore(list(settings.keys), settings.auth)
        self.guard: Guard | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._blob_sweeper: asyncio.Task[None] | None = None
        self._expirer: asyncio.Task[None] | None = None
        self._store: IngestStore | None = None
        self._server: _Server | None = None
        self._runner: QueryRunner | None = None
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.port = settings.port
        self.metrics = IngestMetrics(settings.access_log_level)
        self.metrics_server: MetricsServer | None = None

    @property
    def store(self) -> IngestStore:
        assert self._store is not None, "server not started"
        return self._store

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.settings.tls_cert is not None

    async def start(self) -> None:
        s = self.settings
        blobs = open_blob_store(s.blobs, s.data_dir.absolute(), s.s3_endpoint)
        self._store = await IngestStore.open(
            s.data_dir,
            synchronous=s.synchronous,
            database=s.database,
            blobs=blobs,
            migrate=s.migrate,
        )
        if self._store.dialect == "postgresql":  # replicas accept each other's tokens
            from edged.ingest.pg import PgIndex, PgTokens

            assert isinstance(self._store.index, PgIndex)
            self.keys.shared = PgTokens(self._store.index)
        self._blob_sweeper = asyncio.create_task(
            sweep_forever(self._store.blobs, self._store.indexed_file_ids)
        )
        if s.retention_s is not None:
            self._expirer = asyncio.create_task(
                retention.expire_forever(
                    self._store.expire_readings,
                    s.retention_s,
                    clock=s.clock,
                    on_run=self.metrics.retention_ran,
                    interval_s=s.retention_interval_s,
                )
            )
        set_sqlite_heap_limit(s.query_limits.sqlite_heap_bytes)
        self._runner = QueryRunner(s.query_limits)
        handlers: list[Any] = [
            AuthService(self.keys),
            DataSyncService(self._store, self.keys, max_upload_bytes=s.max_upload_bytes),
            DataQueryService(self._store, self.keys, lambda: self.address, self._runner),
            DatasetService(self._store, self.keys),
        ]
        self.guard = self._make_guard()
        self._server = _Server(handlers, self.guard)
        listen(self._server, RecvRequest, self._on_request)
        for hook in s.extra_hooks:
            listen(self._server, RecvRequest, hook)
        ctx = server_tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        await self._server.start(s.host, s.port, ssl=ctx)
        self._sweeper = asyncio.create_task(self.guard.run())
        sockets = getattr(self._server._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        guard = self.guard
        self.metrics.watch(lambda: len(guard.connections), lambda: guard.refused_connections)
        if s.metrics_listen is not None:
            self.metrics_server = MetricsServer(self.metrics.registry, *s.metrics_listen)
            await self.metrics_server.start()

    def _make_guard(self) -> Guard:
        """The guard and its connection cap (from the raised descriptor limit if unset)."""
        limits = self.settings.limits
        problems = limits.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        cap = limits.max_connections or connections_for(raise_nofile_limit())
        return Guard(limits, self.keys, cap)

    async def _on_request(self, event: RecvRequest) -> None:
        """The one place every call passes: drain/auth refusals, in-flight count, and
        (in `IngestMetrics.observe`) the call's metrics and access line."""
        method = event.method_name
        auth = event.metadata.get("authorization")
        key = self.keys.peek(auth if isinstance(auth, str) else None)
        org = key.org_id if key is not None else "" if not self.keys.enabled else "-"
        try:
            if self._draining:
                raise GRPCError(Status.UNAVAILABLE, "server is shutting down; retry later")
            await self.keys.on_request(event)
        except GRPCError as exc:
            self.metrics.ended(method, org, peer_name(event.peer), exc.status, 0.0)
            raise
        inner = event.method_func

        async def tracked(stream: Any) -> None:
            self._inflight += 1
            self._idle.clear()
            try:
                await self.metrics.observe(inner, stream, method, org)
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()

        event.method_func = tracked

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, wait for in-flight ones up to the grace period, then close."""
        if self._server is None:
            return
        self._draining = True
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._blob_sweeper is not None:
            self._blob_sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._blob_sweeper
            self._blob_sweeper = None
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
            self._expirer = None
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self._server.close()
        # Close connections before waiting: since Python 3.12.1, asyncio's Server.wait_closed
        # also waits for every accepted connection, so an idle client would hold it forever.
        self._server.close_connections()
        await self._server.wait_closed()
        self._server = None
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> IngestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
