"""API keys and bearer tokens for `edged ingest`.

The wire handshake is the public RPC auth service: the client trades
(key id, key) for an access token once, then sends `authorization: Bearer <token>`
on every call. Tokens are random and live in memory only: after a restart clients
get UNAUTHENTICATED once and re-authenticate, which the client handles. Replicas on
one PostgreSQL index also publish each token's digest there (`SharedTokens`), so a
token issued by one replica is accepted by every replica holding the same key.

Promised (limits in `AuthLimits`): a token lives at most `token_ttl_s` (1 h by
default; clients re-authenticate transparently); a key has at most
`max_tokens_per_key` live tokens (the oldest is evicted); a token dies with its key (a
token of a key that is no longer loaded is invalid); tokens are found by their digest
(no scan, nothing timing-sensitive); failed attempts are throttled (`FailureThrottle`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from grpclib.const import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2
from edged.errors import ConfigError
from edged.ingest.flags import flag_field

_log = logging.getLogger(__name__)
AUTH_METHOD = "/proto.rpc.v1.AuthService/Authenticate"
API_KEY_TYPE = "api-key"
# Stock keys are 32 characters; anything shorter can be guessed or was mistyped.
MIN_KEY_LENGTH = 32


@dataclass(frozen=True)
class ApiKey:
    """A key and what it may reach: one organisation (queries are scoped to it) and the
    location stamped on what it uploads. An open server (no keys) serves org "" only."""

    key_id: str
    secret: str
    org_id: str = ""
    location_id: str = ""


OPEN_KEY = ApiKey("", "", "", "")


def short_key_problem(secret: str) -> str | None:
    """Why a configured key is too weak to serve, or None; one place for the rule."""
    if len(secret) < MIN_KEY_LENGTH:
        return (
            f"holds a key of {len(secret)} characters; keys must have at least"
            f" {MIN_KEY_LENGTH} (e.g. `openssl rand -hex 32`)"
        )
    return None


@dataclass(frozen=True)
class AuthLimits:
    """Token lifetime and count, and the failed-attempt budgets (see FailureThrottle)."""

    token_ttl_s: float = flag_field(
        3600.0, "--token-ttl", "seconds a bearer token lives (clients re-authenticate)"
    )
    max_tokens_per_key: int = flag_field(
        32, "--max-tokens-per-key", "live tokens per key; the oldest is evicted", "int"
    )
    fail_burst: int = flag_field(
        10, "--auth-fail-burst", "failed authentications per key id before throttling", "int"
    )
    fail_per_s: float = flag_field(
        0.2, "--auth-fail-rate", "failed authentications per second per key id, sustained"
    )
    fail_global_burst: int = flag_field(
        100, "--auth-fail-global-burst", "failed authentications, all ids, before throttling", "int"
    )
    fail_global_per_s: float = flag_field(
        10.0, "--auth-fail-global-rate", "failed authentications per second, all ids, sustained"
    )
    fail_delay_s: float = flag_field(
        1.0, "--auth-fail-delay", "seconds a throttled failure is held before its answer"
    )
    fail_max_delayed: int = flag_field(
        64,
        "--auth-fail-max-delayed",
        "throttled attempts held at once; beyond, attempts are refused unverified",
        "int",
    )


@dataclass
class _Bucket:
    tokens: float
    at: float


def take(bucket: _Bucket, now: float, burst: int, per_s: float) -> bool:
    """Refill by elapsed time, then spend one token if there is one."""
    bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * per_s)
    bucket.at = now
    if bucket.tokens >= 1.0:
        bucket.tokens -= 1.0
        return True
    return False


@dataclass
class FailureThrottle:
    """Slows wrong-key floods without ever locking out the right key.

    Attempts are verified first, so the right key gets a token even while its key id is
    under a wrong-key flood: there is no per-key lock an attacker could trip. Wrong keys
    spend from the key id's bucket and the global one; once either is empty a failure is
    answered RESOURCE_EXHAUSTED only after `delay_s` (a tarpit holding the attacker's
    stream). At most `fail_max_delayed` attempts are held at once; while that many are held,
    new attempts are refused unverified, which bounds guessing to fail_max_delayed / fail_delay_s
    per second whatever the attacker's concurrency. That refusal is the one moment a
    robot can be turned away; it lasts only while the flood saturates the tarpit, robots
    with live tokens are unaffected, and buckets refill with time: no lock outlives the
    flood.
    """

    settings: AuthLimits = field(default_factory=AuthLimits)
    clock: Callable[[], float] = time.monotonic
    _per_key: dict[str, _Bucket] = field(default_factory=dict)
    _global: _Bucket | None = None
    delayed: int = 0

    def throttled(self) -> bool:
        """True when too many throttled attempts are already held (refuse unverified)."""
        return self.delayed >= self.settings.fail_max_delayed

    def failure_allowed(self, key_id: str) -> bool:
        """Spend one failure; False means throttle this one."""
        s, now = self.settings, self.clock()
        if self._global is None:
            self._global = _Bucket(float(s.fail_global_burst), now)
        if len(self._per_key) > 10_000:  # unknown ids are attacker-chosen: bound the table
            self._per_key = {k: b for k, b in self._per_key.items() if b.tokens < s.fail_burst}
            if len(self._per_key) > 10_000:
                self._per_key.clear()
        bucket = self._per_key.setdefault(key_id, _Bucket(float(s.fail_burst), now))
        ok_key = take(bucket, now, s.fail_burst, s.fail_per_s)
        ok_global = take(self._global, now, s.fail_global_burst, s.fail_global_per_s)
        return ok_key and ok_global


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def key_digest(key: ApiKey) -> bytes:
    """What a shared token records of its key: a changed or removed key kills the token
    on every replica, and the table never holds the key itself."""
    return hashlib.sha256(
        b"edged-api-key\0" + key.key_id.encode() + b"\0" + key.secret.encode()
    ).digest()


@dataclass(frozen=True)
class SharedToken:
    """A token as every replica sees it: its digest (never the token), its key's id and
    `key_digest`, and its expiry in wall-clock ns."""

    digest: bytes
    key_id: str
    key_digest: bytes
    expires_at_ns: int


class SharedTokens(Protocol):
    """Token digests every replica can see (the PostgreSQL index, `pg.PgTokens`)."""

    async def publish(self, token: SharedToken, keep: int, now_ns: int) -> None:
        """Record a token; keep at most `keep` live tokens of the key, dropping expired."""
        ...

    async def lookup(self, digest: bytes, now_ns: int) -> SharedToken | None:
        """The live token with this digest, or None."""
        ...


# Lookups of tokens this replica has not seen, at once: a flood of made-up tokens costs
# the database at most this many queries in flight.
MAX_SHARED_LOOKUPS = 4


class KeyStore:
    """Known API keys and the tokens issued for them. No keys = open server."""

    def __init__(
        self,
        keys: list[ApiKey],
        limits: AuthLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for k in keys:
            problem = short_key_problem(k.secret)
            if problem:
                raise ConfigError(f"API key {k.key_id!r} {problem}")
        self._keys = {k.key_id: k for k in keys}
        # digest(token) -> (key, expiry); per key id, its token digests oldest first.
        self._tokens: dict[bytes, tuple[ApiKey, float]] = {}
        self._by_key: dict[str, OrderedDict[bytes, None]] = {}
        self.limits = limits or AuthLimits()
        self._clock = clock
        self.throttle = FailureThrottle(self.limits, clock)
        self.shared: SharedTokens | None = None  # set by the server on a shared index
        self.wall_ns: Callable[[], int] = time.time_ns
        self._lookups = asyncio.Semaphore(MAX_SHARED_LOOKUPS)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(self, key_id: str, secret: str) -> ApiKey | None:
        """The key if the secret is right; constant-time whatever the id."""
        key = self._keys.get(key_id)
        # Compare against a dummy when the id is unknown so timing says nothing.
        expected = key.secret if key else secrets.token_hex(32)
        ok = hmac.compare_digest(expected.encode(), secret.encode())
        return key if ok and key is not None else None

    def issue(self, key: ApiKey) -> str:
        """A new token for `key`; its oldest token goes if it already has the maximum."""
        token = secrets.token_urlsafe(32)
        self._remember(key, _digest(token), self.limits.token_ttl_s)
        return token

    async def publish(self, key: ApiKey, token: str) -> None:
        """Make a token just issued valid on every replica (before the client has it)."""
        if self.shared is None:
            return
        now = self.wall_ns()
        expires = now + int(self.limits.token_ttl_s * 1e9)
        try:
            await self.shared.publish(
                SharedToken(_digest(token), key.key_id, key_digest(key), expires),
                self.limits.max_tokens_per_key,
                now,
            )
        except Exception as exc:  # the token still works here; other replicas ask for a new one
            _log.warning(
                "could not share a token of key %r with other replicas: %s", key.key_id, exc
            )

    async def adopt(self, authorization: str) -> None:
        """A token another replica issued: remember it for what is left of its life if the
        shared table has it for a key we hold unchanged; otherwise do nothing."""
        if self.shared is None or not authorization.startswith("Bearer "):
            return
        d = _digest(authorization[len("Bearer ") :].strip())
        try:
            async with self._lookups:
                found = await self.shared.lookup(d, self.wall_ns())
        except Exception as exc:  # as if unknown: the client re-authenticates with this replica
            _log.warning("could not look up a shared token: %s", exc)
            return
        if found is None:
            return
        key = self._keys.get(found.key_id)
        if key is None or not hmac.compare_digest(key_digest(key), found.key_digest):
            return
        left_s = min((found.expires_at_ns - self.wall_ns()) / 1e9, self.limits.token_ttl_s)
        if left_s > 0:
            self._remember(key, d, left_s)

    def _remember(self, key: ApiKey, digest: bytes, ttl_s: float) -> None:
        now = self._clock()
        mine = self._by_key.setdefault(key.key_id, OrderedDict())
        for d in list(mine):  # oldest first: drop expired, then the overflow
            entry = self._tokens.get(d)
            if entry is None or entry[1] < now or len(mine) >= self.limits.max_tokens_per_key:
                self._tokens.pop(d, None)
                del mine[d]
            else:
                break
        self._tokens[digest] = (key, now + ttl_s)
        mine[digest] = None

    def authenticate(self, key_id: str, secret: str) -> str:
        """Trade a key for a token (unthrottled; AuthService applies the throttle)."""
        key = self.verify(key_id, secret)
        if key is None:
            raise GRPCError(Status.UNAUTHENTICATED, "invalid API key id or key")
        return self.issue(key)

    def peek(self, authorization: str | None) -> ApiKey | None:
        """The live key behind a bearer header, or None; never raises."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        entry = self._tokens.get(_digest(authorization[len("Bearer ") :].strip()))
        if entry is None or entry[1] < self._clock():
            return None
        key = entry[0]
        # A token dies with its key: removed or changed keys do not keep their tokens.
        return key if self._keys.get(key.key_id) == key else None

    def check(self, authorization: str | None) -> ApiKey | None:
        """Return the key behind a bearer token; raise UNAUTHENTICATED if it is not valid."""
        if not self.enabled:
            return None
        if not authorization or not authorization.startswith("Bearer "):
            raise GRPCError(Status.UNAUTHENTICATED, "missing bearer token; call Authenticate first")
        key = self.peek(authorization)
        if key is None:
            raise GRPCError(Status.UNAUTHENTICATED, "unknown or expired token; authenticate again")
        return key

    def caller(self, stream: Stream[Any, Any]) -> ApiKey:
        """The key behind a call's bearer token (OPEN_KEY on an open server)."""
        auth = stream.metadata.get("authorization") if stream.metadata else None
        return self.check(auth if isinstance(auth, str) else None) or OPEN_KEY

    def token_count(self, key_id: str) -> int:
        return len(self._by_key.get(key_id, ()))

    async def on_request(self, event: RecvRequest) -> None:
        """grpclib hook: every call but Authenticate needs a valid token."""
        if event.method_name != AUTH_METHOD:
            value = event.metadata.get("authorization")
            header = value if isinstance(value, str) else None
            if header and self.enabled and self.peek(header) is None:
                await self.adopt(header)
            self.check(header)


