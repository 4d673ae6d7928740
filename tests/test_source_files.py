"""The `files` source on real directories and a real outbox: settle, ignore rules,
symlinks, labels from the path, claims across scans, backpressure, many files."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import KIND_FILE, Item, Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.files import (
    FilesConfig,
    FilesSource,
    Seen,
    is_settled,
    observe,
    path_labels,
    wanted_file,
)

T0 = 1_700_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "drop"
    d.mkdir()
    return d


def source(
    box: Outbox, root: Path, clock: Callable[[], float] | None = None, **kw: object
) -> FilesSource:
    settings: dict[str, object] = {"settle": 10.0, "name": "files-test"} | kw
    config = FilesConfig(path=root, **settings)  # type: ignore[arg-type]
    ctx = SourceContext("part-1", box, box.state_dir, clock=clock or Clock())
    return FilesSource(config, ctx)


def put(path: Path, data: bytes = b"hello", age_s: float = 3600.0) -> Path:
    """A file last modified `age_s` before T0 (the tests' clock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = int((T0 - age_s) * 1e9)
    os.utime(path, ns=(t, t))
    return path


async def scan(src: FilesSource, times: int = 1) -> None:
    for _ in range(times):
        await src.scan_once()


async def leased(box: Outbox) -> list[Item]:
    items = []
    # A day-long lease: a slow drain (a loaded machine) must not see early leases expire
    # and come back as repeats.
    while (
        item := await box.lease(lease_s=86400, max_readings=10000, max_bytes=1 << 30)
    ) is not None:
        items.append(item)
    return items


async def queued_paths(box: Outbox) -> list[str]:
    items = await leased(box)
    assert all(i.kind == KIND_FILE for i in items)
    return sorted(str(i.path) for i in items)


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("name", "patterns", "want"),
    [
        ("a.mp4", ("*",), True),
        ("a.mp4", ("*.mp4", "*.bag"), True),
        ("a.bag", ("*.mp4", "*.bag"), True),
        ("a.txt", ("*.mp4", "*.bag"), False),
        ("A.MP4", ("*.mp4",), False),  # case-sensitive, as on the robot's filesystem
        (".hidden", ("*",), False),
        ("x.tmp", ("*",), False),
        ("x.part", ("*",), False),
        ("x~", ("*",), False),
        ("r.capture", ("*",), False),  # the capture source owns these
        ("r.prog", ("*",), False),
    ],
)
def test_wanted_file(name: str, patterns: tuple[str, ...], want: bool) -> None:
    assert wanted_file(name, patterns) is want


@pytest.mark.parametrize(
    ("rel", "tags", "datasets"),
    [
        ("f.bin", [], []),
        ("tag=a/f.bin", ["a"], []),
        ("tag=a/x/tag=b/dataset=d1/f.bin", ["a", "b"], ["d1"]),
        ("tag=/dataset=/f.bin", [], []),  # empty values mean nothing
        ("x/tag=a.bin", [], []),  # a file name is not a directory component
        ("tags=a/datasets=b/f", [], []),
    ],
)
def test_path_labels(rel: str, tags: list[str], datasets: list[str]) -> None:
    assert path_labels(PurePosixPath(rel)) == (tags, datasets)


S = int(1e9)


@pytest.mark.parametrize(
    ("prev", "size", "mtime_s", "ready"),
    [
        (None, 5, 0, True),  # old by its mtime: one look is enough (`--until-empty`)
        (None, 5, 95, False),  # 5 s old < 10 s
        (None, 5, 90, True),
        (None, 0, 0, False),  # empty
        (Seen(4, 0, 99.0, 1000.0, 1000.0), 5, 0, True),  # grew, but its mtime is old
        (None, 5, 200, False),  # mtime in the future: watch it first
        (Seen(5, 200 * S, 95.0, 1005.0, 1002.0), 5, 200, False),  # watched 8 s
        (Seen(5, 200 * S, 90.0, 1010.0, 995.0), 5, 200, True),  # watched 10 s unchanged
        (Seen(5, 200 * S, 90.0, 1010.0, 990.0), 6, 200, False),  # changed: watch again
    ],
)
def test_is_settled(prev: Seen | None, size: int, mtime_s: int, ready: bool) -> None:
    """The wall clock says 100 s, the monotonic one 1010 s."""
    seen = observe(prev, size, mtime_s * S, 100.0, 1010.0)
    assert is_settled(seen, 10.0) is ready


# --------------------------------------------------------------------------- scans


