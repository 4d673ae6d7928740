"""When a client stream counts as moving: pure decisions behind the connection's progress
deadline (`edged.wire.connection`), apart from the I/O that samples the stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamSample:
    """What a client stream has done so far, as our side can see it. Every field but
    `queued` only grows; `queued` is shared by the connection's other calls."""

    sent: int  # bytes of this stream handed to the connection
    credit: int  # `sent` + the stream's flow-control window: grows only with peer credit
    queued: int  # bytes of the connection still on our host (buffer + kernel send queue)
    received: int  # response headers and bytes that arrived on this stream
    holding: bool = False  # our sender is waiting on the bandwidth cap, on purpose


def progressed(before: StreamSample | None, after: StreamSample | None) -> bool:
    """Did the stream move between two samples? A chunk let through by flow control, credit
    from the peer, our send queue draining (the link is carrying bytes) or any answer all
    count; none is a guess of the link's rate. Bytes parked in the peer's 4 MiB window
    still drain our queue, so the tail after the last chunk is judged the same way. A
    sender held back by our own bandwidth cap is not stalled, however long it waits."""
    if after is None:
        return False  # not open yet: connecting counts against the limit
    if after.holding:
        return True
    if before is None:
        return True
    return (
        after.sent > before.sent
        or after.credit > before.credit
        or after.queued < before.queued
        or after.received > before.received
    )


def watch_interval(limit_s: float) -> float:
    """How often a stream's progress is sampled: often enough to cut a stall within about
    a quarter of the limit, at most once a second."""
    return min(1.0, limit_s / 4)
