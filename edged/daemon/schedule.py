"""Pure decisions of a constrained uplink: upload windows, priority aging, what may go now.

No I/O and no clocks here (local time, waits and condition results come in as
arguments), so every rule is a table or property test.

Windows are local wall-clock times of day, `HH:MM-HH:MM`, end exclusive; a window whose
end is not after its start crosses midnight (`22:00-06:00`), `00:00-24:00` is the whole
day. Several windows are a union. Local time is taken as DST-free (the naive datetime
the caller passes): across a DST jump a window edge may come an hour early or late.

Priority with aging: an item's effective priority is `priority + waited / aging`, so a
low-priority item gains one step per `aging` seconds waited and, having waited long
enough, goes before fresh higher-priority work: lower priorities are delayed, never
starved.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

DAY_MIN = 24 * 60

_WINDOW_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    """[start, end) in minutes after local midnight; end <= start crosses midnight
    (00:00-24:00 is stored as (0, 0): all day)."""

    start: int
    end: int

    def contains(self, minute: float) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def parse_window(text: str) -> Window:
    """`HH:MM-HH:MM` -> Window; ValueError with a one-line reason."""
    m = _WINDOW_RE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a time window like 22:00-06:00")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if m1 > 59 or m2 > 59 or start > DAY_MIN or end > DAY_MIN or start == DAY_MIN:
        raise ValueError(f"{text!r}: times run from 00:00 to 24:00")
    if start == end:
        raise ValueError(f"{text!r} is empty (start equals end); 00:00-24:00 is all day")
    return Window(start, end % DAY_MIN if end == DAY_MIN and start == 0 else end)


def window_problem(texts: Sequence[str]) -> str | None:
    """The config check of `windows`: the first unreadable entry, or None."""
    for text in texts:
        try:
            parse_window(text)
        except ValueError as exc:
            return str(exc)
    return None


def _open_at(windows: Sequence[Window], minute: float) -> bool:
    return any(w.contains(minute) for w in windows)


def window_open(windows: Sequence[Window], local_time: datetime) -> tuple[bool, datetime | None]:
    """(open now, local time the answer next flips); no windows: always open, never
    flips. The next change is the first window edge within two days at which the state
    differs (None: it never does, e.g. windows that cover the whole day)."""
    if not windows:
        return True, None
    midnight = local_time.replace(hour=0, minute=0, second=0, microsecond=0)
    minute = (local_time - midnight).total_seconds() / 60.0
    now_open = _open_at(windows, minute)
    edges = sorted({e for w in windows for e in (w.start, w.end)})
    for day in (0, 1, 2):
        for edge in edges:
            at = day * DAY_MIN + edge
            if at > minute and _open_at(windows, at % DAY_MIN) != now_open:
                return now_open, midnight + timedelta(minutes=at)
    return now_open, None


def effective_priority(priority: int, waited_s: float, aging_s: float) -> float:
    """Priority plus one step per `aging_s` waited (aging_s <= 0: no aging)."""
    return priority + (max(0.0, waited_s) / aging_s if aging_s > 0 else 0.0)


@dataclass(frozen=True)
class Gate:
    """Why a source may or may not upload now (shown in status)."""

    allowed: bool
    window_open: bool
    next_change: datetime | None
    condition: bool | None  # None: no condition configured
    paused: bool


def gate(
    windows: Sequence[Window],
    local_time: datetime,
    condition: bool | None,
    paused: bool,
) -> Gate:
    """A source uploads while not paused, inside a window (or without windows) and
    while its condition holds (or without one)."""
    is_open, change = window_open(windows, local_time)
    allowed = is_open and condition is not False and not paused
    return Gate(allowed, is_open, change, condition, paused)


def allowed_sources(gates: Mapping[str, Gate]) -> Collection[str]:
    """The sources the outbox may lease from now."""
    return frozenset(name for name, g in gates.items() if g.allowed)


def lease_floor(priorities: Mapping[str, int], inflight_below_top: int, workers: int) -> int | None:
    """The lowest configured priority a free worker may take now (None: any). With
    sources of different priorities and two or more workers, one worker is kept for
    the top priority: lower ones get at most `workers - 1` calls at a time, so a big
    low-priority upload never occupies every worker while telemetry waits."""
    top = max(priorities.values(), default=0)
    if workers < 2 or all(p == top for p in priorities.values()):
        return None
    return top if inflight_below_top >= workers - 1 else None


def pick(
    candidates: Sequence[tuple[str, float]],
    priorities: Mapping[str, int],
    now: float,
    aging_s: float,
) -> int | None:
    """Index of the candidate (source, enqueued_at) with the highest effective
    priority; ties go to the one that waited longest, then to the first."""
    best: tuple[float, float] | None = None
    index = None
    for i, (source, enqueued_at) in enumerate(candidates):
        key = (
            effective_priority(priorities.get(source, 0), now - enqueued_at, aging_s),
            -enqueued_at,
        )
        if best is None or key > best:
            best, index = key, i
    return index
