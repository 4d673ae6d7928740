"""A throttling TCP relay on loopback: an uplink slower than any rate edged could assume.

It forwards client→server at a fixed rate through small socket buffers, so the backlog
builds up in the client's kernel send queue as behind congested LTE or a satellite link.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

KiB = 1024
SMALL_BUF = 4 * KiB  # relay socket buffers and read size: backpressure reaches the client


class Relay:
    """A TCP relay on 127.0.0.1 forwarding client→server at `rate` bytes/s (0: nothing
    at all, a link that went dead) and server→client freely; counts connections."""

    def __init__(self, target_port: int, rate: int) -> None:
        self.target_port = target_port
        self.rate = rate
        self.connections = 0
        self.forwarded = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> Relay:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)  # inherited on accept
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=SMALL_BUF)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port, limit=SMALL_BUF
        )
        self._writers.append(up_writer)
        for coro in (self._uplink(reader, up_writer), self._pump(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)

    async def _uplink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client→server at `rate`: the link's speed is what is modelled here."""
        if self.rate == 0:
            await asyncio.Event().wait()  # a dead link: nothing is read, the peer backs up
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while data := await reader.read(SMALL_BUF):
            writer.write(data)
            await writer.drain()
            sent += len(data)
            self.forwarded += len(data)
            await asyncio.sleep(max(0.0, start + sent / self.rate - loop.time()))
        writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(64 * KiB):
                writer.write(data)
                await writer.drain()
        writer.close()
