"""Connection and stream limits of `edged ingest`, hooked into grpclib without forking it.

Promised, for hostile peers:
- A message body is admitted from its 5-byte gRPC prefix, before any of it is read:
  calls without a valid token may send at most `unauth_message_bytes`, others at most
  `max_message_bytes`; admitted bodies draw from byte pools (one for unauthenticated
  calls, one global and one per key for the rest) so N callers cannot multiply the
  largest message. A full pool makes the body wait (the peer is held by HTTP/2 flow
  control) up to the progress timeout, then RESOURCE_EXHAUSTED.
- A connection without an authenticated call has a 64 KiB HTTP/2 receive window and
  16 KiB frames (HTTP/2's smallest; a frame is buffered whole before it is checked) and is
  closed after `unauth_timeout_s` without an open call; its calls must finish within
  that time. Authenticated connections get the full window, 1 MiB frames (so a file
  moves in few frames: 16 KiB ones made framing most of an upload's CPU) and `idle_timeout_s`.
- A call that moves no bytes for `progress_timeout_s` ends with DEADLINE_EXCEEDED (its
  handler's `finally` removes temp files); a key has at most `max_streams_per_key` calls.
- At most `max_connections` connections; at the cap the oldest connection that never
  authenticated makes room (many robots share one NAT address, so no per-address cap).

Not promised: fairness between keys beyond the per-key caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE
from grpclib.exceptions import GRPCError
from grpclib.metadata import encode_grpc_message
from grpclib.protocol import Buffer, H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Handler
from h2.settings import SettingCodes

from edged.ingest.auth import OPEN_KEY, ApiKey, KeyStore
from edged.ingest.flags import flag_field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
UNAUTH_WINDOW = 65_535  # HTTP/2's smallest window: what a stranger may have in flight
AUTH_WINDOW = 4 * MiB  # grpclib's default, granted once a connection authenticates
UNAUTH_FRAME = 16_384  # HTTP/2's smallest SETTINGS_MAX_FRAME_SIZE, until authenticated
AUTH_FRAME = 1 * MiB  # then: below the window, so a frame never waits for a whole window
FD_RESERVE = 256  # SQLite, logs, listening sockets, temp files of in-flight uploads


@dataclass(frozen=True)
class Limits:
    """Every bound a peer meets; defaults are safe for a network server untuned."""

    # The stock SDK sends a whole file as ONE message, so this is far above grpclib's 4 MiB.
    max_message_bytes: int = flag_field(
        512 * MiB, "--max-message-bytes", "largest single gRPC message accepted", "size"
    )
    unauth_message_bytes: int = flag_field(
        64 * KiB,
        "--max-unauth-message-bytes",
        "largest message of a call without a valid token (Authenticate)",
        "size",
    )
    buffer_bytes: int = flag_field(
        1 * GiB, "--max-buffer-bytes", "message bytes buffered at once, all keys", "size"
    )
    buffer_bytes_per_key: int = flag_field(
        512 * MiB, "--max-buffer-bytes-per-key", "message bytes buffered at once per key", "size"
    )
    unauth_buffer_bytes: int = flag_field(
        16 * MiB,
        "--max-unauth-buffer-bytes",
        "message bytes buffered at once for calls without a valid token",
        "size",
    )
    unauth_timeout_s: float = flag_field(
        10.0,
        "--unauth-timeout",
        "seconds a connection without an authenticated call may idle, and an"
        " unauthenticated call may take",
    )
    idle_timeout_s: float = flag_field(
        300.0, "--idle-timeout", "seconds an authenticated connection may idle without calls"
    )
    progress_timeout_s: float = flag_field(
        60.0, "--progress-timeout", "seconds a call may move no bytes before it is ended"
    )
    max_connections: int = flag_field(
        0, "--max-connections", "open connections (0: half the raised descriptor limit)", "int"
    )
    max_streams_per_connection: int = flag_field(
        100, "--max-streams-per-connection", "concurrent calls per connection", "int"
    )
    max_streams_per_key: int = flag_field(
        64, "--max-streams-per-key", "concurrent calls per API key", "int"
    )
    max_header_list_bytes: int = flag_field(
        16 * KiB, "--max-header-list-bytes", "size of a call's headers", "size"
    )

    def problems(self) -> list[str]:
        """Combinations that could never admit a legitimate maximum-size message."""
        out = []
        if self.buffer_bytes_per_key < self.max_message_bytes:
            out.append("--max-buffer-bytes-per-key must be at least --max-message-bytes")
        if self.buffer_bytes < self.buffer_bytes_per_key:
            out.append("--max-buffer-bytes must be at least --max-buffer-bytes-per-key")
        if self.unauth_buffer_bytes < self.unauth_message_bytes:
            out.append("--max-unauth-buffer-bytes must be at least --max-unauth-message-bytes")
        return out


def connections_for(nofile: int) -> int:
    """Connection cap for a descriptor limit: half of what the reserve leaves, so
    every connection can also hold one upload's temp file."""
    return max(16, (nofile - FD_RESERVE) // 2)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def server_config() -> Configuration:
    """grpclib's knobs: a stranger's connection starts with the smallest window."""
    return Configuration(
        http2_connection_window_size=UNAUTH_WINDOW, http2_stream_window_size=AUTH_WINDOW
    )


def exhausted(message: str) -> GRPCError:
    return GRPCError(Status.RESOURCE_EXHAUSTED, message)


class BytePools:
    """Byte budgets for message bodies being buffered: global and per key, plus one for
    unauthenticated calls (key None). Waiters are woken on every release."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._used: dict[str | None, int] = {}
        self._auth_used = 0
        self._waiters: list[asyncio.Future[None]] = []

    def _fits(self, key: str | None, n: int) -> bool:
        lim = self._limits
        if key is None:
            return self._used.get(None, 0) + n <= lim.unauth_buffer_bytes
        return (
            self._auth_used + n <= lim.buffer_bytes
            and self._used.get(key, 0) + n <= lim.buffer_bytes_per_key
        )

    async def acquire(self, key: str | None, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._fits(key, n):
            left = deadline - time.monotonic()
            if left <= 0:
                raise exhausted(
                    "the server is buffering too many large messages; retry later"
                    " (--max-buffer-bytes)"
                )
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), left)
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
        self._used[key] = self._used.get(key, 0) + n
        if key is not None:
            self._auth_used += n

    def release(self, key: str | None, n: int) -> None:
        if not n:
            return
        self._used[key] -= n
        if not self._used[key]:
            del self._used[key]
        if key is not None:
            self._auth_used -= n
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def used(self, key: str | None) -> int:
        return self._used.get(key, 0)


class Call:
    """One HTTP/2 stream as the guard sees it: who calls, what it holds, its progress."""

    def __init__(self, stream: H2Stream, key: ApiKey | None, guard: Guard, now: float) -> None:
        self.stream = stream
        self.key = key  # None: no valid token (only Authenticate can succeed)
        self.guard = guard
        self.started = now
        self.progress_at = now
        self.moved = 0
        self.held = 0

    @property
    def pool_key(self) -> str | None:
        return None if self.key is None else self.key.key_id

    async def admit(self, size: int) -> None:
        """Called with a message's declared size before its body is read."""
        self.release_held()
        lim = self.guard.limits
        if self.key is None and size > lim.unauth_message_bytes:
            raise exhausted(
                f"message of {size} bytes exceeds the limit of {lim.unauth_message_bytes}"
                " bytes for calls without a valid token (--max-unauth-message-bytes)"
            )
        if size > lim.max_message_bytes:
            # INVALID_ARGUMENT: it can never fit, so the client dead-letters it.
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"message of {size} bytes exceeds the server's limit of"
                f" {lim.max_message_bytes} bytes (--max-message-bytes)",
            )
        await self.guard.pools.acquire(self.pool_key, size, lim.progress_timeout_s)
        self.held = size

    def release_held(self) -> None:
        self.guard.pools.release(self.pool_key, self.held)
        self.held = 0

    def expired(self, now: float) -> str | None:
        """Why this call must end now, or None (pure but for the progress bookkeeping)."""
        lim = self.guard.limits
        if self.key is None and now - self.started > lim.unauth_timeout_s:
            return (
                f"calls without a valid token must finish within {lim.unauth_timeout_s:g} s"
                " (--unauth-timeout)"
            )
        moved = self.stream.data_received + self.stream.data_sent
        if moved != self.moved:
            self.moved, self.progress_at = moved, now
        elif now - self.progress_at > lim.progress_timeout_s:
            return f"no bytes moved for {lim.progress_timeout_s:g} s (--progress-timeout)"
        return None


