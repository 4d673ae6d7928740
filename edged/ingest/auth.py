"""API keys and bearer tokens for `edged ingest`.

The wire handshake is the public RPC auth service: the client trades
(key id, key) for an access token once, then sends `authorization: Bearer <token>`
on every call. Tokens are random and live in memory only: after a restart clients
get UNAUTHENTICATED once and re-authenticate, which the client handles.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from grpclib.const import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from edged._proto.proto.rpc.v1 import auth_grpc, auth_pb2

AUTH_METHOD = "/proto.rpc.v1.AuthService/Authenticate"
API_KEY_TYPE = "api-key"
TOKEN_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class ApiKey:
    """A key and what it may reach: one organisation (queries are scoped to it) and the
    location stamped on what it uploads. An open server (no keys) serves org "" only."""

    key_id: str
    secret: str
    org_id: str = ""
    location_id: str = ""


OPEN_KEY = ApiKey("", "", "", "")


class KeyStore:
    """Known API keys and the tokens issued for them. No keys = open server."""

    def __init__(self, keys: list[ApiKey], *, token_ttl_s: float = TOKEN_TTL_S) -> None:
        self._keys = {k.key_id: k for k in keys}
        self._tokens: dict[str, tuple[ApiKey, float]] = {}
        self._ttl = token_ttl_s

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, key_id: str, secret: str) -> str:
        key = self._keys.get(key_id)
        # Compare against a dummy when the id is unknown so timing says nothing.
        expected = key.secret if key else secrets.token_hex(16)
        if not hmac.compare_digest(expected.encode(), secret.encode()) or key is None:
            raise GRPCError(Status.UNAUTHENTICATED, "invalid API key id or key")
        token = secrets.token_urlsafe(32)
        self._prune()
        self._tokens[token] = (key, time.monotonic() + self._ttl)
        return token

    def check(self, authorization: str | None) -> ApiKey | None:
        """Return the key behind a bearer token; raise UNAUTHENTICATED if it is not valid."""
        if not self.enabled:
            return None
        if not authorization or not authorization.startswith("Bearer "):
            raise GRPCError(Status.UNAUTHENTICATED, "missing bearer token; call Authenticate first")
        entry = self._tokens.get(authorization[len("Bearer ") :].strip())
        if entry is None or entry[1] < time.monotonic():
            raise GRPCError(Status.UNAUTHENTICATED, "unknown or expired token; authenticate again")
        return entry[0]

    def caller(self, stream: Stream[Any, Any]) -> ApiKey:
        """The key behind a call's bearer token (OPEN_KEY on an open server)."""
        auth = stream.metadata.get("authorization") if stream.metadata else None
        return self.check(auth if isinstance(auth, str) else None) or OPEN_KEY

    def _prune(self) -> None:
        now = time.monotonic()
        for token in [t for t, (_, exp) in self._tokens.items() if exp < now]:
            del self._tokens[token]

    async def on_request(self, event: RecvRequest) -> None:
        """grpclib hook: every call but Authenticate needs a valid token."""
        if event.method_name != AUTH_METHOD:
            value = event.metadata.get("authorization")
            self.check(value if isinstance(value, str) else None)


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
        token = self._keys.authenticate(req.entity, req.credentials.payload)
        await stream.send_message(auth_pb2.AuthenticateResponse(access_token=token))
