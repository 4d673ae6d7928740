"""Regression tests for contract and crash findings of the daemon review."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edged._proto.app.datasync.v1 import data_sync_pb2 as pb
from edged.capture import CaptureWriter, frame
from edged.daemon.outbox import Item, Outbox
from edged.daemon.sources.base import SourceContext
from edged.daemon.sources.capture import CaptureConfig, CaptureSource
from edged.daemon.status import MAX_CLIENTS, StatusServer
from tests.support.capture_files import tabular_metadata, tabular_reading, write_capture
from tests.support.credentials import KeyFile
from tests.support.daemon import base_config, daemon, socket_up, status, write_config
from tests.support.ingest_db import ingest_seqs
from tests.support.processes import edged_cmd, ingest_process
from tests.support.waiting import wait_for


async def drain(box: Outbox) -> list[Item]:
    items = []
    while (item := await box.lease(lease_s=60, max_readings=10_000, max_bytes=1 << 30)) is not None:
        items.append(item)
        await box.ack(item)
    return items


async def test_prog_with_a_live_writer_is_committed_but_not_deleted(tmp_path: Path) -> None:
    cap, state = tmp_path / "capture", tmp_path / "state"
    box = await Outbox.open(state)
    writer = CaptureWriter(cap, tabular_metadata())
    try:
        for seq in range(60):
            writer.write(tabular_reading(seq))
        writer.flush()  # a slow sensor: the file is past its grace, the writer still has it
        prog = writer.path
        assert prog is not None
        # "Booted" after the file was last written: what a robot without a real-time
        # clock sees once NTP steps its clock. The lease probe must still win.
        booted = time.time()
        os.utime(prog, (booted - 3600, booted - 3600))
        source = CaptureSource(
            CaptureConfig(path=cap, prog_grace=0.0),
            SourceContext("p", box, state),
            booted_at=booted,
        )
        await source.scan_once()
        assert prog.exists(), "deleted while its writer still had it open"
        first = sum(i.count for i in await drain(box))
        for seq in range(60, 100):
            writer.write(tabular_reading(seq))
        final = writer.close()  # renames .prog -> .capture
        assert final is not None
        await source.scan_once()
        rest = await drain(box)
        assert first + sum(i.count for i in rest) == 100  # every reading once, no repeats
        assert not final.exists()
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        await box.close()


class Killed(Exception):
    pass


async def test_legacy_images_survive_a_crash_between_images(tmp_path: Path) -> None:
    cap, state = tmp_path / "capture", tmp_path / "state"
    header = pb.DataCaptureMetadata(
        component_type="rdk:component:camera",
        component_name="cam",
        method_name="GetImages",
        type=pb.DATA_TYPE_BINARY_SENSOR,
    )
    reading = pb.SensorData()
    reading.struct.update(
        {
            "images": [
                {
                    "image": base64.b64encode(f"img-{i}".encode() * 50).decode(),
                    "mime_type": "image/jpeg",
                }
                for i in range(3)
            ]
        }
    )
    # Old robot software wrote this shape; our writer refuses it, so frame it by hand.
    legacy = (
        cap / "rdk_component_camera" / "cam" / "GetImages" / "2020-01-01T00_00_00.000000Z.capture"
    )
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(frame(header.SerializeToString()) + frame(reading.SerializeToString()))
    box = await Outbox.open(state)
    real, calls = box.enqueue_item, [0]

    async def die_after_first(*args: Any, **kwargs: Any) -> str:
        uid = await real(*args, **kwargs)
        calls[0] += 1
        raise Killed
        return uid  # pragma: no cover

    box.enqueue_item = die_after_first  # type: ignore[method-assign]
    source = CaptureSource(CaptureConfig(path=cap), SourceContext("p", box, state))
    with pytest.raises(Killed):
        await source.scan_once()
    await box.close()
    box = await Outbox.open(state)
    await box.recover()
    source = CaptureSource(CaptureConfig(path=cap), SourceContext("p", box, state))
    await source.scan_once()
    payloads = {item.inline for item in await drain(box)}
    assert payloads == {f"img-{i}".encode() * 50 for i in range(3)}  # none lost
    assert list(cap.rglob("*.capture")) == []  # and the file was retired
    await box.close()


async def test_status_server_caps_clients_and_answers_handler_bugs(tmp_path: Path) -> None:
    async def handler(req: dict[str, Any]) -> dict[str, Any]:
        if req["cmd"] == "boom":
            raise ValueError("bug")
        return {"ok": True}

    server = StatusServer(tmp_path / "s.sock", handler)
    await server.start()
    try:
        held = [
            await asyncio.open_unix_connection(str(tmp_path / "s.sock")) for _ in range(MAX_CLIENTS)
        ]
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "s.sock"))
        assert "busy" in json.loads(await reader.readline())["error"]
        writer.close()
        r0, w0 = held[0]
        w0.write(b'{"cmd": "boom"}\n{"cmd": "status"}\n')
        assert "internal error: ValueError" in json.loads(await r0.readline())["error"]
        assert json.loads(await r0.readline())["ok"] is True  # same connection still serves
        for _, w in held:
            w.close()
    finally:
        await server.stop()


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
    with ingest_process(
        tmp_path / "ingest", ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]
    ) as (_, port):
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
            "--api-key-id",
            key.key_id,
            "--api-key-file",
            str(key.path),
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


def test_cli_errors_are_one_sentence(tmp_path: Path) -> None:
    bad = subprocess.run(
        edged_cmd("status", "--socket", str(tmp_path / "x.sock"), "--watch", "--interval", "0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2 and "--interval must be a positive" in bad.stderr
    liar = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    liar.bind(str(tmp_path / "liar.sock"))
    liar.listen(1)
    proc = subprocess.Popen(
        edged_cmd("status", "--socket", str(tmp_path / "liar.sock")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    conn, _ = liar.accept()
    conn.recv(100)
    conn.sendall(b"HTTP/1.1 400 Bad Request\n")
    conn.close()
    _, err = proc.communicate(timeout=30)
    liar.close()
    assert proc.returncode == 1 and "is not JSON" in err and "Traceback" not in err