def _too_many(key_id: str) -> GRPCError:
    return GRPCError(
        Status.RESOURCE_EXHAUSTED,
        f"too many failed authentications for key id {key_id!r}; retry later",
    )


class AuthService(auth_grpc.AuthServiceBase):
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def Authenticate(
        self, stream: Stream[auth_pb2.AuthenticateRequest, auth_pb2.AuthenticateResponse]
    ) -> None:
        req = await stream.recv_message()
        assert req is not None
        if not self._keys.enabled:
            await stream.send_message(auth_pb2.AuthenticateResponse(access_token="open"))
            return
        if req.credentials.type != API_KEY_TYPE:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"credentials.type {req.credentials.type!r} is not supported; use 'api-key'",
            )
        token = await self._authenticate(req.entity, req.credentials.payload)
        await stream.send_message(auth_pb2.AuthenticateResponse(access_token=token))

    async def _authenticate(self, key_id: str, secret: str) -> str:
        throttle = self._keys.throttle
        if throttle.throttled():
            raise _too_many(key_id)
        key = self._keys.verify(key_id, secret)
        if key is not None:
            token = self._keys.issue(key)
            await self._keys.publish(key, token)
            return token
        if throttle.failure_allowed(key_id):
            raise GRPCError(Status.UNAUTHENTICATED, "invalid API key id or key")
        throttle.delayed += 1
        try:
            await asyncio.sleep(throttle.settings.fail_delay_s)  # tarpit: holds the attacker's slot
        finally:
            throttle.delayed -= 1
        raise _too_many(key_id)
