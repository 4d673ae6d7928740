"""Upload windows, priority aging and the per-source gate: pure, table and property tests."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edged.daemon.schedule import (
    Window,
    allowed_sources,
    effective_priority,
    gate,
    lease_floor,
    parse_window,
    pick,
    window_open,
    window_problem,
)

DAY = datetime(2030, 1, 15)  # any date: windows are times of day


def at(hh: int, mm: int = 0, ss: int = 0, day: int = 0) -> datetime:
    return DAY + timedelta(days=day, hours=hh, minutes=mm, seconds=ss)


def ws(*texts: str) -> list[Window]:
    return [parse_window(t) for t in texts]


@pytest.mark.parametrize(
    ("windows", "now", "is_open", "change"),
    [
        ((), at(12), True, None),
        (("22:00-06:00",), at(23), True, at(6, day=1)),
        (("22:00-06:00",), at(0), True, at(6)),
        (("22:00-06:00",), at(5, 59, 59), True, at(6)),
        (("22:00-06:00",), at(6), False, at(22)),
        (("22:00-06:00",), at(21, 59), False, at(22)),
        (("22:00-06:00",), at(22), True, at(6, day=1)),
        (("01:00-02:00", "03:00-04:00"), at(2, 30), False, at(3)),
        (("01:00-02:00", "02:00-04:00"), at(1, 30), True, at(4)),  # adjoining: one
        (("00:00-24:00",), at(13), True, None),
        (("20:00-24:00", "00:00-08:00"), at(23), True, at(8, day=1)),
        (("12:00-13:00",), at(13, 0, 1), False, at(12, day=1)),
    ],
)
def test_window_table(
    windows: tuple[str, ...], now: datetime, is_open: bool, change: datetime | None
) -> None:
    assert window_open(ws(*windows), now) == (is_open, change)


@pytest.mark.parametrize(
    "text", ["22:00", "25:00-01:00", "10:60-11:00", "10:00-10:00", "24:00-01:00", "a-b"]
)
def test_bad_windows_say_why(text: str) -> None:
    problem = window_problem([text])
    assert problem is not None and repr(text) in problem


minutes = st.integers(0, 24 * 60 - 1)
window_st = st.tuples(minutes, minutes).filter(lambda t: t[0] != t[1]).map(lambda t: Window(*t))


@given(st.lists(window_st, max_size=4), st.integers(0, 2 * 24 * 3600 - 1))
def test_next_change_is_the_first_flip(windows: list[Window], second: int) -> None:
    """The state holds until next_change and differs right at it; checked minute by
    minute against the plain definition (contains)."""
    now = DAY + timedelta(seconds=second)
    is_open, change = window_open(windows, now)

    def truth(t: datetime) -> bool:
        m = t.hour * 60 + t.minute + t.second / 60
        return not windows or any(w.contains(m) for w in windows)

    assert is_open == truth(now)
    step = now.replace(second=0) + timedelta(minutes=1)
    end = change if change is not None else now + timedelta(days=2)
    while step < end:
        assert truth(step) == is_open
        step += timedelta(minutes=1)
    if change is not None:
        assert truth(change) != is_open
        assert timedelta(0) < change - now <= timedelta(days=1)


def test_aging_lets_low_priority_overtake() -> None:
    # telemetry (10) beats video (0) while video is fresh...
    assert pick([("video", 100.0), ("telemetry", 100.0)], {"telemetry": 10}, 100.0, 60) == 1
    # ...but video that waited 11 aging steps goes first: never starved.
    assert pick([("video", 0.0), ("telemetry", 660.0)], {"telemetry": 10}, 661.0, 60) == 0
    assert effective_priority(3, 120, 60) == 5
    assert effective_priority(3, 120, 0) == 3  # aging off
    assert pick([], {}, 0, 60) is None


@given(st.integers(0, 100), st.floats(1, 1e4))
def test_wait_bound_for_any_priority_gap(prio: int, aging: float) -> None:
    """A priority-0 item that waited (gap + 1) * aging beats any fresh item of `prio`:
    the bound on how long a lower priority waits behind a steady higher one."""
    waited = (prio + 1) * aging
    assert effective_priority(0, waited, aging) > effective_priority(prio, 0, aging)


def test_gate_needs_window_condition_and_no_pause() -> None:
    night = ws("22:00-06:00")
    assert gate(night, at(23), None, False).allowed
    assert not gate(night, at(12), None, False).allowed
    assert not gate(night, at(23), False, False).allowed
    assert not gate(night, at(23), True, True).allowed
    gates = {"a": gate([], at(12), True, False), "b": gate(night, at(12), None, False)}
    assert allowed_sources(gates) == {"a"}


def test_lease_floor_keeps_one_worker_for_the_top_priority() -> None:
    prios = {"telemetry": 10, "video": 0}
    assert lease_floor(prios, 0, 2) is None  # nothing low in flight: take anything
    assert lease_floor(prios, 1, 2) == 10  # the last free worker waits for the top
    assert lease_floor(prios, 1, 4) is None
    assert lease_floor(prios, 3, 4) == 10
    assert lease_floor(prios, 5, 1) is None  # one worker: never idle on purpose
    assert lease_floor({"a": 3, "b": 3}, 9, 2) is None  # one priority: no reserve
    assert lease_floor({}, 9, 2) is None