async def test_patterns_and_ignored_names(box: Outbox, root: Path) -> None:
    keep = [put(root / "a.mp4"), put(root / "sub" / "b.bag")]
    for rel in [
        "c.txt",
        ".hidden.mp4",
        "d.mp4.tmp",
        "e.mp4.part",
        "f.mp4~",
        ".dir/g.mp4",
        "failed/h.mp4",
        "datasetUpload/i.mp4",
        "sequences/j.mp4",
        "sub/failed/k.mp4",
        "x.capture",
        "y.prog",
    ]:
        put(root / rel)
    src = source(box, root, patterns=("*.mp4", "*.bag", "*.capture", "*.prog"))
    await scan(src)
    assert await queued_paths(box) == sorted(str(p) for p in keep)
    assert src.stats.files_done == 2


async def test_settle_waits_for_quiet_file(box: Outbox, root: Path) -> None:
    clock = Clock()
    src = source(box, root, clock, settle=10.0)
    f = put(root / "video.mp4", age_s=1.0)  # modified a second ago
    await scan(src, 3)
    assert await queued_paths(box) == []
    clock.now += 5
    await scan(src)
    assert await queued_paths(box) == []
    with f.open("ab") as fh:  # still being written: the clock starts over
        fh.write(b"more")
    t = int((clock.now - 1) * 1e9)
    os.utime(f, ns=(t, t))
    clock.now += 8
    await scan(src)
    assert await queued_paths(box) == []
    clock.now += 2
    await scan(src)
    [item] = await leased(box)
    assert item.path == str(f) and item.length == f.stat().st_size == 9


async def test_one_look_is_enough_for_a_file_settled_by_its_mtime(box: Outbox, root: Path) -> None:
    """`edged run --until-empty` scans once: an old file must go in that scan."""
    put(root / "old.bin")
    src = source(box, root)
    await src.scan_once()
    assert len(await queued_paths(box)) == 1


async def test_mtime_in_the_future_settles_by_watching(box: Outbox, root: Path) -> None:
    """A clock stepped back (or a stale clock at boot) must not hold a file until the
    clock catches up with its mtime: watched unchanged for `settle`, it goes."""
    mono = [500.0]
    ctx = SourceContext("part-1", box, box.state_dir, clock=Clock(), monotonic=lambda: mono[0])
    src = FilesSource(FilesConfig(path=root, settle=10.0, name="f"), ctx)
    put(root / "ahead.bin", age_s=-30 * 86400)  # mtime a month ahead of the clock
    await src.scan_once()
    mono[0] += 9.0
    await src.scan_once()
    assert await queued_paths(box) == []
    mono[0] += 1.0
    await src.scan_once()
    assert await queued_paths(box) == [str(root / "ahead.bin")]


async def test_metadata_labels_and_names(box: Outbox, root: Path) -> None:
    f = put(root / "tag=field" / "dataset=ds-1" / "run 3" / "tag=night" / "clip.mp4", b"x" * 10)
    put(root / "README", b"plain")
    src = source(box, root, tags=("cfg", "night"), dataset_ids=("ds-0",))
    await scan(src)
    items = {i.path: i for i in await leased(box)}
    meta = pb.UploadMetadata.FromString(items[str(f)].metadata)
    assert meta.part_id == "part-1" and meta.type == pb.DATA_TYPE_FILE
    assert meta.file_name == "tag=field/dataset=ds-1/run 3/tag=night/clip"
    assert meta.file_extension == ".mp4" and meta.mime_type == "video/mp4"
    assert list(meta.tags) == ["cfg", "night", "field"]
    assert list(meta.dataset_ids) == ["ds-0", "ds-1"]
    assert meta.file_modify_time.ToNanoseconds() == f.stat().st_mtime_ns
    assert meta.HasField("file_create_time")
    plain = pb.UploadMetadata.FromString(items[str(root / "README")].metadata)
    assert (plain.file_name, plain.file_extension, plain.mime_type) == ("README", "", "")
    assert items[str(f)].length == 10 and not items[str(f)].stored


