"""Writers of watched directories swap a queued file, or a directory above it, for a
symlink to something outside: nothing of the outside file reaches the ingest, and the
outside file is never deleted or moved.

Real components end to end: the real sources queue real files into a real outbox, the
real uploader sends through the real client to a real `edged ingest` server (in-process,
loopback). The swap happens at a precise point, never by timing: after the source queued
the file and before the uploader starts; or from the server's request hook, i.e. after
the daemon opened the file and before the ack deletes it.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from grpclib.events import RecvRequest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter
from edged.client import UploadClient
from edged.daemon.config import BackoffConfig, UploadConfig
from edged.daemon.outbox import Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.capture import CaptureConfig, CaptureSource
from edged.daemon.sources.files import FilesConfig, FilesSource
from edged.daemon.sources.jsonl import JsonlConfig, JsonlSource
from edged.daemon.uploader import Uploader
from edged.ingest import IngestServer
from tests.support.capture_files import tabular_metadata, tabular_reading
from tests.support.hooked_server import hooked_server

SETTINGS = UploadConfig(workers=1, backoff=BackoffConfig(initial=0.005, max=0.05))
MARKER = b"OUTSIDE-SECRET-" + uuid.uuid4().hex.encode()


class SwapOnCall:
    """Server request hook: runs `action` once, on the first upload call to arrive."""

    def __init__(self) -> None:
        self.action: Callable[[], None] | None = None

    async def hook(self, event: RecvRequest) -> None:
        if "DataSyncService" in event.method_name and self.action is not None:
            action, self.action = self.action, None
            action()


@pytest.fixture
def swap() -> SwapOnCall:
    return SwapOnCall()


@pytest.fixture
async def server(tmp_path: Path, swap: SwapOnCall) -> AsyncIterator[IngestServer]:
    async with hooked_server(tmp_path / "ingest", swap.hook) as srv:
        yield srv


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


def secret(path: Path, body: bytes | None = None) -> Path:
    """An outside file only its owner may read (0600), full of MARKER."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body if body is not None else MARKER * 4096)
    return path


