"""Which sources may upload now: windows, conditions, per-source pauses and max_age.

The decisions are `schedule`'s pure functions; this module does their I/O: it runs
condition commands (no shell, a timeout, output discarded; a failure or a hang means
closed, with the reason in status), looks for condition files, tells the outbox which
sources are held (`Outbox.held`) and their priorities, wakes the upload workers when a
source opens, and drops data past its `max_age` (`Outbox.expire`, one log line each).

Its loop sleeps until the next thing that can change (a window edge, a condition
check, an expiry sweep), at most `MAX_SLEEP_S`, so a wall-clock jump is noticed within
that; it never polls faster than `MIN_SLEEP_S`. Capture is never held: only uploads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from edged.daemon.config import ConditionConfig, SourceConfig
from edged.daemon.outbox import Outbox
from edged.daemon.schedule import Gate, Window, gate, parse_window

log = logging.getLogger("edged.gates")

MAX_SLEEP_S = 60.0
MIN_SLEEP_S = 0.05
KILL_WAIT_S = 5.0
SWEEP_ROWS = 1000  # rows of each kind a sweep transaction drops at most, per source
SWEEP_ROUNDS = 100  # transactions a sweep runs at most; the next sweep does the rest


@dataclass
class Check:
    """The last result of one source's condition."""

    ok: bool | None = None  # None: not checked yet (counts as closed)
    reason: str = "not checked yet"
    checked_at: float | None = None


@dataclass
class _Source:
    config: SourceConfig
    windows: list[Window]
    command: Check = field(default_factory=Check)
    file: Check = field(default_factory=Check)
    runner: asyncio.Task[None] | None = None


