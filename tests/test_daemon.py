"""`edged run` as operators run it: a real subprocess, a real ingest subprocess, real
files, real signals, the real status socket and a fake systemd notify socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.capture_files import write_capture
from tests.support.credentials import KeyFile
from tests.support.daemon import (
    base_config,
    daemon,
    edged_ctl,
    embedded_config,
    socket_up,
    status,
    write_config,
)
from tests.support.ingest_db import ingest_count, ingest_seqs
from tests.support.processes import edged_cmd, ingest_process
from tests.support.waiting import wait_for


def test_files_in_data_stored_sources_deleted_status_true(tmp_path: Path, key: KeyFile) -> None:
    (tmp_path / "uploads" / "tag=field").mkdir(parents=True)
    with ingest_process(tmp_path / "ingest", key.ingest_args()) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        with daemon(cfg) as proc:
            wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
            write_capture(tmp_path / "capture", 0, 1200)
            (tmp_path / "uploads" / "tag=field" / "run1.bag").write_bytes(b"b" * 100_000)
            wait_for(
                "readings at ingest", lambda: ingest_count(tmp_path / "ingest", "readings") == 1200
            )
            wait_for("file at ingest", lambda: ingest_count(tmp_path / "ingest", "binaries") == 1)
            wait_for(
                "capture files retired", lambda: not list((tmp_path / "capture").rglob("*.capture"))
            )
            wait_for(
                "plain file deleted after ack",
                lambda: not (tmp_path / "uploads" / "tag=field" / "run1.bag").exists(),
            )
            st = status(cfg)
            assert st["ok"] is True and st["state"] == "running"
            for key_name in (
                "version",
                "uptime_s",
                "outbox",
                "uploaded",
                "rates",
                "cloud",
                "dead_letters",
                "quarantined",
                "dropped",
                "sources",
            ):
                assert key_name in st
            assert st["uploaded"]["readings"] == 1200 + 1
            assert st["outbox"]["items"] == 0 and st["dead_letters"] == 0
            assert st["cloud"]["last_success_at"] is not None
            assert {s["kind"] for s in st["sources"]} == {"capture", "files"}
            assert all("files_seen" in s and "last_event_at" in s for s in st["sources"])
            sock_mode = (tmp_path / "edged.sock").stat().st_mode & 0o777
            assert sock_mode == 0o660
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        log = cfg.with_suffix(".log").read_text()
        assert key.secret not in log
        assert ingest_seqs(tmp_path / "ingest") == list(range(1200))


def test_sigterm_mid_drain_exit_0_then_restart_loses_nothing(tmp_path: Path, key: KeyFile) -> None:
    write_capture(tmp_path / "capture", 0, 30_000, per_file=1000)
    with ingest_process(tmp_path / "ingest", key.ingest_args()) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        with daemon(cfg) as proc:
            wait_for("some uploads", lambda: ingest_count(tmp_path / "ingest", "readings") > 0)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        partial = ingest_count(tmp_path / "ingest", "readings")
        with daemon(cfg, args=("--until-empty",)) as proc:
            assert proc.wait(120) == 0
    seqs = ingest_seqs(tmp_path / "ingest")
    assert seqs == list(range(30_000)), f"after {partial} before the restart"
    assert not list((tmp_path / "capture").rglob("*.capture"))


def test_until_empty_uploads_files_settled_by_their_mtime(tmp_path: Path) -> None:
    """A one-shot run scans once: a file unchanged for `settle` by its mtime goes in it."""
    old = tmp_path / "uploads" / "run1.bag"
    old.parent.mkdir()
    old.write_bytes(b"b" * 1000)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    cfg = embedded_config(tmp_path, f"  - kind: files\n    path: {old.parent}\n    settle: 10s\n")
    with daemon(cfg, args=("--until-empty",)) as proc:
        assert proc.wait(60) == 0
    assert ingest_count(tmp_path / "state" / "ingest", "binaries") == 1
    assert not old.exists()  # acknowledged, then deleted


def test_missing_source_directory_is_the_sources_last_error_until_it_appears(
    tmp_path: Path,
) -> None:
    later = tmp_path / "capture"
    cfg = embedded_config(tmp_path, f"  - kind: capture\n    path: {later}\n")
    with daemon(cfg) as proc:
        wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))

        def last_error() -> str | None:
            [src] = status(cfg)["sources"]
            error: str | None = src["last_error"]
            return error

        wait_for(
            "the missing directory in status", lambda: "does not exist" in (last_error() or "")
        )
        assert str(later) in (last_error() or "")
        later.mkdir()
        wait_for("the error to clear once it exists", lambda: last_error() is None)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_sighup_adds_a_source_and_bad_reload_keeps_running(tmp_path: Path, key: KeyFile) -> None:
    with ingest_process(tmp_path / "ingest", key.ingest_args()) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        with daemon(cfg) as proc:
            wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
            extra = f"""\
  - kind: files
    path: {tmp_path / "more"}
    settle: 0s
    name: more
