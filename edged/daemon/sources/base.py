"""What every source shares: its context, status counters, quarantine, backpressure.

A source's contract (`tests/test_source_contract.py` runs it against every kind): a
file appears → its readings are committed to the outbox, exactly once, also across a
restart → only then is the file retired (by the outbox's ledger). Bad input is moved to
quarantine with a reason naming the path (and byte offset), never dropped, never
retried forever, and never holds up the files after it. Nothing is read through a
symlink, hidden and temporary names (`is_ignored_name`) are never input, a file still
being written is not taken early, a full outbox leaves the file where it is, a missing
directory is `last_error` until it appears, and a source stops promptly when cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edged.daemon.config import SourceConfig
from edged.daemon.outbox import Outbox
from edged.daemon.safefs import Identity, copy_out, locate, move_out
from edged.durable import fsync_dir

log = logging.getLogger("edged.sources")

IGNORED_SUFFIXES = (".tmp", ".part", "~")
ROBOT_DIRS = frozenset({"failed", "datasetUpload", "sequences"})
"""Folders the robot software keeps below its capture directory for its own use: never
input to a source, whichever kind watches the directory."""


@dataclass
class SourceStats:
    files_seen: int = 0
    files_done: int = 0
    readings: int = 0
    quarantined: int = 0
    truncated: int = 0
    last_event_at: float | None = None
    last_error: str | None = None
    backpressure: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SourceContext:
    part_id: str
    outbox: Outbox
    state_dir: Path
    clock: Callable[[], float] = time.time  # wall time: compared with file mtimes
    rescan_s: float = 60.0
    monotonic: Callable[[], float] = time.monotonic  # waits and "seen unchanged for"
    quarantine_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.quarantine_dir = self.state_dir / "quarantine"


class Source(Protocol):
    name: str
    kind: str
    stats: SourceStats

    @property
    def config(self) -> SourceConfig:
        """Its kind's config class (read-only here, so each kind may narrow it)."""

    async def run(self) -> None:
        """Scan, watch and commit until cancelled."""

    async def scan_once(self) -> None:
        """One full pass over the source's files (start-up, rescans, tests)."""

    def request_rescan(self) -> None:
        """Ask the running loop for a full pass soon (`sync-now`); never scans inline, so
        two passes can never commit the same data at once."""


def is_ignored_name(name: str) -> bool:
    """Hidden and temporary names are work in progress by convention, never input."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES)


def note_root(name: str, stats: SourceStats, root: Path) -> bool:
    """A missing source directory is the source's `last_error` until it appears (then
    cleared): otherwise status shows `seen 0` and nothing says why. True if present."""
    missing = f"{root} does not exist; waiting for it to appear"
    present = root.is_dir()
    if not present and stats.last_error != missing:
        stats.last_error = missing
        log.warning("%s: %s", name, missing)
    elif present and stats.last_error == missing:
        stats.last_error = None
        log.info("%s: %s appeared", name, root)
    return present


def quarantine(
    ctx: SourceContext,
    path: Path,
    reason: str,
    *,
    root: Path | None = None,
    expect: Identity | None = None,
    keep_original: bool = False,
) -> Path:
    """Move `path` (or copy it, `keep_original`) aside with a `.reason` file next to it;
    never lose the bytes. It is reached below `root` (default: its directory) without
    following links, and must still be `expect`: else `safefs.Swapped`, nothing moved."""
    ctx.quarantine_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ctx.clock()))
    target = ctx.quarantine_dir / f"{stamp}-{path.name}"
    n = 1
    while target.exists() or target.with_name(target.name + ".reason").exists():
        target = ctx.quarantine_dir / f"{stamp}-{n}-{path.name}"
        n += 1
    reason_file = target.with_name(target.name + ".reason")
    fd = os.open(reason_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    # surrogateescape: a name that is not UTF-8 is written as the bytes it really has.
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(f"path: {path}\nreason: {reason}\n")
        f.flush()
        os.fsync(f.fileno())
    base, rel = locate(str(path), None if root is None else str(root))
    try:
        if keep_original:
            copy_out(base, rel, target, expect)
        else:
            move_out(base, rel, target, expect)
    except BaseException:
        reason_file.unlink(missing_ok=True)
        raise
    fsync_dir(ctx.quarantine_dir)
    log.warning("quarantined %s: %s (moved to %s)", path, reason, target)
    return target


async def wait_for_space(ctx: SourceContext, stats: SourceStats, max_wait_s: float = 5.0) -> None:
    """Backpressure: the outbox refused a write; leave the data where it is and wait."""
    stats.backpressure = True
    ctx.outbox.space_available.clear()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_wait_s):  # not wait_for: it can drop a cancel (3.11)
            await ctx.outbox.space_available.wait()


# --------------------------------------------------------------------------- kinds

_C = TypeVar("_C", bound=SourceConfig)


@dataclass(frozen=True)
class SourceKind:
    config: type[SourceConfig]
    factory: Callable[[Any, SourceContext], Source]


KINDS: dict[str, SourceKind] = {}
"""Every source kind by name, registered by the last lines of its module; importing
`edged.daemon.sources` imports them all."""


def register(config: type[_C], factory: Callable[[_C, SourceContext], Source]) -> None:
    """Make a kind known to the config reader (its keys) and to the daemon (its source)."""
    KINDS[config.kind] = SourceKind(config, factory)


def make_source(config: SourceConfig, ctx: SourceContext) -> Source:
    return KINDS[config.kind].factory(config, ctx)
