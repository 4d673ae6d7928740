"""The one connection to an ingest/DataSync server: channel, TLS, API key -> bearer
token, re-authentication and replay, and gRPC status -> `UploadError` mapping.

Everything that talks to a server (the daemon's uploader, `edged query`, the SDK's
`DataClient`) gets its connection from `connect()`, so each of these exists once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Self, TypedDict, TypeVar

from google.protobuf.message import Message
from grpclib.client import Channel, Handler, Stream
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from h2.exceptions import ProtocolError as H2ProtocolError

from edged._proto.proto.rpc.v1 import auth_pb2
from edged.errors import AuthError, UploadError
from edged.protocol import ITEM_ID_KEY
from edged.wire.progress import StreamSample, progressed, watch_interval

try:  # Linux: bytes of a socket not yet acknowledged by the peer
    import fcntl
    import termios

    _TIOCOUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere: judged without the kernel queue
    _TIOCOUTQ = None

UNSENT_BYTES = 64 * 1024
"""Bytes of a connection our kernel may hold not yet sent (TCP_NOTSENT_LOWAT), about one
streamed chunk: a call started behind a big upload waits for that much, not for the
kernel's send buffer (megabytes once autotuned), before its frames go out."""
BUFFERED_BYTES = 16 * 1024
"""asyncio's write-buffer high-water mark for a connection (its default is 64 KiB): past
it grpclib's writers wait, so at most one message lies above the kernel's backlog."""
DATASYNC = "/viam.app.datasync.v1.DataSyncService/"
_AUTH = "/proto.rpc.v1.AuthService/Authenticate"
_AUTH_STATUSES = (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED)

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Msg = TypeVar("_Msg", bound=Message)
_C = TypeVar("_C", bound="Connection")


class Raw:
    """An already-encoded message body; the codec passes it through untouched."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Codec(ProtoCodec):
    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, Raw):
            return message.data
        return super().encode(message, message_type)


def parse_address(address: str, default_port: int = 443) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or bare host; a scheme prefix is tolerated."""
    rest = address.split("://", 1)[-1].rstrip("/")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host:
        raise ValueError(f"address {address!r} has no host")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"address {address!r} has a port that is not a number") from None


def client_tls_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifying context (system roots, or `ca_file`); gRPC needs ALPN h2."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    return ctx


def bound_backlog(transport: asyncio.BaseTransport) -> bool:
    """Keep a connection's send backlog short, so one call's bytes cannot queue ahead of
    a later call's by much more than UNSENT_BYTES: every HTTP/2 stream shares the one TCP
    connection, and grpclib only waits for flow-control windows (`edged ingest` grants
    4 MiB) and for asyncio's transport to resume writing. Two levers below grpclib:
    - the kernel takes at most UNSENT_BYTES not yet sent (TCP_NOTSENT_LOWAT; Linux,
      macOS), instead of a send buffer autotuned to megabytes; bytes in flight are not
      limited (the congestion window governs them), so a fast link keeps its throughput;
    - the transport pauses grpclib once it holds BUFFERED_BYTES the kernel did not take
      (not 0: TLS transports pause at `size >= high`, and would never resume).
    Over TLS the socket transport under the TLS layer keeps asyncio's default 64 KiB.
    Returns False where the kernel option is missing (the backlog is then the send buffer)."""
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=BUFFERED_BYTES)
    sock = transport.get_extra_info("socket")
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, UNSENT_BYTES)
    except OSError:
        return False
    return True


class _Protocol(H2Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # first: a pause may come at once
        bound_backlog(transport)


class _Channel(Channel):
    """grpclib's channel whose connections keep their send backlog short (`bound_backlog`)."""

    def _protocol_factory(self) -> H2Protocol:
        return _Protocol(Handler(), self._config, self._h2_config)


def _kernel_queued(transport: asyncio.BaseTransport) -> int:
    """Bytes our kernel still holds for the connection (unsent or unacknowledged)."""
    sock = transport.get_extra_info("socket")
    if sock is None or _TIOCOUTQ is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):  # closed meanwhile
        return 0
    return max(0, int.from_bytes(raw, sys.byteorder, signed=True))


def _stream_sample(stream: Stream[Any, Any], holding: bool = False) -> StreamSample | None:
    """The one place that reaches into grpclib's call (its HTTP/2 stream, h2's window and
    the asyncio transport) to see whether the call moves; None until the stream is open."""
    h2s = getattr(stream, "_stream", None)
    if h2s is None or h2s.id is None:
        return None
    try:
        window = h2s._h2_connection.local_flow_control_window(h2s.id)
    except H2ProtocolError:  # closed: no more credit to come
        window = 0
    transport = h2s._transport
    queued = 0
    if not transport.is_closing():
        queued = transport.get_write_buffer_size() + _kernel_queued(transport)
    return StreamSample(
        sent=h2s.data_sent,
        credit=h2s.data_sent + window,
        queued=queued,
        received=h2s.data_received + (h2s.headers is not None),
        holding=holding,
    )


