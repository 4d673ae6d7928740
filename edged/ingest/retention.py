"""Retention (`edged ingest --retention 400d`): tabular readings captured before
now - retention are deleted, by one background task per replica.

Promised:
- readings only: binary data and files stay (their bytes are what operators most often
  must keep or delete on their own terms: DeleteBinaryDataByFilter, or by hand);
- PostgreSQL drops whole monthly partitions that end at or before the cutoff, plus the
  rows of the partition for capture times before 2000 (no DELETE of live months: a
  reading lives at most retention + one month); SQLite deletes the older rows in batches
  of `BATCH` rows, one short write transaction each, so uploads interleave;
- replicas running it at once are safe: partition work holds an advisory lock, and a
  delete of rows another replica already deleted deletes nothing;
- a failed run is logged and retried at the next interval, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edged.options import parse_duration

log = logging.getLogger("edged.ingest.retention")

BATCH = 5000  # SQLite rows per delete transaction
MAX_BATCHES = 2000  # SQLite transactions per run (10M rows); the rest at the next run
INTERVAL_S = 3600.0  # between runs
_NS = 1_000_000_000
_DAYS = re.compile(r"(\d+)\s*d")


@dataclass(frozen=True)
class Expired:
    """What one run removed: readings (rows) and, on PostgreSQL, partitions dropped."""

    readings: int = 0
    partitions: int = 0


def parse_retention(text: str) -> float:
    """Seconds from `400d` (days) or any duration `parse_duration` reads; more than 0."""
    m = _DAYS.fullmatch(text.strip())
    try:
        seconds = int(m.group(1)) * 86400.0 if m else parse_duration(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a retention (e.g. 400d, 36h)") from None
    if not seconds > 0:
        raise ValueError(f"{text!r} is not a retention: it must be longer than 0 (e.g. 400d)")
    return seconds


def cutoff_ns(now_s: float, retention_s: float) -> int:
    """The capture time (ns) before which readings go."""
    return int((now_s - retention_s) * _NS)


async def expire_forever(
    expire: Callable[[int], Awaitable[Expired]],
    retention_s: float,
    *,
    clock: Callable[[], float],
    on_run: Callable[[Expired | None], None],
    interval_s: float = INTERVAL_S,
) -> None:
    """Expire now and then every `interval_s`; `clock` is the wall clock (injected);
    `on_run` sees each run's result, None for a failed run."""
    while True:
        cutoff = cutoff_ns(clock(), retention_s)
        try:
            result = await expire(cutoff)
        except Exception as exc:  # logged, retried at the next interval
            log.warning("retention run failed (retried in %gs): %s", interval_s, exc)
            on_run(None)
        else:
            on_run(result)
            if result != Expired():
                log.info(
                    "retention: removed %d reading(s) captured before %d ns (%d partition(s))",
                    result.readings,
                    cutoff,
                    result.partitions,
                )
        await asyncio.sleep(interval_s)