def twin(of: Path, path: Path) -> Path:
    """An outside secret with the size and mtime of `of`: only its identity tells them
    apart, so a delete that checks size and mtime alone would take it."""
    st = of.stat()
    secret(path, (MARKER * (st.st_size // len(MARKER) + 1))[: st.st_size])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return path


def link_over(path: Path, target: Path) -> None:
    """Atomically replace `path` by a symlink to `target` (what an attacker would do)."""
    tmp = path.with_name(path.name + ".swap")
    tmp.symlink_to(target)
    os.replace(tmp, path)


def dir_over(directory: Path, target: Path) -> None:
    """Move a directory away and put a symlink to `target` in its place."""
    directory.rename(directory.with_name(directory.name + ".moved"))
    directory.symlink_to(target, target_is_directory=True)


def leaked(server: IngestServer) -> bool:
    """Does anything the ingest stored (index, WAL, blobs) hold the outside bytes?"""
    data = server.settings.data_dir
    return any(MARKER in p.read_bytes() for p in data.rglob("*") if p.is_file())


async def upload(box: Outbox, server: IngestServer) -> None:
    async with UploadClient(server.address, tls=False) as client:
        up = Uploader(box, client, SETTINGS, idle_poll_s=0.05, rng=random.Random(7))
        await asyncio.wait_for(up.run(until_empty=True), 60)


def ctx(box: Outbox) -> SourceContext:
    return SourceContext("part-1", box, box.state_dir, clock=lambda: 2e9)


def files_source(box: Outbox, root: Path) -> FilesSource:
    return FilesSource(FilesConfig(path=root, settle=0.0), ctx(box))


async def queue_files(src: FilesSource, box: Outbox, n: int) -> None:
    for _ in range(2):  # settled: the same (size, mtime) on two looks
        await src.scan_once()
    assert (await box.stats()).items == n


def capture_binary(root: Path, payload: bytes, name: str = "cam") -> Path:
    meta = tabular_metadata(
        type=pb.DATA_TYPE_BINARY_SENSOR, component_name=name, file_extension=".jpg"
    )
    with CaptureWriter(root, meta) as w:
        reading = pb.SensorData(binary=payload)
        reading.metadata.CopyFrom(tabular_reading(0).metadata)
        w.write(reading)
    (path,) = w.closed_paths
    return path


# --------------------------------------------------------------------------- files


async def test_files_swapped_file_and_directory_after_queueing(
    tmp_path: Path, box: Outbox, server: IngestServer, outside: Path
) -> None:
    root = tmp_path / "uploads"
    (root / "sub").mkdir(parents=True)
    (root / "honest.bin").write_bytes(b"h" * 5000)
    (root / "file.bin").write_bytes(b"f" * 5000)
    (root / "sub" / "deep.bin").write_bytes(b"d" * 5000)
    src = files_source(box, root)
    await queue_files(src, box, 3)
    target = secret(outside / "key.bin")
    link_over(root / "file.bin", target)  # (a) the file itself
    secret(outside / "deep.bin")
    dir_over(root / "sub", outside)  # (b) a directory above it
    await upload(box, server)
    assert not leaked(server)
    blobs = await server.store.binaries()
    assert [b.size for b in blobs] == [5000]  # the honest file went through
    dead = await box.dead_letters()
    assert sorted(str(d.path) for d in dead) == [str(root / "file.bin"), str(root / "sub/deep.bin")]
    assert all(d.status == "SOURCE" for d in dead)
    assert "file.bin is now a symlink" in next(d.message for d in dead if "file" in str(d.path))
    assert target.read_bytes().startswith(MARKER) and (outside / "deep.bin").exists()
    assert not (root / "honest.bin").exists()  # deleted after its ack, as always


async def test_files_swap_after_open_sends_the_real_file_and_deletes_nothing_outside(
    tmp_path: Path, box: Outbox, server: IngestServer, outside: Path, swap: SwapOnCall
) -> None:
    root = tmp_path / "uploads"
    root.mkdir()
    (root / "file.bin").write_bytes(b"f" * 5000)
    src = files_source(box, root)
    await queue_files(src, box, 1)
    target = twin(root / "file.bin", outside / "key.bin")
    swap.action = lambda: link_over(root / "file.bin", target)  # (c) swapped before the ack
    await upload(box, server)
    assert swap.action is None  # the swap happened
    assert not leaked(server)
    assert [b.size for b in await server.store.binaries()] == [5000]
    assert target.read_bytes().startswith(MARKER)  # the ack deleted nothing outside
    assert (root / "file.bin").is_symlink()  # nor the link: nothing is done through it
    assert (await box.stats()).items == 0 and not await box.dead_letters()


async def test_files_directory_swap_after_open_deletes_nothing_outside(
    tmp_path: Path, box: Outbox, server: IngestServer, outside: Path, swap: SwapOnCall
) -> None:
    root = tmp_path / "uploads"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file.bin").write_bytes(b"f" * 5000)
    src = files_source(box, root)
    await queue_files(src, box, 1)
    target = twin(root / "sub" / "file.bin", outside / "file.bin")
    swap.action = lambda: dir_over(root / "sub", outside)
    await upload(box, server)
    assert swap.action is None
    assert not leaked(server)
    assert target.read_bytes().startswith(MARKER)
    assert (root / "sub.moved" / "file.bin").exists()  # unreachable by its path: kept


# --------------------------------------------------------------------------- capture


async def test_capture_binary_swapped_file_and_directory_after_queueing(
    tmp_path: Path, box: Outbox, server: IngestServer, outside: Path
) -> None:
    root = tmp_path / "capture"
    swapped = capture_binary(root, b"p" * 20_000, name="cam1")
    moved = capture_binary(root, b"q" * 20_000, name="cam2")
    honest = capture_binary(root, b"h" * 20_000, name="cam3")
    src = CaptureSource(CaptureConfig(path=root), ctx(box))
    await src.scan_once()
    assert (await box.stats()).items == 3
    target = secret(outside / "key.capture")
    link_over(swapped, target)  # (a)
    secret(outside / moved.name)
    dir_over(moved.parent, outside)  # (b)
    await upload(box, server)
    assert not leaked(server)
    assert [b.size for b in await server.store.binaries()] == [20_000]
    assert sorted(str(d.path) for d in await box.dead_letters()) == sorted(
        [str(swapped), str(moved)]
    )
    assert target.read_bytes().startswith(MARKER) and (outside / moved.name).exists()
    assert not honest.exists()


@pytest.mark.parametrize("what", ["file", "directory"])
async def test_capture_binary_swap_after_open_deletes_nothing_outside(
    tmp_path: Path,
    box: Outbox,
    server: IngestServer,
    outside: Path,
    swap: SwapOnCall,
    what: str,
) -> None:
    root = tmp_path / "capture"
    path = capture_binary(root, b"p" * 20_000)
    src = CaptureSource(CaptureConfig(path=root), ctx(box))
    await src.scan_once()
    if what == "file":
        target = twin(path, outside / "key.capture")
        swap.action = lambda: link_over(path, target)  # (c)
    else:
        target = twin(path, outside / path.name)
        swap.action = lambda: dir_over(path.parent, outside)
    await upload(box, server)
    assert swap.action is None
    assert not leaked(server)
    assert [b.size for b in await server.store.binaries()] == [20_000]
    assert target.read_bytes().startswith(MARKER)  # the last ack deleted nothing outside


async def test_capture_directory_swapped_before_a_watcher_event_is_not_read(
    tmp_path: Path, box: Outbox, server: IngestServer, outside: Path
) -> None:
    """A tabular capture file is read by the source itself: a directory swapped for a
    link to one holding a capture file of the same name must not be read or retired."""
    root = tmp_path / "capture"
    with CaptureWriter(root, tabular_metadata()) as w:
        w.write(tabular_reading(1))
    (path,) = w.closed_paths
    body = path.read_bytes()
    src = CaptureSource(CaptureConfig(path=root), ctx(box))
    # Outside: a valid capture file of the same name, holding the outside "secret".
    fake = tabular_reading(2)
    fake.struct.update({"secret": MARKER.decode()})
    with CaptureWriter(outside / "w", tabular_metadata()) as w2:
        w2.write(fake)
    (written,) = w2.closed_paths
    target = secret(outside / path.name, written.read_bytes())
    dir_over(path.parent, outside)
    await src.consider(path)  # what the watcher hands over for an event under that name
    await upload(box, server)
    assert not leaked(server)
    assert target.read_bytes() == written.read_bytes()  # neither read nor retired
    assert (path.parent.with_name(path.parent.name + ".moved") / path.name).read_bytes() == body


# --------------------------------------------------------------------------- jsonl


@pytest.mark.parametrize("pattern", ["imu.jsonl", "*.jsonl"])
async def test_jsonl_tailed_file_swapped_for_a_link_is_not_read(
    tmp_path: Path, box: Outbox, server: IngestServer, outside: Path, pattern: str
) -> None:
    """jsonl has no directory below its root (one directory, a name or a glob in it): the
    file itself is what can be swapped, and nothing is deleted."""
    logs = tmp_path / "log"
    logs.mkdir()
    f = logs / "imu.jsonl"
    f.write_bytes(b'{"seq": 0}\n{"seq": 1}\n')
    config = JsonlConfig(
        path=logs / pattern,
        name="imu",
        component_type="c",
        component_name="imu",
        method="R",
    )
    src = JsonlSource(config, ctx(box))
    await src.scan_once()
    target = secret(outside / "creds.jsonl", b'{"secret": "%s"}\n' % MARKER * 3)
    link_over(f, target)  # looks like a rename rotation with a new file in place
    await src.scan_once()
    await src.scan_once()
    await upload(box, server)
    assert not leaked(server)
    assert sorted(r.data["seq"] for r in await server.store.readings()) == [0, 1]
    assert "imu.jsonl is now a symlink" in (src.stats.last_error or "")
    assert target.exists()