class _Stalled(Exception):
    """A stream made no progress for its limit (turned into an UploadError by `_call`)."""


@contextlib.asynccontextmanager
async def _progress_deadline(
    stream: Stream[Any, Any], limit_s: float, holding: Callable[[], bool] | None = None
) -> AsyncIterator[None]:
    """Cut the call once `stream` has not moved for `limit_s` (policy.progressed), however
    long it takes overall: a rate guess fails big files on links slower than the guess.
    `holding` says the sender waits on the bandwidth cap (not a stall). Sampling is a
    timer callback, so there is no task to leak."""
    loop = asyncio.get_running_loop()
    every = watch_interval(limit_s)
    last: StreamSample | None = None
    handle: asyncio.TimerHandle | None = None
    deadline = asyncio.timeout(limit_s)

    def tick() -> None:
        nonlocal last, handle
        sample = _stream_sample(stream, holding is not None and holding())
        if progressed(last, sample) and not deadline.expired():
            deadline.reschedule(loop.time() + limit_s)
        last = sample or last
        handle = loop.call_later(every, tick)

    try:
        async with deadline:
            handle = loop.call_later(every, tick)
            try:
                yield
            finally:
                handle.cancel()
    except TimeoutError:
        if deadline.expired():
            raise _Stalled from None
        raise


def _as_upload_error(exc: BaseException, item_id: str | None, call: str = "upload") -> UploadError:
    if isinstance(exc, GRPCError):
        cls = AuthError if exc.status in _AUTH_STATUSES else UploadError
        return cls(exc.status, exc.message or exc.status.name, item_id=item_id, call=call)
    if isinstance(exc, asyncio.TimeoutError):
        return UploadError(
            Status.DEADLINE_EXCEEDED,
            "call deadline exceeded",
            item_id=item_id,
            call=call,
            transport=True,
        )
    detail = str(exc) or type(exc).__name__
    return UploadError(
        Status.UNAVAILABLE,
        f"transport error: {detail}",
        item_id=item_id,
        call=call,
        transport=True,
    )


_TRANSPORT_ERRORS = (
    GRPCError,
    asyncio.TimeoutError,
    StreamTerminatedError,
    ProtocolError,
    ConnectionError,
    OSError,
)


class Reach(TypedDict, total=False):
    """How a `Connection` reaches and signs in to its server: its keyword arguments
    after the address, for subclasses that add their own (`UploadClient`)."""

    api_key_id: str | None
    api_key: str | None
    tls: bool
    ca_file: Path | None
    timeout: float | None


