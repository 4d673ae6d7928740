"""The status socket and `edged status` against hostile or broken peers: a bounded
number of clients, a handler bug answered as an error on a connection that keeps
serving, and a peer that is not edged reported in one sentence."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

from edged.daemon.status import MAX_CLIENTS, StatusServer
from tests.support.processes import edged_cmd


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
