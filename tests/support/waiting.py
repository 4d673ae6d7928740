"""The one way tests (and benches) wait: for an observable condition, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    what: str, check: Callable[[], object], timeout: float = 30, poll: float = 0.05
) -> float:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds.
    Returns the monotonic time at which it held (benches time phases with it)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return time.monotonic()