"""
            (tmp_path / "more").mkdir()
            write_config(cfg, base_config(tmp_path, port, key, extra))
            proc.send_signal(signal.SIGHUP)
            wait_for("new source", lambda: any(s["name"] == "more" for s in status(cfg)["sources"]))
            (tmp_path / "more" / "x.txt").write_bytes(b"hello")
            wait_for(
                "file via new source", lambda: ingest_count(tmp_path / "ingest", "binaries") == 1
            )
            cfg.write_text("part_id: [broken\n")
            proc.send_signal(signal.SIGHUP)
            wait_for(
                "reload error logged",
                lambda: "keeping the running config" in cfg.with_suffix(".log").read_text(),
            )
            assert status(cfg)["state"] == "running"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_bad_config_exits_2_naming_key_and_line(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "bad.yaml", "part_id: r\nstate_dir: /tmp/x\nupload:\n  wokers: 4\n"
    )
    for cmd in ("run", "check-config"):
        res = subprocess.run(
            edged_cmd(cmd, "-c", str(cfg)), capture_output=True, text=True, timeout=30, check=False
        )
        assert res.returncode == 2
        assert "bad.yaml:4" in res.stderr and "upload.wokers" in res.stderr
        assert "did you mean 'workers'" in res.stderr
        assert "Traceback" not in res.stderr


def test_notify_socket_ready_watchdog_stopping_and_garbage_on_status_socket(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    cfg = write_config(
        tmp_path / "edged.yaml",
        f"""\