async def run_condition(argv: Sequence[str], timeout: float) -> tuple[bool, str]:
    """(holds, why): exit 0 within `timeout`. No shell, stdin/stdout/stderr to
    /dev/null (nothing to bound), killed on timeout or cancel."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    try:
        async with asyncio.timeout(timeout):
            rc = await proc.wait()
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT_S):
                await proc.wait()
        if isinstance(exc, TimeoutError):
            return False, f"{argv[0]!r} ran over {timeout:g}s (killed)"
        raise
    return rc == 0, f"{argv[0]!r} exited {rc}"


class Gates:
    """Per-source upload gates, kept in the outbox's `held` and `priorities`."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        local_now: Callable[[], datetime] = datetime.now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox = outbox
        self.local_now = local_now  # naive local time: the windows' clock (injectable)
        self.monotonic = monotonic
        self.paused: set[str] = set()
        self._sources: dict[str, _Source] = {}
        self._gates: dict[str, Gate] = {}
        self._changed = asyncio.Event()
        self._next_sweep = 0.0

    # -- control --------------------------------------------------------------------------

    def configure(self, sources: Sequence[SourceConfig]) -> None:
        """The config's sources (start-up, reload): a source whose condition changed is
        checked afresh; pauses of sources still configured stay."""
        old = self._sources
        self._sources = {}
        for cfg in sources:
            prev = old.pop(cfg.name, None)
            if prev is not None and prev.config.condition == cfg.condition:
                prev.config, prev.windows = cfg, [parse_window(w) for w in cfg.windows]
                self._sources[cfg.name] = prev
            else:
                if prev is not None and prev.runner is not None:
                    prev.runner.cancel()
                self._sources[cfg.name] = _Source(cfg, [parse_window(w) for w in cfg.windows])
        for gone in old.values():
            if gone.runner is not None:
                gone.runner.cancel()
        self.paused &= set(self._sources)
        self.outbox.priorities = {n: s.config.priority for n, s in self._sources.items()}
        self.refresh()
        self._changed.set()

    def pause(self, name: str) -> bool:
        """Hold one source's uploads (capture goes on); False if no such source."""
        if name not in self._sources:
            return False
        self.paused.add(name)
        self.refresh()
        return True

    def resume(self, name: str) -> bool:
        if name not in self._sources:
            return False
        self.paused.discard(name)
        self.refresh()
        return True

    # -- decisions ------------------------------------------------------------------------

    def _condition(self, src: _Source) -> tuple[bool | None, str | None]:
        cond: ConditionConfig = src.config.condition
        checks = ([src.command] if cond.command else []) + ([src.file] if cond.file else [])
        if not checks:
            return None, None
        failed = [c for c in checks if not c.ok]
        return (not failed), (failed[0].reason if failed else checks[0].reason)

    def refresh(self) -> None:
        """Recompute every gate; tell the outbox; wake the workers if a source opened."""
        now = self.local_now()
        before = self.outbox.held
        gates = {}
        for name, src in self._sources.items():
            cond, _ = self._condition(src)
            gates[name] = gate(src.windows, now, cond, name in self.paused)
        self._gates = gates
        held = frozenset(n for n, g in gates.items() if not g.allowed)
        self.outbox.held = held
        if before - held:
            log.info("uploads open for %s", ", ".join(sorted(before - held)))
            self.outbox.work_available.set()
        if held - before:
            log.info("uploads held for %s", ", ".join(sorted(held - before)))

    def view(self, name: str) -> dict[str, Any]:
        """The status fields of one source's gate."""
        src, g = self._sources.get(name), self._gates.get(name)
        if src is None or g is None:
            return {}
        cond, reason = self._condition(src)
        return {
            "priority": src.config.priority,
            "upload_allowed": g.allowed,
            "paused": g.paused,
            "window": None
            if not src.windows
            else {
                "open": g.window_open,
                "next_change": None if g.next_change is None else g.next_change.isoformat(),
            },
            "condition": None if cond is None and reason is None else {"ok": cond, "why": reason},
            "max_age_s": src.config.max_age,
        }

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: keep conditions checked, gates current, old data expired."""
        try:
            while True:
                self._changed.clear()
                self._start_runners()
                await self._check_files()
                self.refresh()
                await self._sweep()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._sleep_s()):
                        await self._changed.wait()
        finally:
            for src in self._sources.values():
                if src.runner is not None:
                    src.runner.cancel()
            runners = [s.runner for s in self._sources.values() if s.runner is not None]
            await asyncio.gather(*runners, return_exceptions=True)

    def _sleep_s(self) -> float:
        waits = [MAX_SLEEP_S]
        now = self.local_now()
        for g in self._gates.values():
            if g.next_change is not None:
                waits.append((g.next_change - now).total_seconds())
        waits += [
            s.config.condition.every for s in self._sources.values() if s.config.condition.file
        ]
        if self._max_ages():
            waits.append(self._next_sweep - self.monotonic())
        return max(MIN_SLEEP_S, min(waits))

    def _start_runners(self) -> None:
        for name, src in self._sources.items():
            if src.config.condition.command and (src.runner is None or src.runner.done()):
                src.runner = asyncio.create_task(self._run_command(src), name=f"condition {name}")

    async def _run_command(self, src: _Source) -> None:
        cond = src.config.condition
        while True:
            ok, why = await run_condition(cond.command, cond.timeout)
            if ok != src.command.ok or why != src.command.reason:
                log.info("%s: condition %s (%s)", src.config.name, "holds" if ok else "fails", why)
            src.command = Check(ok, why, self.monotonic())
            self._changed.set()
            await asyncio.sleep(cond.every)

    async def _check_files(self) -> None:
        for src in self._sources.values():
            path: Path | None = src.config.condition.file
            if path is not None:
                there = await asyncio.to_thread(os.path.exists, path)
                src.file = Check(there, f"{path} {'exists' if there else 'is missing'}")

    def _max_ages(self) -> dict[str, float]:
        return {n: s.config.max_age for n, s in self._sources.items() if s.config.max_age}

    async def _sweep(self) -> None:
        """Drop data past its max_age, every tenth of the shortest max_age (1 s .. 60 s)."""
        ages = self._max_ages()
        if not ages or self.monotonic() < self._next_sweep:
            return
        self._next_sweep = self.monotonic() + min(MAX_SLEEP_S, max(1.0, min(ages.values()) / 10))
        for _ in range(SWEEP_ROUNDS):
            gone = await self.outbox.expire(ages, SWEEP_ROWS)
            for g in gone:
                log.warning(
                    "%s: dropped %d reading(s) queued %.0fs ago, past max_age",
                    g.source,
                    g.readings,
                    g.age_s,
                    extra={
                        "event": "expired",
                        "source": g.source,
                        "item_id": None if g.item is None else g.item.uid,
                        "readings": g.readings,
                        "bytes": g.bytes,
                        "age_s": round(g.age_s, 3),
                    },
                )
            if not gone:
                return
