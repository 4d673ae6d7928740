"""A thin shell around watchdog: events only say "look at this path soon".

Events can be lost (inotify overflow, network filesystems), so sources also scan fully
at start-up and every `rescan_s`; the watcher just makes the common case fast.
Paths are handed to the event loop with `call_soon_threadsafe` and collected in a
bounded set; an overflowing set turns into one full rescan.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

MAX_PENDING = 10_000


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: DirWatcher) -> None:
        self._w = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                path = raw.decode() if isinstance(raw, bytes) else str(raw)
                self._w.loop.call_soon_threadsafe(self._w.note, Path(path))


class DirWatcher:
    """Collects changed paths under `root`; `wait()` returns them, debounced."""

    def __init__(self, root: Path, *, recursive: bool = True, debounce_s: float = 0.05) -> None:
        self.root = root
        self.loop = asyncio.get_running_loop()
        self._recursive = recursive
        self._debounce = debounce_s
        self._pending: set[Path] = set()
        self._overflow = False
        self._event = asyncio.Event()
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

    def note(self, path: Path) -> None:
        if len(self._pending) >= MAX_PENDING:
            self._overflow = True
        else:
            self._pending.add(path)
        self._event.set()

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
        if self._event.is_set() and self._debounce:
            await asyncio.sleep(self._debounce)  # let a burst of events for one file settle
        self._event.clear()
        if self._overflow:
            self._overflow = False
            self._pending.clear()
            return None
        paths, self._pending = self._pending, set()
        return paths

    def __enter__(self) -> DirWatcher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
