"""`edged ingest`: the reference DataSync + auth server on grpclib, with the query API
(DataService, DatasetService) over what it stored.

Shutdown is two-stage like grpclib's own advice: refuse new calls with UNAVAILABLE
(clients retry elsewhere or later), let in-flight uploads finish within a grace
period, then close connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from edged.ingest.auth import ApiKey, AuthService, KeyStore
from edged.ingest.datasets import DatasetService
from edged.ingest.datasync import DataSyncService
from edged.ingest.query import DataQueryService
from edged.ingest.storage import IngestStore

MiB = 1024 * 1024


@dataclass(frozen=True)
class IngestSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    keys: tuple[ApiKey, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The stock SDK sends a whole file as ONE message, so this is far above grpclib's 4 MiB.
    max_message_bytes: int = 512 * MiB
    max_upload_bytes: int = 64 * 1024 * MiB
    shutdown_grace_s: float = 10.0
    synchronous: str = "FULL"
    extra_hooks: tuple[Callable[[RecvRequest], Coroutine[Any, Any, None]], ...] = field(default=())


class _LimitedCodec(ProtoCodec):
    """Refuses over-size messages with INVALID_ARGUMENT naming the limit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self._limit:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"message of {len(data)} bytes exceeds the server's limit of {self._limit}"
                " bytes (--max-message-bytes)",
            )
        return super().decode(data, message_type)


class _Server(Server):
    """grpclib's close() leaves accepted connections open; we track and close them."""

    def __init__(self, handlers: list[Any], codec: ProtoCodec) -> None:
        super().__init__(handlers, codec=codec)
        self._protocols: weakref.WeakSet[Any] = weakref.WeakSet()

    def _protocol_factory(self) -> Any:
        proto = super()._protocol_factory()
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
        self.keys = KeyStore(list(settings.keys))
        self._store: IngestStore | None = None
        self._server: _Server | None = None
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.port = settings.port

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
        self._store = await IngestStore.open(s.data_dir, synchronous=s.synchronous)
        handlers: list[Any] = [
            AuthService(self.keys),
            DataSyncService(self._store, self.keys, max_upload_bytes=s.max_upload_bytes),
            DataQueryService(self._store, self.keys, lambda: self.address),
            DatasetService(self._store, self.keys),
        ]
        self._server = _Server(handlers, _LimitedCodec(s.max_message_bytes))
        listen(self._server, RecvRequest, self._on_request)
        for hook in s.extra_hooks:
            listen(self._server, RecvRequest, hook)
        ctx = server_tls_context(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        await self._server.start(s.host, s.port, ssl=ctx)
        sockets = getattr(self._server._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def _on_request(self, event: RecvRequest) -> None:
        if self._draining:
            raise GRPCError(Status.UNAVAILABLE, "server is shutting down; retry later")
        await self.keys.on_request(event)
        inner = event.method_func

        async def tracked(stream: Any) -> None:
            self._inflight += 1
            self._idle.clear()
            try:
                await inner(stream)
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
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self._server.close()
        # Close connections before waiting: since Python 3.12.1, asyncio's Server.wait_closed
        # also waits for every accepted connection, so an idle client would hold it forever.
        self._server.close_connections()
        await self._server.wait_closed()
        self._server = None
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> IngestServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