class FramedBuffer(Buffer):
    """grpclib's stream buffer, reading a body only once its declared size is admitted.

    grpclib reads a message as read(5) (the prefix) then read(length), so the prefix is
    where the size is known and nothing of the body has been acknowledged yet."""

    def __init__(self, ack: Callable[[int], None], call: Call) -> None:
        super().__init__(ack)
        self._call = call
        self._body = 0

    async def read(self, size: int) -> bytes:
        if self._body or size != 5:
            self._body = 0
            return await super().read(size)
        data = await super().read(5)
        if len(data) == 5:
            declared = int.from_bytes(data[1:], "big")
            await self._call.admit(declared)
            self._body = declared
        return data


async def _refuse(stream: H2Stream, release: Callable[[], Any], error: GRPCError) -> None:
    """A trailers-only reply for a call we will not start (grpclib's own `_abort` shape)."""
    try:
        await stream.send_headers(
            [
                (":status", "200"),
                ("content-type", GRPC_CONTENT_TYPE + "+proto"),
                ("grpc-status", str(error.status.value)),
                ("grpc-message", encode_grpc_message(error.message or "")),
            ],
            end_stream=True,
        )
        if stream.closable:
            stream.reset_nowait()
    except Exception:  # the peer may be gone: nothing to tell it then
        pass
    finally:
        release()


