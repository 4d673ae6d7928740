"""`edged run` as one instance per state directory, driven by its control commands:
a second daemon on the same state refuses to start, `sync-now` never commits data twice,
a reload keeps an operator's pause, and `--until-empty` exits once what is left is
dead-lettered."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.support.capture_files import write_capture
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, edged_ctl, socket_up, status, write_config
from tests.support.ingest_db import ingest_seqs
from tests.support.processes import edged_cmd, ingest_process
from tests.support.waiting import wait_for


def test_second_daemon_on_the_same_state_dir_refuses_to_start(tmp_path: Path, key: KeyFile) -> None:
    cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, 1, key))
    with daemon(cfg) as first:
        wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
        second = subprocess.run(
            edged_cmd("run", "-c", str(cfg)),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 1
        assert "another edged is already running on state_dir" in second.stderr
        assert first.poll() is None and status(cfg)["ok"] is True
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0


def test_sync_now_never_commits_data_twice_and_reload_keeps_pause(
    tmp_path: Path, key: KeyFile
) -> None:
    with ingest_process(tmp_path / "ingest", key.ingest_args()) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        with daemon(cfg) as proc:
            wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
            write_capture(tmp_path / "capture", 0, 20_000, per_file=1000)
            for _ in range(5):  # while the source is busy committing
                subprocess.run(
                    edged_cmd("sync-now", "--socket", str(tmp_path / "edged.sock")),
                    capture_output=True,
                    timeout=30,
                    check=True,
                )
            wait_for("all uploaded", lambda: status(cfg)["uploaded"]["readings"] >= 20_000, 60)
            subprocess.run(
                edged_cmd("pause", "--socket", str(tmp_path / "edged.sock")),
                capture_output=True,
                timeout=30,
                check=True,
            )
            proc.send_signal(signal.SIGHUP)
            wait_for("reloaded", lambda: "config reloaded" in cfg.with_suffix(".log").read_text())
            assert status(cfg)["state"] == "paused"  # a reload does not undo an operator's pause
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    assert ingest_seqs(tmp_path / "ingest") == list(range(20_000))


def test_until_empty_exits_with_a_dead_lettered_tabular_batch(tmp_path: Path, key: KeyFile) -> None:
    write_capture(tmp_path / "capture", 0, 3000)
    with ingest_process(
        tmp_path / "ingest",
        [
            *key.ingest_args(),
            "--max-message-bytes",
            "2000",
        ],
    ) as (_, port):
        cfg = write_config(tmp_path / "edged.yaml", base_config(tmp_path, port, key))
        res = subprocess.run(
            edged_cmd("run", "-c", str(cfg), "--until-empty"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dead-lettered" in res.stderr


def test_limit_changes_a_running_daemons_cap_until_config_or_reload(
    tmp_path: Path, key: KeyFile
) -> None:
    """A file crawling under a 16 KiB/s cap (two minutes' worth) finishes at once after
    `edged limit off`, in the same call; `edged limit config` and a reload give the
    config's cap back."""
    (tmp_path / "capture").mkdir()
    (tmp_path / "uploads").mkdir()
    with ingest_process(tmp_path / "ingest", key.ingest_args()) as (_, port):
        body = base_config(tmp_path, port, key).replace(
            "upload:\n", "upload:\n  max_bandwidth: 16KiB/s\n"
        )
        cfg = write_config(tmp_path / "edged.yaml", body)
        with daemon(cfg) as proc:
            wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
            bandwidth = status(cfg)["bandwidth"]
            assert (bandwidth["limit_bytes_per_s"], bandwidth["source"]) == (16 * 1024, "config")
            (tmp_path / "uploads" / "big.bin").write_bytes(b"b" * 2_000_000)
            wait_for("the file held back by the cap", lambda: status(cfg)["bandwidth"]["waiting"])
            off = edged_ctl(cfg, "limit", "off")
            assert off.returncode == 0, off.stderr
            assert "bandwidth unlimited (`edged limit`, over upload.max_bandwidth" in off.stdout
            wait_for("the file uploaded", lambda: status(cfg)["uploaded"]["items"] == 1, 30)
            assert status(cfg)["cloud"]["calls"] == 1  # sped up mid-call, not restarted

            assert edged_ctl(cfg, "limit", "1MiB/s").returncode == 0
            bandwidth = status(cfg)["bandwidth"]
            assert (bandwidth["limit_bytes_per_s"], bandwidth["source"]) == (1 << 20, "edged limit")
            back = edged_ctl(cfg, "limit", "config")
            assert back.returncode == 0, back.stderr
            assert "bandwidth cap 16.0 KiB/s (upload.max_bandwidth)" in back.stdout
            assert status(cfg)["bandwidth"]["source"] == "config"

            assert edged_ctl(cfg, "limit", "off").returncode == 0
            proc.send_signal(signal.SIGHUP)
            wait_for("reloaded", lambda: "config reloaded" in cfg.with_suffix(".log").read_text())
            bandwidth = status(cfg)["bandwidth"]
            assert (bandwidth["limit_bytes_per_s"], bandwidth["source"]) == (16 * 1024, "config")

            bad = edged_ctl(cfg, "limit", "2MB/s")
            assert bad.returncode == 2
            assert "'2MB/s' is not a rate (use binary units" in bad.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
