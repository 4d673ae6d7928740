"""The one watch loop every source kind runs, around a thin shell over watchdog.

Events only say "look at this path soon" and can be lost (inotify overflow, network
filesystems), so `WatchLoop` also scans fully at start-up, every `rescan_s`, when the
watched directory appears, and on request (`sync-now`); the watcher just makes the
common case fast. Paths are handed to the event loop with `call_soon_threadsafe` and
collected in a bounded set; an overflowing set turns into one full rescan.

A writer that closes a file (inotify IN_CLOSE_WRITE) or renames one (a `.prog` becoming
a `.capture`) has said it is done for now: those events (`ends_debounce`) are acted on
at once. Other changes (appends, creates) wait a short debounce so that a burst of them
costs one pass; that debounce is the fallback for writers that never close. What an
event means stays the source kind's call (a closed `.prog` or jsonl file is not final);
the watcher only decides how soon to look.

A source kind plugs in through `Watched`: a full pass, a pass over changed paths, and
when its own timers (a file settling, a tailed file to poll) want it woken. Waits use
the context's monotonic clock; an OSError in a pass is named in the source's
`last_error` and logged, and the loop goes on (anything else is a bug: the daemon's
guard logs it and restarts the source after a pause).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_MOVED,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from edged.daemon.sources.base import SourceContext, SourceStats, wait_for_space

log = logging.getLogger("edged.sources")

MAX_PENDING = 10_000
MIN_WAIT_S = 0.05  # never spin: the loop always waits at least this long


def ends_debounce(event_type: str) -> bool:
    """A writer closed the file after writing, or a file was renamed (watchdog's
    FileClosedEvent, File/DirMovedEvent): look now instead of waiting for more events.
    A create is not: an empty file just opened is the common case, and a file moved in
    from outside the watched tree looks the same."""
    return event_type in (EVENT_TYPE_CLOSED, EVENT_TYPE_MOVED)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DirWatcher) -> None:
        self._w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in (EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE):
            return
        now = ends_debounce(event.event_type)
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                path = raw.decode() if isinstance(raw, bytes) else str(raw)
                self._w.loop.call_soon_threadsafe(self._w.note, Path(path), now)


class DirWatcher:
    """Collects changed paths under `root`; `wait()` returns them, debounced unless an
    event ended the debounce (`ends_debounce`)."""

    def __init__(self, root: Path, *, recursive: bool = True, debounce_s: float = 0.05) -> None:
        self.root = root
        self.loop = asyncio.get_running_loop()
        self._recursive = recursive
        self._debounce = debounce_s
        self._pending: set[Path] = set()
        self._overflow = False
        self._event = asyncio.Event()  # something changed
        self._now = asyncio.Event()  # ... and waiting for more would only add latency
        self._observer: Observer | None = None  # type: ignore[valid-type]

    @property
    def active(self) -> bool:
        """False while the root is missing: callers then poll for it (see `timeout`)."""
        return self._observer is not None

    def timeout(self, wanted: float, missing_root_poll_s: float = 1.0) -> float:
        """How long to wait: as asked, or briefly while the root does not exist yet."""
        if not self.active:
            self.start()
        return wanted if self.active else min(wanted, missing_root_poll_s)

    def request_rescan(self) -> None:
        """Make the next `wait()` return None (full rescan) right away."""
        self._overflow = True
        self._event.set()
        self._now.set()

    def note(self, path: Path, now: bool = False) -> None:
        """`path` changed; `now`: end the debounce (see `ends_debounce`)."""
        if len(self._pending) >= MAX_PENDING:
            self._overflow = True
        else:
            self._pending.add(path)
        self._event.set()
        if now:
            self._now.set()

    def start(self) -> None:
        """Watch `root` if it exists; a missing root is picked up by later rescans."""
        if self._observer is not None or not self.root.is_dir():
            return
        observer = Observer()
        observer.schedule(_Handler(self), str(self.root), recursive=self._recursive)
        observer.daemon = True
        try:
            observer.start()
        except OSError:  # inotify limits: fall back to periodic rescans only
            return
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    async def wait(self, timeout: float) -> set[Path] | None:
        """Changed paths, or None when only a full rescan can be trusted (overflow)."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for returns the event's result and
        # drops a cancellation that lands in the same loop turn (the source then never stops).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                await self._event.wait()
        if self._event.is_set() and self._debounce and not self._now.is_set():
            # Let a burst of events for one file settle, unless its writer says it is done.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._debounce):
                    await self._now.wait()
        self._event.clear()
        self._now.clear()
        if self._overflow:
            self._overflow = False
            self._pending.clear()
            return None
        paths, self._pending = self._pending, set()
        return paths

    def __enter__(self) -> DirWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- the loop