class GuardedHandler(Handler):
    """grpclib's per-connection handler, registering each call with the guard first."""

    conn: GuardedConnection

    def __init__(self, guard: Guard, *args: Any) -> None:
        super().__init__(*args)
        self._guard = guard

    def accept(
        self, stream: H2Stream, headers: list[tuple[str, str]], release_stream: Callable[[], Any]
    ) -> None:
        call, refusal = self._guard.open_call(self.conn, stream, dict(headers))
        if refusal is not None:
            self._tasks[stream] = self.loop.create_task(_refuse(stream, release_stream, refusal))
            return
        assert call is not None and stream.id is not None
        stream.buffer = FramedBuffer(partial(stream.connection.ack, stream.id), call)

        def release() -> None:
            self._guard.close_call(self.conn, call)
            release_stream()

        super().accept(stream, headers, release)


class GuardedConnection(H2Protocol):
    """grpclib's protocol plus what the guard tracks per connection."""

    def __init__(self, guard: Guard, handler: GuardedHandler, *args: Any) -> None:
        super().__init__(handler, *args)
        handler.conn = self
        self._guard = guard
        self.calls: set[Call] = set()
        self.authenticated = False
        self.idle_since = time.monotonic()
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        h2 = self.connection._connection
        lim = self._guard.limits
        h2.update_settings(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_streams_per_connection,
                SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list_bytes,
                SettingCodes.MAX_FRAME_SIZE: UNAUTH_FRAME,
            }
        )
        self.connection.flush()
        self._guard.connection_made(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self._guard.connection_lost(self)
        super().connection_lost(exc)

    def grant_window(self) -> None:
        """Open the full receive window and allow large frames once the connection carries
        a valid token."""
        if self.authenticated or self.closed:
            return
        self.authenticated = True
        h2 = self.connection._connection
        h2.increment_flow_control_window(AUTH_WINDOW - UNAUTH_WINDOW)
        h2.update_settings({SettingCodes.MAX_FRAME_SIZE: AUTH_FRAME})
        # h2 applies a local setting when the peer acknowledges it, and checks a read's
        # frames against the limit in force when the read began: a peer that sends a
        # large frame right behind its ACK would be cut off. Accept them from now on.
        h2.max_inbound_frame_size = AUTH_FRAME
        self.connection.flush()

    def shut(self) -> None:
        """GOAWAY, then close: a well-behaved client reconnects for its next call."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self.connection._connection.close_connection()
            self.connection.flush()
        self.connection.close()


class Guard:
    """Owns the counts behind every limit; `sweep()` enforces the timeouts."""

    def __init__(self, limits: Limits, keys: KeyStore, max_connections: int) -> None:
        self.limits = limits
        self.keys = keys
        self.max_connections = max_connections
        self.pools = BytePools(limits)
        self.connections: OrderedDict[GuardedConnection, None] = OrderedDict()
        self.per_key: dict[str, int] = {}
        self.refused_connections = 0

    # -- connections --------------------------------------------------------------
    def connection_made(self, conn: GuardedConnection) -> None:
        if len(self.connections) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self.refused_connections += 1
                conn.shut()
                return
            victim.shut()
            self.connections.pop(victim, None)
        self.connections[conn] = None

    def _victim(self) -> GuardedConnection | None:
        """The oldest connection that never authenticated, idle ones first."""
        strangers = [c for c in self.connections if not c.authenticated]
        idle = [c for c in strangers if not c.calls]
        candidates = idle or strangers
        return candidates[0] if candidates else None

    def connection_lost(self, conn: GuardedConnection) -> None:
        self.connections.pop(conn, None)
        for call in list(conn.calls):
            self.close_call(conn, call)

    # -- calls --------------------------------------------------------------------
    def open_call(
        self, conn: GuardedConnection, stream: H2Stream, headers: dict[str, str]
    ) -> tuple[Call | None, GRPCError | None]:
        auth = headers.get("authorization")
        key = self.keys.peek(auth) if self.keys.enabled else OPEN_KEY
        if key is not None:
            count = self.per_key.get(key.key_id, 0)
            if count >= self.limits.max_streams_per_key:
                return None, exhausted(
                    f"key has {count} calls open, the limit (--max-streams-per-key); retry"
                    " when one finishes"
                )
            self.per_key[key.key_id] = count + 1
            conn.grant_window()
        call = Call(stream, key, self, time.monotonic())
        conn.calls.add(call)
        return call, None

    def close_call(self, conn: GuardedConnection, call: Call) -> None:
        if call not in conn.calls:
            return
        conn.calls.discard(call)
        call.release_held()
        if call.key is not None:
            left = self.per_key[call.key.key_id] - 1
            if left:
                self.per_key[call.key.key_id] = left
            else:
                del self.per_key[call.key.key_id]
        if not conn.calls:
            conn.idle_since = time.monotonic()

    # -- timeouts -----------------------------------------------------------------
    def sweep(self, now: float) -> None:
        lim = self.limits
        for conn in list(self.connections):
            for call in list(conn.calls):
                reason = call.expired(now)
                wrapper = call.stream.wrapper
                if reason is not None and wrapper is not None and not wrapper.cancelled:
                    wrapper.cancel(GRPCError(Status.DEADLINE_EXCEEDED, reason))
            idle_limit = lim.idle_timeout_s if conn.authenticated else lim.unauth_timeout_s
            if not conn.calls and now - conn.idle_since > idle_limit:
                conn.shut()
                self.connections.pop(conn, None)

    def tick_s(self) -> float:
        lim = self.limits
        shortest = min(lim.unauth_timeout_s, lim.idle_timeout_s, lim.progress_timeout_s)
        return min(1.0, max(0.02, shortest / 4))

    async def run(self) -> None:
        """Sweep until cancelled."""
        while True:
            await asyncio.sleep(self.tick_s())
            self.sweep(time.monotonic())