class Connection:
    """One connection to a DataSync server; safe for concurrent calls from many tasks."""

    def __init__(
        self,
        address: str,
        *,
        api_key_id: str | None = None,
        api_key: str | None = None,
        tls: bool = True,
        ca_file: Path | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        if (api_key_id is None) != (api_key is None):
            raise ValueError("api_key_id and api_key go together")
        self.address = address
        host, port = parse_address(address)
        ctx = client_tls_context(ca_file) if tls else None
        self._channel = _Channel(host, port, ssl=ctx, codec=_Codec())
        self._key_id = api_key_id
        self._key = api_key
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self.timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @property
    def channel(self) -> Channel:
        """The connection, for stubs of other services on the same server (query API)."""
        return self._channel

    async def metadata(self) -> dict[str, str]:
        """Call metadata carrying the bearer token (authenticating first if needed)."""
        return await self._metadata(None)

    # -- auth ---------------------------------------------------------------------------

    def set_api_key(self, api_key_id: str, api_key: str) -> None:
        """Use this key from the next call on (the daemon re-reads its key on resume and
        reload); a changed key drops the old key's token."""
        if (api_key_id, api_key) != (self._key_id, self._key):
            self._key_id, self._key, self._token = api_key_id, api_key, None

    async def authenticate(self) -> None:
        """Trade the API key for a bearer token (done lazily before the first call)."""
        if self._key_id is None or self._key is None:
            return
        req = auth_pb2.AuthenticateRequest(
            entity=self._key_id,
            credentials=auth_pb2.Credentials(type="api-key", payload=self._key),
        )
        try:
            async with self._channel.request(
                _AUTH,
                Cardinality.UNARY_UNARY,
                auth_pb2.AuthenticateRequest,
                auth_pb2.AuthenticateResponse,
                timeout=self.timeout,
            ) as stream:
                await stream.send_message(req, end=True)
                reply = await stream.recv_message()
        except _TRANSPORT_ERRORS as exc:
            raise _as_upload_error(exc, None) from exc
        if reply is None or not reply.access_token:
            raise AuthError(Status.UNAUTHENTICATED, "server returned no access token")
        self._token = reply.access_token

    async def _metadata(self, item_id: str | None) -> dict[str, str]:
        md: dict[str, str] = {}
        if self._key_id is not None:
            async with self._auth_lock:
                if self._token is None:
                    await self.authenticate()
            md["authorization"] = f"Bearer {self._token}"
        if item_id:
            md[ITEM_ID_KEY] = item_id
        return md

    async def _call(
        self,
        method: str,
        req_type: type[_Req],
        resp_type: type[_Resp],
        send: Callable[[Stream[_Req, _Resp]], Awaitable[None]],
        *,
        item_id: str | None,
        timeout: float | None,
        cardinality: Cardinality = Cardinality.UNARY_UNARY,
        replayable: bool = True,
        progress: bool = False,
        holding: Callable[[], bool] | None = None,
    ) -> _Resp:
        """One call; on UNAUTHENTICATED with a stale token, re-authenticate and replay once
        (only when `send` can run again: a consumed async source cannot).

        `method` is a DataSync method name, or a full `/package.Service/Method` path.
        `timeout` (None: the connection's) bounds the whole call, or with `progress` only
        a stall: the call fails once it has not moved for that long (client streams,
        whose length has no bound); while `holding()` is true the sender waits on the
        bandwidth cap, which is no stall."""
        path = method if method.startswith("/") else DATASYNC + method
        timeout = timeout if timeout is not None else self.timeout
        call = "upload" if path.startswith(DATASYNC) else path.rsplit("/", 1)[-1]
        for attempt in (1, 2):
            token_used = self._token
            md = await self._metadata(item_id)
            try:
                request = self._channel.request(
                    path,
                    cardinality,
                    req_type,
                    resp_type,
                    timeout=None if progress else timeout,
                    metadata=md,
                )
                guard = (
                    _progress_deadline(request, timeout, holding)
                    if progress and timeout is not None
                    else contextlib.nullcontext()
                )
                async with guard, request as stream:
                    await send(stream)
                    reply = await stream.recv_message()
                if reply is None:
                    raise UploadError(
                        Status.UNKNOWN, "server sent no reply", item_id=item_id, call=call
                    )
                return reply
            except GRPCError as exc:
                if exc.status is Status.UNAUTHENTICATED and attempt == 1 and token_used:
                    async with self._auth_lock:
                        if self._token == token_used:
                            self._token = None
                    if not replayable:
                        raise UploadError(
                            Status.UNAVAILABLE,
                            "the access token expired mid-stream and an async source cannot be"
                            " replayed; call again (a new token is fetched)",
                            item_id=item_id,
                            call=call,
                        ) from exc
                    continue
                raise _as_upload_error(exc, item_id, call) from exc
            except _Stalled:
                raise UploadError(
                    Status.DEADLINE_EXCEEDED,
                    f"no upload progress for {timeout:g}s",
                    item_id=item_id,
                    call=call,
                    transport=True,
                ) from None
            except _TRANSPORT_ERRORS as exc:
                raise _as_upload_error(exc, item_id, call) from exc
        raise AssertionError("unreachable")

    async def unary(
        self,
        path: str,
        request: Message | Raw,
        resp_type: type[_Msg],
        *,
        item_id: str | None = None,
        timeout: float | None = None,
    ) -> _Msg:
        """One unary call to any service on this server (the query API, a tabular
        upload), with the same authentication, replay and error mapping as uploads.
        `path` as `_call`'s `method`; a `Raw` request goes as it is encoded."""

        async def send(stream: Stream[Message | Raw, _Msg]) -> None:
            await stream.send_message(request, end=True)

        return await self._call(
            path, type(request), resp_type, send, item_id=item_id, timeout=timeout
        )


def connect(address: str, *, kind: type[_C], **options: Any) -> _C:
    """The one way to a server: API key -> channel -> (lazy) authentication, for the
    daemon, `edged query`, `DataClient.from_config` and SDK scripts alike. `kind` is the
    connection class to build (`Connection`, or the client's `UploadClient`/`DataClient`,
    which take `options` such as `chunk_size`). The key itself comes from the caller
    (`edged.wire.keyfile` resolves EDGED_API_KEY or a key file). Authentication (lazy,
    or at once via `authenticate()`), re-authentication on an expired token, and status
    -> `UploadError` mapping then happen on every call the connection makes."""
    return kind(address, **options)
