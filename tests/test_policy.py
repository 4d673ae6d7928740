"""Table tests of the pure sync-engine decisions."""

from __future__ import annotations

import random
import ssl

import pytest
from grpclib.const import Status

from edged.daemon.policy import (
    Action,
    Verdict,
    backoff_cap,
    backoff_delay,
    batch_take,
    binary_route,
    cert_problem,
    classify,
    on_failure,
)
from edged.errors import UploadError
from edged.wire.progress import StreamSample, progressed, watch_interval

CLASSIFY = [
    (Status.UNAVAILABLE, Verdict.TRANSIENT),
    (Status.DEADLINE_EXCEEDED, Verdict.TRANSIENT),
    (Status.RESOURCE_EXHAUSTED, Verdict.TRANSIENT),
    (Status.ABORTED, Verdict.TRANSIENT),
    (Status.INTERNAL, Verdict.TRANSIENT),
    (Status.UNKNOWN, Verdict.TRANSIENT),
    (Status.CANCELLED, Verdict.TRANSIENT),
    (Status.INVALID_ARGUMENT, Verdict.PERMANENT),
    (Status.FAILED_PRECONDITION, Verdict.PERMANENT),
    (Status.OUT_OF_RANGE, Verdict.PERMANENT),
    (Status.UNIMPLEMENTED, Verdict.PERMANENT),
    (Status.NOT_FOUND, Verdict.PERMANENT),
    (Status.ALREADY_EXISTS, Verdict.PERMANENT),
    (Status.DATA_LOSS, Verdict.PERMANENT),
    (Status.UNAUTHENTICATED, Verdict.GLOBAL),
    (Status.PERMISSION_DENIED, Verdict.GLOBAL),
]


