"""Odd files, in process (test_bad_inputs.py covers them end to end):

- a file name that is not UTF-8 (Linux names are bytes) is stored, sent and shown: SQLite
  text and protobuf strings must be UTF-8, and a source that crashed on one would hit the
  same file on every restart, so every file after it would wait forever;
- a capture file edged may not read (EACCES) does not hold up the others.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from edged.capture import CaptureWriter, open_capture
from edged.daemon.outbox import ClaimRecord, ClaimState, Outbox, Progress
from edged.daemon.sources.base import SourceContext, quarantine
from edged.daemon.sources.capture import CaptureConfig, CaptureSource
from edged.daemon.sources.files import FilesConfig, file_metadata
from edged.daemon.status_view import render
from tests.support.capture_files import tabular_metadata, tabular_reading
from tests.support.outbox_items import enqueue_file

ODD = os.fsdecode(b"odd-\xff.bin")  # the str Python hands out for that name: '\udcff'


async def test_outbox_stores_and_finds_paths_that_are_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / ODD
    path.write_bytes(b"x" * 100)
    st = path.stat()
    box = await Outbox.open(tmp_path / "state")
    try:
        await enqueue_file(box, path)
        assert await box.claim_of(str(path)) == ClaimRecord(
            str(path), ClaimState.PENDING, st.st_size, st.st_mtime_ns
        )
        await box.save_progress(Progress("src", str(path), st.st_ino, 7, 0))
        progress = await box.progress_of("src", str(path))
        assert progress is not None and progress.offset == 7
        item = await box.lease(lease_s=60, max_readings=10, max_bytes=1 << 20)
        assert item is not None and item.path == str(path)
        await box.dead_letter(item, "SOURCE", f"cannot read {path}")
        [letter] = await box.dead_letters()
        assert letter.path == str(path) and "\\udcff" in letter.message
        await box.retry_dead(None)
        item = await box.lease(lease_s=60, max_readings=10, max_bytes=1 << 20)
        assert item is not None
        await box.ack(item)
        assert not path.exists()  # delete_after: the acked file is gone, and its claim
        assert await box.claim_of(str(path)) is None
    finally:
        await box.close()


def test_wire_names_are_utf8(tmp_path: Path) -> None:
    path = tmp_path / ODD
    path.write_bytes(b"x")
    meta = file_metadata(
        "p",
        FilesConfig(path=tmp_path),
        PurePosixPath("tag=\udcfe", ODD),
        path.stat(),
    )
    meta.SerializeToString()  # raised UnicodeEncodeError before the fix
    assert (meta.file_name, meta.file_extension) == ("tag=\\xfe/odd-\\xff", ".bin")
    assert list(meta.tags) == ["\\xfe"]


def test_quarantine_reason_keeps_the_real_name(tmp_path: Path) -> None:
    path = tmp_path / ODD
    path.write_bytes(b"junk")
    ctx = SourceContext("p", None, tmp_path / "state")  # type: ignore[arg-type]
    target = quarantine(ctx, path, "bad")
    reason = Path(str(target) + ".reason").read_bytes()
    assert b"odd-\xff.bin" in reason and target.read_bytes() == b"junk"


def test_status_view_renders_names_that_are_not_utf8() -> None:
    status: dict[str, Any] = {
        "version": "x",
        "state": "running",
        "uptime_s": 1,
        "outbox": {"items": 0, "bytes": 0, "oldest_age_s": None, "per_kind": {}},
        "uploaded": {"items": 0, "readings": 0, "bytes": 0},
        "rates": {"readings_per_s": 0, "bytes_per_s": 0},
        "cloud": {"address": "a", "last_success_at": None, "last_error": None},
        "dead_letters": 0,
        "quarantined": 0,
        "dropped": {"readings": 0},
        "sources": [{"name": "f", "files_seen": 1, "last_error": f"cannot read /u/{ODD}"}],
    }
    text = render(status)
    text.encode("utf-8")  # what print() does; raised before the fix
    assert "cannot read /u/odd-\\xff.bin" in text


async def test_unreadable_capture_file_does_not_hold_up_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "capture"
    paths: list[Path] = []
    for first in (0, 10):
        with CaptureWriter(root, tabular_metadata(component_name=f"c{first}")) as w:
            for seq in range(first, first + 10):
                w.write(tabular_reading(seq))
        paths += w.closed_paths
    locked, other = sorted(paths)  # the unreadable one comes first in the scan

    def refusing_open(path: Any, **kw: Any) -> Any:
        # Root reads any file whatever its mode; the refusal is injected instead.
        if Path(path) == locked:
            os.close(kw["fd"])
            raise PermissionError(13, "Permission denied", str(path))
        return open_capture(path, **kw)

    box = await Outbox.open(tmp_path / "state")
    try:
        source = CaptureSource(
            CaptureConfig(path=root), SourceContext("p", box, tmp_path / "state")
        )
        monkeypatch.setattr("edged.daemon.sources.capture.open_capture", refusing_open)
        await source.scan_once()  # raised PermissionError before the fix
        assert (await box.stats()).readings == 10
        assert locked.exists() and not other.exists()
        assert "cannot read" in (source.stats.last_error or "")
        assert source.stats.quarantined == 0  # nothing wrong with the data
        monkeypatch.setattr("edged.daemon.sources.capture.open_capture", open_capture)
        await source.scan_once()  # readable now: the next scan takes it
        assert (await box.stats()).readings == 20 and not locked.exists()
    finally:
        await box.close()