part_id: robot-notify
state_dir: {tmp_path / "state"}
cloud: {{address: embedded}}
status: {{socket: {tmp_path / "edged.sock"}}}
""",
    )
    try:
        env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"}
        with daemon(cfg, env=env) as proc:
            seen: list[str] = []

            def expect(field: str) -> None:
                while not any(line == field for msg in seen for line in msg.split("\n")):
                    seen.append(listener.recv(4096).decode())

            expect("READY=1")
            expect("WATCHDOG=1")
            # Garbage on the status socket: an error line back, the daemon keeps serving.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(tmp_path / "edged.sock"))
                s.sendall(b'\xff\xfenot json\n{"cmd": 3}\n{"cmd": "explode"}\n')
                answers = b""
                while answers.count(b"\n") < 3:
                    answers += s.recv(4096)
            replies = [json.loads(line) for line in answers.splitlines()]
            assert [r["ok"] for r in replies] == [False, False, False]
            assert "unknown cmd 'explode'" in replies[2]["error"]
            assert status(cfg)["ok"] is True
            proc.send_signal(signal.SIGTERM)
            expect("STOPPING=1")
            assert proc.wait(30) == 0
        order = [line for msg in seen for line in msg.split("\n") if line.endswith("=1")]
        assert order.index("READY=1") < order.index("WATCHDOG=1") < order.index("STOPPING=1")
    finally:
        listener.close()


@pytest.mark.skipif(
    not Path("/usr/bin/systemd-analyze").exists(), reason="systemd-analyze not installed"
)
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    unit = tmp_path / "edged.service"
    text = (repo / "systemd" / "edged.service").read_text()
    # verify checks that the binaries exist: point them at this venv's edged.
    unit.write_text(text.replace("/usr/bin/edged", str(Path(sys.executable).parent / "edged")))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [ln for ln in res.stderr.splitlines() if "edged.service" in ln]
    assert not problems, res.stderr


def test_control_commands_and_stale_socket(tmp_path: Path, key: KeyFile) -> None:
    """pause/resume/sync-now/dead-letters/retry-dead through the real CLI, JSON logs,
    and a stale socket file from a crashed daemon replaced on start."""
    (tmp_path / "uploads").mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "edged.sock"))  # bound, never listening: a crash leftover
    stale.close()
    with ingest_process(
        tmp_path / "ingest",
        ["--api-key-id", key.key_id, "--api-key-file", str(key.path), "--max-upload-bytes", "1000"],
    ) as (_, port):
        body = base_config(tmp_path, port, key).replace(
            "status:", "log: {level: info, format: json}\nstatus:"
        )
        cfg = write_config(tmp_path / "edged.yaml", body)
        with daemon(cfg) as proc:
            wait_for("daemon up", lambda: edged_ctl(cfg, "status").returncode == 0)
            assert "state: PAUSED" in (
                edged_ctl(cfg, "pause").stdout + edged_ctl(cfg, "status").stdout
            )
            (tmp_path / "uploads" / "small.txt").write_bytes(b"x" * 10)
            (tmp_path / "uploads" / "big.txt").write_bytes(b"y" * 5000)  # over the server cap
            wait_for("queued while paused", lambda: status(cfg)["outbox"]["items"] == 2)
            assert status(cfg)["uploaded"]["items"] == 0
            assert edged_ctl(cfg, "resume").returncode == 0
            wait_for("dead letter", lambda: status(cfg)["dead_letters"] == 1)
            wait_for("small uploaded", lambda: status(cfg)["uploaded"]["items"] == 1)
            listing = edged_ctl(cfg, "dead-letters", "--json")
            [dead] = json.loads(listing.stdout)
            assert dead["status"] == "INVALID_ARGUMENT" and "--max-upload-bytes" in dead["message"]
            assert "INVALID_ARGUMENT" in edged_ctl(cfg, "dead-letters").stdout
            assert "requeued 1 item" in edged_ctl(cfg, "retry-dead", str(dead["id"])).stdout
            wait_for("dead again", lambda: status(cfg)["dead_letters"] == 1)
            assert edged_ctl(cfg, "sync-now").returncode == 0
            bad = edged_ctl(cfg, "retry-dead")
            assert bad.returncode == 2 and "needs item ids or --all" in bad.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        log_lines = cfg.with_suffix(".log").read_text().splitlines()
        events = [json.loads(line) for line in log_lines if line.startswith("{")]
        assert events and all({"ts", "level", "logger", "msg"} <= set(e) for e in events)
        assert any("dead-lettered" in e["msg"] for e in events)
        assert key.secret not in "\n".join(log_lines)
    down = edged_ctl(cfg, "status")
    assert down.returncode == 1 and "is edged running?" in down.stderr


def test_second_signal_exits_at_once_and_loses_nothing(tmp_path: Path, key: KeyFile) -> None:
    """A server that accepts TCP but never answers keeps an upload in flight; the first
    SIGTERM waits for it, the second exits at once with everything still queued."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        write_capture(tmp_path / "capture", 0, 100)
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        with daemon(cfg) as proc:
            wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
            wait_for("upload in flight", lambda: status(cfg)["cloud"]["inflight"] > 0)
            proc.send_signal(signal.SIGTERM)
            wait_for(
                "first signal seen", lambda: "shutting down" in cfg.with_suffix(".log").read_text()
            )
            assert proc.poll() is None  # still waiting for the call in flight
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        db = sqlite3.connect(tmp_path / "state" / "outbox.sqlite3")
        assert db.execute("SELECT count(*) FROM readings").fetchone() == (100,)
        db.close()
    finally:
        silent.close()


def test_sighup_while_starting_is_a_reload_not_a_kill(tmp_path: Path) -> None:
    """SIGHUP's default action kills: one sent while edged starts (logrotate, an operator,
    a unit's ExecReload) is held and run once the sources are up. The embedded server
    makes start-up long enough to aim at: SIGHUPs go from the outbox being open until
    the status socket answers."""
    cfg = embedded_config(tmp_path, f"  - kind: capture\n    path: {tmp_path / 'cap'}\n")
    log = cfg.with_suffix(".log")
    with daemon(cfg) as proc:
        wait_for("outbox open", lambda: log.exists() and "outbox open" in log.read_text())
        sent = 0
        while proc.poll() is None and not socket_up(tmp_path / "edged.sock") and sent < 10_000:
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.005)  # pacing, not waiting: a flood would fill the wakeup pipe
        assert proc.poll() is None, f"killed by SIGHUP number {sent}:\n{log.read_text()}"
        wait_for("held reload ran", lambda: "config reloaded" in log.read_text())
        assert status(cfg)["state"] == "running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
