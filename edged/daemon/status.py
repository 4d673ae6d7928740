"""The control socket: newline-delimited JSON, one request and one response per line.

Server side runs inside the daemon; client side backs `edged status` and friends.
Garbage in gets an error line out and the connection keeps serving: a confused
script must never take the daemon down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from edged.errors import EdgedError

log = logging.getLogger("edged.status")

MAX_LINE = 64 * 1024
MAX_CLIENTS = 16  # each connection holds a descriptor: a crowd must not starve the sources
IDLE_TIMEOUT_S = 60.0
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class StatusServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients = asyncio.Semaphore(MAX_CLIENTS)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_claim_socket_path, self.path)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE
        )
        os.chmod(self.path, 0o660)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients.locked():
            await _reply(writer, {"ok": False, "error": f"busy: {MAX_CLIENTS} clients connected"})
            writer.close()
            return
        async with self._clients:
            await self._conversation(reader, writer)

    async def _conversation(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            for _ in range(100_000):  # bounded: one client cannot hold a task forever
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT_S)
                except TimeoutError:
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, {"ok": False, "error": f"request over {MAX_LINE} bytes"})
                    return
                if not line:
                    return
                await _reply(writer, await self._answer(line))
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": 'request is not JSON; send e.g. {"cmd": "status"}'}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a string "cmd"'}
        try:
            return await self._handler(request)
        except EdgedError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must cost one answer, not the connection
            log.exception("status request %r failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


async def _reply(writer: asyncio.StreamWriter, response: dict[str, Any]) -> None:
    writer.write(json.dumps(response, default=str).encode() + b"\n")
    await writer.drain()


def _claim_socket_path(path: Path) -> None:
    """Replace a stale socket file left by a crash, but never steal a live daemon's."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise EdgedError(f"status socket path {path} exists and is not a socket; remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listening: stale
            return
    raise EdgedError(f"another edged is already serving {path}")


def request(path: Path, req: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """One request/response over the socket (blocking; for the CLI)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise EdgedError(f"no status socket at {path}: is edged running?") from None
    except ConnectionRefusedError:
        raise EdgedError(f"nothing listens on {path}: edged is not running") from None
    except PermissionError:
        raise EdgedError(
            f"no permission to open {path} (mode 0660: join the edged group)"
        ) from None
    except TimeoutError:
        raise EdgedError(f"edged did not answer on {path} within {timeout:g}s") from None
    if not buf:
        raise EdgedError(f"edged closed {path} without answering")
    try:
        result: dict[str, Any] = json.loads(buf)
    except ValueError:
        raise EdgedError(
            f"{path} answered something that is not JSON: is it edged's socket?"
        ) from None
    return result
