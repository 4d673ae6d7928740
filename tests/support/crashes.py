"""A capture source killed right after its first item committed, then restarted: the
instant crash tests of the capture path share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.capture import CaptureConfig, CaptureSource


class Killed(Exception):
    """Stands for kill -9 at this instant: nothing after it runs."""


async def scan_killed_after_first_enqueue(cap: Path, state: Path) -> Outbox:
    """Scan `cap` until the first `enqueue_item` has committed and die there; then restart
    as edged does: reopen the outbox, recover, scan again. Returns the reopened outbox,
    which the caller closes."""
    box = await Outbox.open(state)
    real = box.enqueue_item

    async def enqueue_then_die(*args: Any, **kwargs: Any) -> str:
        await real(*args, **kwargs)
        raise Killed

    box.enqueue_item = enqueue_then_die  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            await _source(cap, box, state).scan_once()
    finally:
        await box.close()
    box = await Outbox.open(state)
    try:
        await box.recover()
        await _source(cap, box, state).scan_once()
    except BaseException:
        await box.close()
        raise
    return box


def _source(cap: Path, box: Outbox, state: Path) -> CaptureSource:
    return CaptureSource(CaptureConfig(path=cap), SourceContext("p", box, state))
