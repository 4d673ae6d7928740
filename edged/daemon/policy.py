"""Pure decisions of the sync engine: what a status means, how long to wait, what to batch.

No I/O and no clocks here (time and randomness come in as arguments), so every rule
is a table test. "Retry or not" is separate from "how long to wait", as in Vector.
"""

from __future__ import annotations

import enum
import random
import ssl
from collections.abc import Sequence

from grpclib.const import Status

UNARY_BINARY_MAX = 1_000_000  # robot data manager: larger binaries are streamed


class Verdict(enum.Enum):
    TRANSIENT = "transient"  # retry this item later, with backoff
    PERMANENT = "permanent"  # dead-letter this item, keep going with the others
    GLOBAL = "global"  # concerns every item (credentials): pause all uploads


_TRANSIENT = frozenset(
    {
        Status.UNAVAILABLE,
        Status.DEADLINE_EXCEEDED,
        Status.RESOURCE_EXHAUSTED,
        Status.ABORTED,
        Status.INTERNAL,
        Status.UNKNOWN,
        Status.CANCELLED,
    }
)
_GLOBAL = frozenset({Status.UNAUTHENTICATED, Status.PERMISSION_DENIED})


def classify(status: Status) -> Verdict:
    """wire.md's table; anything not known to be retryable or global is permanent.

    Permanent is the safe default for the rest (INVALID_ARGUMENT, FAILED_PRECONDITION,
    OUT_OF_RANGE, UNIMPLEMENTED, NOT_FOUND, ALREADY_EXISTS, ...): a dead letter is kept
    and retryable on command, whereas an endless retry wedges a worker.
    """
    if status in _GLOBAL:
        return Verdict.GLOBAL
    if status in _TRANSIENT:
        return Verdict.TRANSIENT
    return Verdict.PERMANENT


class Action(enum.Enum):
    """What the uploader does with one failed call."""

    OUTAGE = "outage"  # retry later and close the gate: probe until the server answers
    RETRY = "retry"  # this item only, on its own backoff; the gate and other items go on
    DEAD = "dead"  # dead-letter it with the server's message
    PAUSE = "pause"  # credentials: pause every upload
    # The server's certificate failed verification: configuration (CA file, server name,
    # expired certificate, clock), not an outage. Stop every upload and say why, rather
    # than probe forever as OFFLINE.
    TLS_FAILED = "tls_failed"


_SERVER_WIDE = frozenset({Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED})


def cert_problem(exc: BaseException) -> str | None:
    """Why the server's certificate was rejected, if that is what `exc` (or an error
    that caused it) is; None for anything else. The chain is bounded."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or seen.reason or str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def on_failure(
    status: Status,
    *,
    transport: bool,
    strikes: int,
    others_ok: bool,
    max_attempts: int,
    cert_rejected: bool = False,
) -> Action:
    """Outage or poison item? No answer at all (`transport`), or a server saying it is
    unavailable or overloaded, is an outage: the gate closes. A transient error the
    server answered for this call (UNKNOWN, INTERNAL, ...) is about this item: it backs
    off alone, and once it has failed `max_attempts` times (`strikes`, this one
    included) while the server accepted other calls (`others_ok`), it is dead-lettered.
    Without other successes it keeps retrying: a server failing everything must not
    turn the whole backlog into dead letters. A certificate that fails verification
    (`cert_rejected`) looks like a transport fault but is configuration: TLS_FAILED."""
    if cert_rejected:
        return Action.TLS_FAILED
    verdict = classify(status)
    if verdict is Verdict.GLOBAL:
        return Action.PAUSE
    if verdict is Verdict.PERMANENT:
        return Action.DEAD
    if transport or status in _SERVER_WIDE:
        return Action.OUTAGE
    if others_ok and strikes >= max_attempts:
        return Action.DEAD
    return Action.RETRY


def backoff_cap(attempt: int, initial: float, maximum: float) -> float:
    """Upper bound of the wait before retry number `attempt` (1-based): initial·2^(n-1), capped."""
    if attempt < 1:
        return 0.0
    exponent = min(attempt - 1, 64)  # 2**64·initial is past any sane maximum
    return min(maximum, initial * (2.0**exponent))


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Full jitter (uniform in [0, cap]) so a fleet that lost its uplink together does not
    reconnect in lock-step."""
    return rng.uniform(0.0, backoff_cap(attempt, initial, maximum))


def batch_take(sizes: Sequence[int], max_readings: int, max_bytes: int) -> int:
    """How many of the leading readings go in one tabular call.

    Always at least one (a single over-size reading goes alone and the server decides),
    then as many as fit both bounds, in order.
    """
    if not sizes:
        return 0
    total, n = 0, 0
    for size in sizes[:max_readings]:
        if n and total + size > max_bytes:
            break
        total += size
        n += 1
    return n


def binary_route(size: int) -> str:
    """'unary' DataCaptureUpload up to 1,000,000 bytes, else 'stream' in chunks."""
    return "unary" if size <= UNARY_BINARY_MAX else "stream"
