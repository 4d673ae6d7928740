"""Disk full: state_dir on a small tmpfs made by the test. edged stops taking input
(capture files stay on disk), stays alive, and resumes once uploads free space."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

from tests.reliability.common import record
from tests.support.capture_files import write_capture
from tests.support.credentials import KeyFile
from tests.support.daemon import cloud_section, daemon, status, write_config
from tests.support.ingest_db import stored_seqs
from tests.support.processes import ingest_process
from tests.support.tmpfs import needs_root, tmpfs
from tests.support.waiting import wait_for

TMPFS_BYTES = 3 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_root
def test_state_dir_full_is_backpressure_then_recovers(tmp_path: Path, key: KeyFile) -> None:
    port = free_port()  # the server comes up only later: the outbox must fill first
    write_capture(tmp_path / "capture", 0, 40_000, per_file=1000)  # ~3.5 MB encoded
    with tmpfs(tmp_path / "state", TMPFS_BYTES) as state:
        cfg = write_config(
            tmp_path / "edged.yaml",
            f"""\
part_id: robot-full
state_dir: {state}
{cloud_section(port, key)}sources:
  - kind: capture
    path: {tmp_path / "capture"}
upload:
  backoff: {{initial: 50ms, max: 300ms}}
outbox:
  min_free_disk: 256KiB
status:
  socket: {tmp_path / "edged.sock"}
""",
        )
        with daemon(cfg) as proc:
            wait_for("status socket", (tmp_path / "edged.sock").exists)
            wait_for(
                "backpressure",
                lambda: any(s["backpressure"] for s in status(cfg)["sources"]),
                timeout=60,
            )
            held = status(cfg)
            left_on_disk = len(list((tmp_path / "capture").rglob("*.capture")))
            assert left_on_disk > 0, "sources must stay on disk while the outbox is full"
            assert proc.poll() is None, "daemon died on a full disk"
            with ingest_process(
                tmp_path / "ingest",
                [
                    "--listen",
                    f"127.0.0.1:{port}",
                    *key.ingest_args(),
                ],
            ):
                wait_for(
                    "all capture files consumed",
                    lambda: not list((tmp_path / "capture").rglob("*.capture")),
                    timeout=120,
                )
                wait_for("outbox drained", lambda: status(cfg)["outbox"]["items"] == 0, 120)
                proc.send_signal(15)
                assert proc.wait(30) == 0
        db = sqlite3.connect(f"file:{tmp_path / 'ingest' / 'ingest.sqlite3'}?mode=ro", uri=True)
        seqs = sorted(stored_seqs(db))
        db.close()
    record(
        "disk-full",
        tmpfs_bytes=TMPFS_BYTES,
        readings_offered=40_000,
        outbox_items_when_full=held["outbox"]["items"],
        files_left_on_disk=left_on_disk,
        missing=40_000 - len(set(seqs)),
        duplicates=len(seqs) - len(set(seqs)),
    )
    assert seqs == list(range(40_000))
