"""The source contract (sources/base.py), run against every source kind.

What all kinds promise: a completed file is committed exactly once, also across a
restart; nothing is read through a symlink put into the watched directory; hidden and
temporary names are never input; bad input is quarantined with a reason naming the path
and byte offset and does not stop the files after it; a file still being written is not
taken early; an outbox that refuses writes leaves the file where it is (committed later,
once); a missing directory is the source's `last_error` until it appears; stopping is
prompt, also while waiting for outbox space.

Each kind is driven through a small adapter (`Kind`) that knows how that kind names and
writes a complete, a corrupt and an unfinished input file; real files, real SQLite."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter
from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import KIND_FILE, Outbox, OutboxStats
from edged.daemon.sources.base import Source, SourceContext
from edged.daemon.sources.capture import CaptureConfig, CaptureSource
from edged.daemon.sources.files import FilesConfig, FilesSource
from edged.daemon.sources.jsonl import JsonlConfig, JsonlSource

READINGS = 3  # per complete file
OLD = time.time() - 3600  # an mtime long settled


def _old(path: Path) -> Path:
    os.utime(path, (OLD, OLD))
    return path


class Kind:
    """How one source kind is configured, fed and counted."""

    name: str
    quarantines_content: bool  # parses its input, so bad content is possible

    def source(self, root: Path, ctx: SourceContext) -> Source:
        raise NotImplementedError

    def complete(self, root: Path, stem: str) -> Path:
        """A finished input file holding READINGS readings (or one file)."""
        raise NotImplementedError

    def corrupt(self, root: Path, stem: str) -> Path:
        raise NotImplementedError

    def unfinished(self, root: Path, stem: str) -> Callable[[], object]:
        """Start writing a file; the returned call finishes it."""
        raise NotImplementedError

    def committed(self, stats: OutboxStats) -> int:
        return stats.readings

    def per_file(self) -> int:
        return READINGS


class CaptureKind(Kind):
    name = "capture"
    quarantines_content = True

    def source(self, root: Path, ctx: SourceContext) -> Source:
        return CaptureSource(CaptureConfig(path=root), ctx, booted_at=0.0)

    @staticmethod
    def _meta(stem: str) -> pb.DataCaptureMetadata:
        return pb.DataCaptureMetadata(
            component_type="rdk:component:sensor",
            component_name=stem,
            method_name="Readings",
            type=pb.DATA_TYPE_TABULAR_SENSOR,
            file_extension=".dat",
        )

    def _writer(self, root: Path, stem: str) -> CaptureWriter:
        writer = CaptureWriter(root / stem, self._meta(stem), max_file_readings=READINGS + 1)
        t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        for i in range(READINGS):
            writer.write_tabular({"seq": float(i)}, time_requested=t, time_received=t)
        return writer

    def complete(self, root: Path, stem: str) -> Path:
        with self._writer(root, stem) as writer:
            pass
        [path] = writer.closed_paths
        return Path(path)

    def corrupt(self, root: Path, stem: str) -> Path:
        path = root / f"{stem}.capture"
        path.write_bytes(b"this is not a capture file at all\n" * 4)
        return _old(path)

    def unfinished(self, root: Path, stem: str) -> Callable[[], object]:
        writer = self._writer(root, stem)
        writer.flush()
        return writer.close


class JsonlKind(Kind):
    name = "jsonl"
    quarantines_content = True

    def source(self, root: Path, ctx: SourceContext) -> Source:
        return JsonlSource(JsonlConfig(path=root / "*.jsonl", component_name="imu"), ctx)

    @staticmethod
    def _lines(n: int) -> bytes:
        return b"".join(json.dumps({"seq": i}).encode() + b"\n" for i in range(n))

    def complete(self, root: Path, stem: str) -> Path:
        path = root / f"{stem}.jsonl"
        path.write_bytes(self._lines(READINGS))
        return path

    def corrupt(self, root: Path, stem: str) -> Path:
        path = root / f"{stem}.jsonl"
        path.write_bytes(b"this is not json\n")
        return path

    def unfinished(self, root: Path, stem: str) -> Callable[[], object]:
        path = root / f"{stem}.jsonl"
        whole = self._lines(READINGS)
        path.write_bytes(whole[: whole.index(b"\n")])  # a first line without its newline
        return lambda: path.write_bytes(whole)


class FilesKind(Kind):
    name = "files"
    quarantines_content = False  # any bytes are a valid file: nothing to find corrupt

    def source(self, root: Path, ctx: SourceContext) -> Source:
        return FilesSource(FilesConfig(path=root, settle=60.0), ctx)

    def complete(self, root: Path, stem: str) -> Path:
        path = root / f"{stem}.bin"
        path.write_bytes(b"payload " * 8)
        return _old(path)

    def unfinished(self, root: Path, stem: str) -> Callable[[], object]:
        path = root / f"{stem}.bin"
        path.write_bytes(b"half")  # modified just now: not settled

        def finish() -> None:
            with path.open("ab") as f:
                f.write(b" and the rest")
            _old(path)

        return finish

    def committed(self, stats: OutboxStats) -> int:
        return stats.per_kind[KIND_FILE].items

    def per_file(self) -> int:
        return 1


KINDS = [CaptureKind(), JsonlKind(), FilesKind()]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> Kind:
    result: Kind = request.param
    return result


@dataclass
class Env:
    root: Path
    state: Path
    box: Outbox

    def ctx(self) -> SourceContext:
        return SourceContext("part-1", self.box, self.state, rescan_s=3600.0)

    async def reopen(self, *, full: bool = False) -> None:
        """Open the outbox again; `full`: on a disk with no room left (every write is
        refused with OutboxFull, by reference or not)."""
        await self.box.close()
        if full:
            limits = OutboxConfig(min_free_disk=1 << 20)
            self.box = await Outbox.open(self.state, limits, free_disk=lambda _: 0)
        else:
            self.box = await Outbox.open(self.state, _limits())


def _limits() -> OutboxConfig:
    return OutboxConfig(min_free_disk=0)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    root = tmp_path / "watched"
    root.mkdir()
    e = Env(root, tmp_path / "state", await Outbox.open(tmp_path / "state", _limits()))
    try:
        yield e
    finally:
        await e.box.close()


async def committed(kind: Kind, box: Outbox) -> int:
    return kind.committed(await box.stats())


async def wait_until(what: str, check: Callable[[], Any], deadline_s: float = 20.0) -> None:
    """Poll an observable condition (bounded); fail naming it."""
    end = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def stop(task: asyncio.Task[None], within_s: float = 5.0) -> None:
    """Cancel a running source; it must be gone within `within_s`."""
    task.cancel()
    async with asyncio.timeout(within_s):
        with pytest.raises(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- the contract


async def test_a_completed_file_is_committed_exactly_once_across_restarts(
    kind: Kind, env: Env
) -> None:
    kind.complete(env.root, "one")
    first = kind.source(env.root, env.ctx())
    await first.scan_once()
    await first.scan_once()  # a second pass adds nothing
    assert await committed(kind, env.box) == kind.per_file()
    await env.reopen()
    again = kind.source(env.root, env.ctx())
    await again.scan_once()
    assert await committed(kind, env.box) == kind.per_file()
    assert again.stats.quarantined == 0


async def test_a_symlink_put_into_the_watched_directory_is_not_followed(
    kind: Kind, env: Env, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = kind.complete(outside, "secret")
    before = target.read_bytes()
    (env.root / target.name).symlink_to(target)
    src = kind.source(env.root, env.ctx())
    await src.scan_once()
    assert await committed(kind, env.box) == 0
    assert target.read_bytes() == before  # neither read nor moved nor deleted
    assert (env.root / target.name).is_symlink()


@pytest.mark.parametrize("name", [".hidden{ext}", "x{ext}.tmp", "x{ext}.part", "x{ext}~"])
async def test_hidden_and_temporary_names_are_not_input(kind: Kind, env: Env, name: str) -> None:
    made = kind.complete(env.root, "made")
    real = env.root / name.format(ext=made.suffix)
    made.rename(real)
    src = kind.source(env.root, env.ctx())
    await src.scan_once()
    assert await committed(kind, env.box) == 0
    assert real.exists()


async def test_bad_input_is_quarantined_naming_path_and_offset_and_the_rest_goes_on(
    kind: Kind, env: Env
) -> None:
    if not kind.quarantines_content:
        pytest.skip(f"the {kind.name} source takes any bytes: no content can be bad")
    bad = kind.corrupt(env.root, "0-bad")
    kind.complete(env.root, "1-good")
    src = kind.source(env.root, env.ctx())
    await src.scan_once()
    assert await committed(kind, env.box) == kind.per_file()
    assert src.stats.quarantined == 1
    reasons = b"".join(p.read_bytes() for p in env.ctx().quarantine_dir.iterdir())
    assert str(bad).encode() in reasons
    assert b"offset" in reasons
    await src.scan_once()  # quarantined once, never retried forever
    assert src.stats.quarantined == 1
    assert await committed(kind, env.box) == kind.per_file()


async def test_a_file_still_being_written_is_not_taken_early(kind: Kind, env: Env) -> None:
    finish = kind.unfinished(env.root, "busy")
    src = kind.source(env.root, env.ctx())
    await src.scan_once()
    assert await committed(kind, env.box) == 0
    finish()
    await src.scan_once()
    assert await committed(kind, env.box) == kind.per_file()


async def test_a_full_outbox_leaves_the_file_in_place_and_stop_is_prompt(
    kind: Kind, env: Env
) -> None:
    await env.reopen(full=True)
    path = kind.complete(env.root, "wait")
    src = kind.source(env.root, env.ctx())
    task = asyncio.create_task(src.run())
    try:

        async def pushed_back() -> bool:
            return src.stats.backpressure

        await wait_until("backpressure", pushed_back)
    finally:
        await stop(task)
    assert path.exists() and await committed(kind, env.box) == 0
    await env.reopen()  # room again: committed once, nothing lost
    again = kind.source(env.root, env.ctx())
    await again.scan_once()
    assert await committed(kind, env.box) == kind.per_file()


async def test_a_missing_directory_is_the_last_error_until_it_appears(kind: Kind, env: Env) -> None:
    env.root.rmdir()
    src = kind.source(env.root, env.ctx())
    task = asyncio.create_task(src.run())
    try:

        async def said() -> bool:
            return "does not exist" in (src.stats.last_error or "")

        await wait_until("the missing directory in last_error", said)
        env.root.mkdir()
        kind.complete(env.root, "late")

        async def taken() -> bool:
            return await committed(kind, env.box) == kind.per_file()

        await wait_until("the file in the new directory", taken)
        assert src.stats.last_error is None
    finally:
        await stop(task)


async def test_stop_is_prompt_while_watching(kind: Kind, env: Env) -> None:
    src = kind.source(env.root, env.ctx())
    task = asyncio.create_task(src.run())
    kind.complete(env.root, "seen")

    async def taken() -> bool:
        return await committed(kind, env.box) == kind.per_file()

    try:
        await wait_until("the file to be committed", taken)
    finally:
        await stop(task)