class Watched(Protocol):
    """What a source kind hands the watch loop."""

    name: str
    ctx: SourceContext
    stats: SourceStats

    async def scan_once(self) -> None:
        """A full pass over the source's files."""

    async def on_changes(self, changed: set[Path]) -> None:
        """A pass over paths the watcher saw change, plus files whose timers are due."""

    def wake_at(self) -> float | None:
        """When (ctx.monotonic) a timer of the source is due; None: no timer."""

    def wants_scan(self) -> bool:
        """A full pass is needed before changes mean anything (e.g. root not known)."""

    def blocked(self) -> bool:
        """The outbox refused the last write: wait for space before the next pass."""


def next_wait(
    now: float, next_scan: float, wake: float | None, rescan_s: float, blocked: bool
) -> float:
    """Seconds to wait for events: until the next rescan or source timer, briefly when
    backpressured, never less than MIN_WAIT_S (no spinning), never more than rescan_s."""
    deadline = next_scan if wake is None else min(next_scan, wake)
    wait = deadline - now
    if blocked:
        wait = min(wait, MIN_WAIT_S)
    return min(max(wait, MIN_WAIT_S), max(rescan_s, MIN_WAIT_S))


class WatchLoop:
    """Scan, then watch `root` and hand changes to `source` until cancelled."""

    def __init__(self, source: Watched, root: Path, *, recursive: bool = True) -> None:
        self.source = source
        self.root = root
        self.recursive = recursive
        self._watcher: DirWatcher | None = None

    def request_rescan(self) -> None:
        """`sync-now`: a full pass soon, in the loop (never two passes at once)."""
        if self._watcher is not None:
            self._watcher.request_rescan()

    async def run(self) -> None:
        source, ctx = self.source, self.source.ctx
        with DirWatcher(self.root, recursive=self.recursive) as watcher:
            self._watcher = watcher
            await self._pass(source.scan_once())
            next_scan = ctx.monotonic() + ctx.rescan_s
            while True:
                if source.blocked():
                    await wait_for_space(ctx, source.stats)
                wait = next_wait(
                    ctx.monotonic(), next_scan, source.wake_at(), ctx.rescan_s, source.blocked()
                )
                was_active = watcher.active
                timeout = watcher.timeout(wait)
                appeared = not was_active and watcher.active  # the root just came to be
                changed = await watcher.wait(0.0 if appeared else timeout)
                if (
                    changed is None
                    or appeared
                    or source.wants_scan()
                    or ctx.monotonic() >= next_scan
                ):
                    await self._pass(source.scan_once())
                    next_scan = ctx.monotonic() + ctx.rescan_s
                else:
                    await self._pass(source.on_changes(changed))

    async def _pass(self, step: Awaitable[None]) -> None:
        try:
            await step
        except OSError as exc:  # EIO and the like: say so, try again next round
            stats = self.source.stats
            stats.last_error = f"{exc.filename or self.root}: {exc.strerror or exc}"
            log.warning("%s: %s", self.source.name, stats.last_error)
