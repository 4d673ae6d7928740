"""`edged run` with per-source gates: `pause --source` holds exactly that source, a
closed window holds its source's data (capture goes on), and a window that opens (here
by a reload) lets all of it go. The window is computed relative to now, two hours
ahead, so no wall-clock date or time can make it open during the test."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support.capture_files import write_capture
from tests.support.daemon import daemon, edged_ctl, embedded_config, socket_up, status
from tests.support.ingest_db import ingest_seqs
from tests.support.waiting import wait_for


def _closed_window() -> str:
    start = datetime.now() + timedelta(hours=2)
    end = start + timedelta(hours=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def _sources(tmp: Path, night_windows: str) -> str:
    return (
        f"  - kind: capture\n    path: {tmp / 'tele'}\n    name: tele\n    priority: 10\n"
        f"  - kind: capture\n    path: {tmp / 'night'}\n    name: night\n"
        f"    windows: [{night_windows}]\n"
    )


def _source(cfg: Path, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in status(cfg)["sources"] if s["name"] == name]
    return found[0]


def test_pause_source_and_windows_hold_exactly_their_source(tmp_path: Path) -> None:
    (tmp_path / "tele").mkdir()
    (tmp_path / "night").mkdir()
    cfg = embedded_config(tmp_path, _sources(tmp_path, f'"{_closed_window()}"'))
    with daemon(cfg) as proc:
        wait_for("status socket", lambda: socket_up(tmp_path / "edged.sock"))
        out = edged_ctl(cfg, "pause", "--source", "tele")
        assert out.returncode == 0, out.stderr
        assert "no source named 'nope'" in edged_ctl(cfg, "pause", "--source", "nope").stderr
        write_capture(tmp_path / "tele", 0, 1000)
        write_capture(tmp_path / "night", 1000, 1000)
        wait_for("both captured", lambda: status(cfg)["outbox"]["readings"] == 2000, 60)
        tele, night = _source(cfg, "tele"), _source(cfg, "night")
        assert tele["paused"] is True and tele["upload_allowed"] is False
        assert tele["priority"] == 10
        assert night["window"]["open"] is False
        assert night["window"]["next_change"]
        assert status(cfg)["uploaded"]["readings"] == 0
        text = edged_ctl(cfg, "status").stdout
        assert "PAUSED" in text and "window closed until" in text
        assert edged_ctl(cfg, "resume", "--source", "tele").returncode == 0
        wait_for("tele uploaded", lambda: status(cfg)["uploaded"]["readings"] == 1000, 60)
        assert status(cfg)["outbox"]["readings"] == 1000  # night's wait
        cfg.write_text(cfg.read_text().replace(_closed_window_of(cfg), '"00:00-24:00"'))
        proc.send_signal(signal.SIGHUP)
        wait_for("night uploaded", lambda: status(cfg)["uploaded"]["readings"] == 2000, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert ingest_seqs(tmp_path / "state" / "ingest") == list(range(2000))


def _closed_window_of(cfg: Path) -> str:
    line = next(x for x in cfg.read_text().splitlines() if "windows:" in x)
    return line.split("[", 1)[1].rsplit("]", 1)[0]
