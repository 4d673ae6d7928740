"""Bad input against a running daemon: every case ends in its documented outcome and
`edged status` keeps answering.

- corrupt capture file (garbage record): the readings before it delivered; the file
  quarantined with a `.reason` naming path, byte offset and cause;
- truncated capture file (power cut mid-record): every whole reading delivered, the file
  retired, `truncated` counted;
- zero-length capture file: quarantined ("empty file: no DataCaptureMetadata header");
- huge (> 4 GiB) sparse plain file: queued by reference (outbox `stored_bytes` and the
  state_dir stay small), streamed with flat RSS until the server's `--max-upload-bytes`
  refuses it: a dead letter (INVALID_ARGUMENT), the source file kept, other items flow;
- unreadable file (plain and capture): warned, left in place, taken by the next scan
  once readable;
- FIFO named like an input, directory named like a file: skipped, never opened (opening
  a FIFO would block);
- non-UTF-8 file names (plain and capture): uploaded, the wire name spelling odd bytes as
  `\\xNN`; status JSON and the human view still render;
- symlink loops in watched directories: never followed; the daemon keeps serving.

Unreadable files: tests run as root, which reads any file whatever its mode. So as root
the daemon runs under `setpriv` without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: still
uid 0, but mode bits bind it like any user, and chmod 000 really makes a file unreadable.

The huge file: 5 GiB apparent size, a few KiB on disk. Streaming all of it over loopback
would take most of a minute, so the ingest runs with `--max-upload-bytes` (192 MiB quick,
2 GiB full): edged streams that much (RSS sampled throughout), the server refuses the
rest, and the item becomes a dead letter while everything else flows.

Garbage on the status socket and malformed config files are covered by
tests/test_daemon.py (test_notify_socket_ready_watchdog_stopping_and_garbage_on_status_socket,
test_bad_config_exits_2_naming_key_and_line); not repeated here.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import psutil

from edged.capture import CaptureWriter
from tests.reliability.common import cycles, record
from tests.support.capture_files import tabular_metadata, tabular_reading
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, edged_ctl, status, write_config
from tests.support.ingest_db import ingest_count, ingest_seqs
from tests.support.processes import ingest_process
from tests.support.waiting import wait_for

GiB, MiB = 1 << 30, 1 << 20
HUGE = 5 * GiB
ROOT = os.geteuid() == 0
# uid 0 without the capabilities that bypass file modes (see the module docstring).
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search"]
NO_DAC += ["--bounding-set=-dac_override,-dac_read_search", "--"]


def capture_bytes(tmp: Path, first: int, n: int) -> bytes:
    """One finished capture file's bytes holding readings first..first+n-1."""
    stage = tmp / f"stage-{first}"
    with CaptureWriter(stage, tabular_metadata(component_name=f"bad{first}")) as w:
        for seq in range(first, first + n):
            w.write(tabular_reading(seq))
    [path] = w.closed_paths
    data = path.read_bytes()
    shutil.rmtree(stage)
    return data


def place(directory: Path, name: bytes, data: bytes, mode: int = 0o600) -> Path:
    """Write under a temporary name, then rename: the source only sees finished files."""
    target = os.path.join(os.fsencode(directory), name)
    tmp = target + b".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.rename(tmp, target)
    return Path(os.fsdecode(target))