@pytest.mark.parametrize("status,verdict", CLASSIFY, ids=[s.name for s, _ in CLASSIFY])
def test_classify(status: Status, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_every_status_is_classified() -> None:
    assert {s for s, _ in CLASSIFY} == set(Status) - {Status.OK}


@pytest.mark.parametrize(
    "attempt,initial,maximum,cap",
    [
        (0, 0.2, 300, 0.0),
        (1, 0.2, 300, 0.2),
        (2, 0.2, 300, 0.4),
        (5, 0.2, 300, 3.2),
        (11, 0.2, 300, 204.8),
        (12, 0.2, 300, 300.0),
        (10_000, 0.2, 300, 300.0),
        (3, 1.0, 2.5, 2.5),
    ],
)
def test_backoff_cap(attempt: int, initial: float, maximum: float, cap: float) -> None:
    assert backoff_cap(attempt, initial, maximum) == pytest.approx(cap)


def test_backoff_delay_is_full_jitter_and_seedable() -> None:
    a = [backoff_delay(n, 0.2, 300, random.Random(7)) for n in range(1, 20)]
    b = [backoff_delay(n, 0.2, 300, random.Random(7)) for n in range(1, 20)]
    assert a == b
    rng = random.Random(1)
    samples = [backoff_delay(6, 0.2, 300, rng) for _ in range(2000)]
    assert all(0 <= s <= 6.4 for s in samples)
    # Full jitter spreads over the whole range (a fleet does not retry in lock-step).
    assert min(samples) < 0.5 and max(samples) > 5.9
    assert 2.9 < sum(samples) / len(samples) < 3.5


@pytest.mark.parametrize(
    "sizes,max_readings,max_bytes,n",
    [
        ([], 1000, 1 << 20, 0),
        ([10] * 5, 1000, 1 << 20, 5),
        ([10] * 5, 3, 1 << 20, 3),
        ([10] * 5, 1000, 35, 3),
        ([100, 10], 1000, 50, 1),  # an over-size reading still goes, alone
        ([10, 100], 1000, 50, 1),
        ([25, 25, 1], 1000, 50, 2),
        ([50], 1000, 50, 1),
    ],
)
def test_batch_take(sizes: list[int], max_readings: int, max_bytes: int, n: int) -> None:
    assert batch_take(sizes, max_readings, max_bytes) == n


@pytest.mark.parametrize(
    "size,route", [(0, "unary"), (1_000_000, "unary"), (1_000_001, "stream"), (10**9, "stream")]
)
def test_binary_route(size: int, route: str) -> None:
    assert binary_route(size) == route


_S = StreamSample(sent=1000, credit=5000, queued=800, received=0)


@pytest.mark.parametrize(
    ("before", "after", "want"),
    [
        # Not open yet: connecting must finish within the limit.
        (None, None, False),
        (_S, None, False),
        # Just opened (the request headers went out).
        (None, _S, True),
        # Nothing moved: a stall, however much is still queued.
        (_S, _S, False),
        # Flow control let a chunk through.
        (_S, StreamSample(1016, 5000, 816, 0), True),
        # The peer returned credit (the window grew, nothing sent).
        (_S, StreamSample(1000, 9000, 800, 0), True),
        # The link carried bytes: our send queue shrank (the tail after the last chunk).
        (_S, StreamSample(1000, 5000, 799, 0), True),
        (_S, StreamSample(1000, 5000, 0, 0), True),
        # Another call on the connection queued more bytes: not our progress.
        (_S, StreamSample(1000, 5000, 900, 0), False),
        # Everything left our host and stays gone: waiting for the answer is a stall ...
        (StreamSample(1000, 5000, 0, 0), StreamSample(1000, 5000, 0, 0), False),
        # ... until response headers or a message arrive.
        (_S, StreamSample(1000, 5000, 800, 1), True),
        # A closed stream reports no window: credit falling is not progress.
        (_S, StreamSample(1000, 1000, 800, 0), False),
        # Our sender waits on the bandwidth cap: held back on purpose, not stalled.
        (_S, StreamSample(1000, 5000, 800, 0, holding=True), True),
    ],
)
def test_progressed(before: StreamSample | None, after: StreamSample | None, want: bool) -> None:
    assert progressed(before, after) is want


@pytest.mark.parametrize(("limit", "every"), [(60.0, 1.0), (4.0, 1.0), (2.0, 0.5), (0.2, 0.05)])
def test_watch_interval(limit: float, every: float) -> None:
    assert watch_interval(limit) == pytest.approx(every)


@pytest.mark.parametrize(
    ("status", "transport", "strikes", "others_ok", "want"),
    [
        # No server answered: an outage, whatever the status, however often it happened.
        (Status.UNAVAILABLE, True, 9, True, Action.OUTAGE),
        (Status.DEADLINE_EXCEEDED, True, 1, False, Action.OUTAGE),
        # The server says it is down or overloaded: an outage too.
        (Status.UNAVAILABLE, False, 9, True, Action.OUTAGE),
        (Status.RESOURCE_EXHAUSTED, False, 9, True, Action.OUTAGE),
        # Answered, item-level: this item backs off alone; dead once others get through.
        (Status.UNKNOWN, False, 1, True, Action.RETRY),
        (Status.INTERNAL, False, 4, True, Action.RETRY),
        (Status.UNKNOWN, False, 5, True, Action.DEAD),
        (Status.INTERNAL, False, 7, True, Action.DEAD),
        (Status.ABORTED, False, 5, True, Action.DEAD),
        # ... but never dead while nothing else succeeds: the server may be failing all.
        (Status.UNKNOWN, False, 50, False, Action.RETRY),
        # Unchanged: permanent statuses dead at once, credentials pause everything.
        (Status.INVALID_ARGUMENT, False, 1, False, Action.DEAD),
        (Status.UNAUTHENTICATED, False, 1, True, Action.PAUSE),
        (Status.PERMISSION_DENIED, True, 1, True, Action.PAUSE),
    ],
)
def test_on_failure(
    status: Status, transport: bool, strikes: int, others_ok: bool, want: Action
) -> None:
    got = on_failure(
        status, transport=transport, strikes=strikes, others_ok=others_ok, max_attempts=5
    )
    assert got is want


def _rejected_certificate() -> UploadError:
    """What the connection raises for a server certificate that fails verification."""
    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    cause.verify_message = "unable to get local issuer certificate"
    try:
        raise UploadError(Status.UNAVAILABLE, "transport error", transport=True) from cause
    except UploadError as exc:
        return exc


def test_a_rejected_certificate_is_configuration_not_an_outage() -> None:
    exc = _rejected_certificate()
    assert cert_problem(exc) == "unable to get local issuer certificate"
    assert cert_problem(UploadError(Status.UNAVAILABLE, "refused", transport=True)) is None
    wrong_protocol = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert cert_problem(wrong_protocol) is None
    for rejected, action in ((True, Action.TLS_FAILED), (False, Action.OUTAGE)):
        got = on_failure(
            Status.UNAVAILABLE,
            transport=True,
            strikes=1,
            others_ok=False,
            max_attempts=5,
            cert_rejected=rejected,
        )
        assert got is action