async def test_symlinks_never_followed(box: Outbox, root: Path, tmp_path: Path) -> None:
    outside = put(tmp_path / "secret" / "passwd")
    inside = put(root / "real.bin")
    (root / "link-to-file").symlink_to(outside)
    (root / "link-to-inside").symlink_to(inside)
    (root / "link-to-dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    put(root / "sub" / "deep.bin")
    (root / "sub" / "up").symlink_to(root.parent, target_is_directory=True)
    src = source(box, root)
    await scan(src)
    assert await queued_paths(box) == sorted([str(inside), str(root / "sub" / "deep.bin")])


async def test_symlinked_root_resolved_once(box: Outbox, root: Path, tmp_path: Path) -> None:
    f = put(root / "a.bin")
    link = tmp_path / "link-root"
    link.symlink_to(root, target_is_directory=True)
    src = source(box, link)
    await scan(src)
    assert await queued_paths(box) == [str(f)]


async def test_not_enqueued_twice(box: Outbox, root: Path) -> None:
    put(root / "a.bin")
    src = source(box, root)
    await scan(src)
    await scan(src)
    assert len(await queued_paths(box)) == 1
    again = source(box, root)  # a restart: the outbox's claim says "queued"
    await scan(again)
    assert await queued_paths(box) == []
    assert src.stats.files_seen == 1 and again.stats.files_seen == 0


async def test_kept_after_upload_and_resent_when_changed(box: Outbox, root: Path) -> None:
    f = put(root / "keep.bin", b"v1")
    src = source(box, root, delete_after_upload=False)
    await scan(src)
    [item] = await leased(box)
    await box.ack(item)
    assert f.read_bytes() == b"v1"  # kept
    for s in (src, source(box, root, delete_after_upload=False)):
        await scan(s)
    assert await queued_paths(box) == []
    put(f, b"version 2", age_s=100)
    await scan(src)
    [item2] = await leased(box)
    assert item2.path == str(f) and item2.length == len(b"version 2")


async def test_deleted_by_outbox_after_ack_by_default(box: Outbox, root: Path) -> None:
    f = put(root / "gone.bin")
    src = source(box, root)
    await scan(src)
    [item] = await leased(box)
    assert f.exists()  # the source never deletes
    await box.ack(item)
    assert not f.exists()
    await scan(src)
    assert await queued_paths(box) == []


async def test_backpressure_leaves_file_until_space(tmp_path: Path, root: Path) -> None:
    free = {"bytes": 0}
    box = await Outbox.open(
        tmp_path / "state", OutboxConfig(min_free_disk=1 << 20), free_disk=lambda _: free["bytes"]
    )
    try:
        f = put(root / "big.bin")
        src = source(box, root)
        await scan(src, 3)
        assert f.exists() and await queued_paths(box) == []
        assert src.stats.backpressure and "free disk" in (src.stats.last_error or "")
        free["bytes"] = 1 << 40
        await src.scan_once()
        assert await queued_paths(box) == [str(f)]
        assert not src.stats.backpressure and src.stats.files_done == 1
    finally:
        await box.close()


async def test_vanished_file_is_skipped(box: Outbox, root: Path) -> None:
    f = put(root / "brief.bin", age_s=1.0)  # gone before it settled
    src = source(box, root)
    await src.scan_once()
    f.unlink()
    await src.scan_once()
    assert await queued_paths(box) == [] and src.stats.last_error is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
async def test_unreadable_file_warns_and_retries(
    box: Outbox, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = put(root / "locked.bin")
    f.chmod(0)
    src = source(box, root)
    await scan(src, 4)
    assert await queued_paths(box) == []
    assert "cannot read" in (src.stats.last_error or "")
    assert sum("cannot read" in r.getMessage() for r in caplog.records) == 1
    f.chmod(0o600)
    await scan(src)
    assert await queued_paths(box) == [str(f)]


async def test_thousands_of_nested_files_exactly_once(box: Outbox, root: Path) -> None:
    expected = set()
    for d in range(40):
        sub = root / f"d{d % 8}" / f"e{d}"
        sub.mkdir(parents=True)
        for i in range(50):
            expected.add(str(put(sub / f"f{i}.bin", b"%d" % i)))
    src = source(box, root)
    await scan(src)
    await scan(src)
    paths = await queued_paths(box)
    assert len(paths) == 2000 and set(paths) == expected
    assert src.stats.files_done == 2000 and src.stats.files_seen == 2000


async def test_run_picks_up_new_files(box: Outbox, root: Path) -> None:
    put(root / "early.bin")
    src = source(box, root, time.time, settle=0.2)
    task = asyncio.create_task(src.run())
    try:
        await wait_for_files(box, 1)
        (root / "new").mkdir()
        late = root / "new" / "late.bin"
        late.write_bytes(b"late")
        await wait_for_files(box, 2)
        assert str(late) in await queued_paths(box)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def wait_for_files(box: Outbox, n: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while (await box.stats()).per_kind[KIND_FILE].items < n:
        assert time.monotonic() < end, f"fewer than {n} files queued within {deadline_s}s"
        await asyncio.sleep(0.02)


async def test_run_waits_for_missing_root(box: Outbox, tmp_path: Path) -> None:
    root = tmp_path / "later"
    src = source(box, root, time.time, settle=0.1)
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.1)  # let it start while the root is missing
        assert not task.done()
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "a.bin").write_bytes(b"a")
        await wait_for_files(box, 1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