def disk_usage(root: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in root.rglob("*"))


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_bad_inputs_end_in_their_documented_outcome(tmp_path: Path, key: KeyFile) -> None:
    capture, uploads = tmp_path / "capture", tmp_path / "uploads"
    capture.mkdir()
    uploads.mkdir()
    cap_mib = cycles(192, 2048)
    good = capture_bytes(tmp_path, 0, 10)
    # Corrupt: a length prefix promising 5 bytes, then 5 bytes that are no SensorData.
    corrupt = capture_bytes(tmp_path, 1000, 10) + b"\x05\xff\xff\xff\xff\xff"
    full = capture_bytes(tmp_path, 2000, 10)
    truncated = full[: len(full) - 7]  # power cut inside the last record
    odd_name = capture_bytes(tmp_path, 3000, 10)
    locked = capture_bytes(tmp_path, 4000, 10)
    # Symlink loops and non-inputs, present before the daemon starts.
    for root in (capture, uploads):
        os.symlink(".", root / "loop")
        os.symlink(root / "b", root / "a")
        os.symlink(root / "a", root / "b")
        (root / "sub").mkdir()
        os.symlink("..", root / "sub" / "up")
    os.mkfifo(uploads / "pipe.bin")
    os.mkfifo(capture / "pipe.capture")
    (capture / "dir.capture").mkdir()
    (uploads / "dir.bin").mkdir()

    with ingest_process(
        tmp_path / "ingest",
        [
            *key.ingest_args(),
            "--max-upload-bytes",
            f"{cap_mib}MiB",
        ],
    ) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        with daemon(cfg, wrapper=NO_DAC if ROOT else ()) as proc:
            wait_for("status socket", (tmp_path / "edged.sock").exists)
            place(capture, b"good.capture", good)
            place(capture, b"corrupt.capture", corrupt)
            place(capture, b"truncated.capture", truncated)
            place(capture, b"empty.capture", b"")
            place(capture, b"odd-\xff\xfe.capture", odd_name)
            locked_capture = place(capture, b"locked.capture", locked, mode=0)
            place(uploads, b"plain.bin", b"p" * 1000)
            place(uploads, b"bad\xff.bin", b"q" * 1000)
            locked_plain = place(uploads, b"locked\xfe.bin", b"r" * 1000, mode=0)

            expected = [*range(10), *range(1000, 1010), *range(2000, 2009), *range(3000, 3010)]
            wait_for(
                "readable readings delivered",
                lambda: ingest_count(tmp_path / "ingest", "readings") >= len(expected),
            )
            wait_for("plain files", lambda: ingest_count(tmp_path / "ingest", "binaries") == 2)
            st = status(cfg)
            assert st["quarantined"] == 2, st  # corrupt + empty
            caps = next(s for s in st["sources"] if s["kind"] == "capture")
            assert caps["truncated"] >= 1

            def files_error() -> str:
                files = next(s for s in status(cfg)["sources"] if s["kind"] == "files")
                return str(files["last_error"] or "")

            wait_for("unreadable file reported", lambda: "cannot read" in files_error())
            # The error names a path that is not UTF-8: JSON and the human view render it.
            human = edged_ctl(cfg, "status")
            assert human.returncode == 0 and "locked\\xfe.bin" in human.stdout, human.stderr
            assert locked_capture.exists() and locked_plain.exists()  # left in place
            # Quarantine: each file with a .reason naming path, offset and cause.
            qdir = tmp_path / "state" / "quarantine"
            reasons = {p.name: p.read_text() for p in qdir.glob("*.reason")}
            assert len(reasons) == 2, reasons
            assert any("corrupt.capture" in t and "byte offset" in t for t in reasons.values())
            assert any("empty.capture" in t and "empty file" in t for t in reasons.values())
            assert stat.S_IMODE(qdir.stat().st_mode) == 0o700

            # The unreadable ones become readable: the next scan takes them.
            for p in (locked_capture, locked_plain):
                p.chmod(0o600)
            assert edged_ctl(cfg, "sync-now").returncode == 0
            expected += range(4000, 4010)
            wait_for(
                "unlocked capture",
                lambda: ingest_count(tmp_path / "ingest", "readings") >= len(expected),
            )
            wait_for("unlocked file", lambda: ingest_count(tmp_path / "ingest", "binaries") == 3)
            wait_for("outbox drained", lambda: status(cfg)["outbox"]["items"] == 0)
            assert ingest_seqs(tmp_path / "ingest") == sorted(expected)
            # Names that are not UTF-8 travel with their odd bytes spelled \xNN.
            assert sorted(ingest_names(tmp_path / "ingest")) == ["bad\\xff", "locked\\xfe", "plain"]
            assert edged_ctl(cfg, "status", "--json").returncode == 0

            # The huge sparse file: queued by reference, streamed, refused by the server.
            baseline = max(rss(proc.pid) for _ in range(5))
            huge = uploads / "huge.bin"
            with open(huge, "wb") as f:
                f.truncate(HUGE)
            peak = baseline
            queued: dict[str, Any] = {}

            def dead() -> bool:
                nonlocal peak
                peak = max(peak, rss(proc.pid))
                s = status(cfg)
                if s["outbox"]["bytes"] >= HUGE and not queued:
                    queued.update(s["outbox"])
                return bool(s["dead_letters"] == 1)

            wait_for("huge file dead-lettered", dead, timeout=cycles(60, 300))
            st = status(cfg)
            queued = queued or st["outbox"]
            assert queued["stored_bytes"] < MiB, queued  # a reference, not a copy
            assert disk_usage(tmp_path / "state") < 64 * MiB
            letters = edged_ctl(cfg, "dead-letters", "--json")
            assert "INVALID_ARGUMENT" in letters.stdout and "--max-upload-bytes" in letters.stdout
            assert huge.exists() and huge.stat().st_size == HUGE  # kept for retry-dead
            assert peak - baseline < 64 * MiB, (peak, baseline)
            # Everything else still flows after the refusal.
            place(uploads, b"after.bin", b"s" * 1000)
            wait_for("file after", lambda: ingest_count(tmp_path / "ingest", "binaries") == 4)
            final = status(cfg)
            assert final["ok"] and proc.poll() is None
            proc.terminate()
            assert proc.wait(30) == 0
    record(
        "bad-inputs",
        quarantined=final["quarantined"],
        truncated_files=caps["truncated"],
        readings_delivered=len(expected),
        plain_files_delivered=4,
        dead_letters=final["dead_letters"],
        huge_file_gib=HUGE / GiB,
        server_cap_mib=cap_mib,
        huge_stored_bytes=queued["stored_bytes"],
        rss_baseline_mib=round(baseline / MiB, 1),
        rss_peak_streaming_mib=round(peak / MiB, 1),
        unreadable_mode="setpriv -dac_override" if ROOT else "chmod 000",
    )


def ingest_names(data: Path) -> list[str]:
    db = sqlite3.connect(f"file:{data / 'ingest.sqlite3'}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in db.execute("SELECT file_name FROM binaries")]
    finally:
        db.close()
