"""`edged status` as an operator reads it: ages from the daemon's own clock, columns that
hold long names, and `--watch` that outlives a daemon restart."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from edged.daemon.status_view import render
from tests.support.daemon import daemon, embedded_config
from tests.support.processes import edged_cmd, read_line
from tests.support.waiting import wait_for


def _answer(**cloud: Any) -> dict[str, Any]:
    long_name = "files:/var/lib/robot/very/long/path/to/the/camera/uploads/of/the/left/arm"
    return {
        "ok": True,
        "version": "0",
        "uptime_s": 10.0,
        "state": "running",
        "part_id": "p",
        "outbox": {"items": 0, "bytes": 0, "oldest_age_s": None, "per_kind": {}},
        "uploaded": {"items": 0, "readings": 0, "bytes": 0},
        "rates": {"readings_per_s": 0.0, "bytes_per_s": 0.0},
        "cloud": {"address": "a:1", "last_success_at": None, "next_retry_in_s": None, **cloud},
        "dead_letters": 0,
        "quarantined": 0,
        "dropped": {"readings": 0},
        "sources": [
            {"name": long_name, "files_seen": 3, "last_event_age_s": 5.0},
            {"name": "capture:/cap", "files_seen": 12, "last_event_age_s": None},
        ],
    }


def test_error_age_comes_from_the_daemon_not_the_readers_clock() -> None:
    # The wall-clock stamp is far in the future (a daemon whose clock is off): the age the
    # daemon measured on its monotonic clock is what is shown.
    text = render(
        _answer(
            last_error="UNAVAILABLE: refused",
            last_error_age_s=185.0,
            last_success_at=time.time() + 86_400,
            last_success_age_s=3600.0,
        )
    )
    assert "last error 3m ago: UNAVAILABLE: refused" in text
    assert "last success 60m ago" in text


def test_long_source_names_do_not_run_into_the_next_column() -> None:
    lines = render(_answer()).splitlines()
    start = lines.index("sources")
    long_line, counters, short = lines[start + 1 : start + 4]
    assert long_line.strip().startswith("files:/var/lib/robot") and "seen" not in long_line
    assert counters.index("seen") == short.index("seen")  # one column for every source
    assert short.strip().startswith("capture:/cap")


def test_tls_failed_says_what_to_do() -> None:
    answer = _answer(last_error="the server's TLS certificate failed verification: x")
    answer["state"] = "tls_failed"
    assert "fix cloud.ca_file or the server's certificate" in render(answer)


def _line(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """The next JSON line `status --watch --json` prints (bounded wait)."""
    line: dict[str, Any] = json.loads(read_line(proc, 30))
    return line


def test_watch_waits_for_the_daemon_to_come_back(tmp_path: Path) -> None:
    cfg = embedded_config(tmp_path, "")
    sock = tmp_path / "edged.sock"
    watch = subprocess.Popen(
        edged_cmd("status", "--socket", str(sock), "--watch", "--json", "--interval", "0.1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        first = _line(watch)
        assert first["ok"] is False and "is edged running?" in first["error"]
        with daemon(cfg) as proc:
            wait_for("the socket", sock.exists)
            for _ in range(600):  # bounded: each line is one refresh
                if _line(watch)["ok"]:
                    break
            else:
                raise AssertionError("status --watch never saw the daemon")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        for _ in range(600):
            line = _line(watch)
            if not line["ok"]:
                break
        else:
            raise AssertionError("status --watch never saw the daemon go")
        assert watch.poll() is None  # still watching, not exited
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(30)
        for stream in (watch.stdout, watch.stderr):
            if stream:
                stream.close()


def _bandwidth(**more: Any) -> dict[str, Any]:
    return {
        "limit_bytes_per_s": 2 << 20,
        "source": "config",
        "config_bytes_per_s": 2 << 20,
        "burst_bytes": 512 << 10,
        "bytes_per_s": 1.5 * (1 << 20),
        "sent_bytes": 0,
        "waited_s": 0.0,
        "waiting": 0,
    } | more


def test_bandwidth_line_names_the_cap_its_source_and_the_rate() -> None:
    answer = _answer()
    answer["bandwidth"] = _bandwidth()
    assert "bandwidth cap 2.0 MiB/s (upload.max_bandwidth); sending 1.5 MiB/s" in render(answer)
    answer["bandwidth"] = _bandwidth(limit_bytes_per_s=0, source="edged limit", waiting=2)
    line = next(x for x in render(answer).splitlines() if x.startswith("bandwidth"))
    assert line == (
        "bandwidth unlimited (`edged limit`, over upload.max_bandwidth (2.0 MiB/s) until"
        " `edged limit config` or a reload); sending 1.5 MiB/s, 2 waiting"
    )
