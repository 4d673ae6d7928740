"""A real `edged ingest` (same storage, auth and wire) with injected faults, for the
daemon-level fault scenarios (tests/reliability/test_faults.py).

    python -m tests.reliability.faulty_ingest --data DIR [--listen 127.0.0.1:0]
        [--api-key-id ID --api-key-file F] [--seed N]
        [--unavailable SHARE]              # answer this share of DataSync calls UNAVAILABLE
        [--delay S --delay-share SHARE]    # sleep S before handling this share of calls
        [--counts FILE]                    # JSON call counts, written on SIGTERM/SIGINT
        [--poison-component NAME]          # answer UNKNOWN to DataCaptureUpload of NAME

Prints the same first line as `edged ingest` ("edged ingest: listening on HOST:PORT ..."),
so the tests parse the port the same way. Faults only touch DataSyncService calls; the
auth service always answers, so a failure is never mistaken for bad credentials.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import GRPCError

from edged.ingest import ApiKey, IngestServer, IngestSettings
from edged.wire.keyfile import read_secret_file


@dataclass
class Counts:
    calls: int = 0  # DataSync calls that reached the server
    unavailable: int = 0  # answered UNAVAILABLE by the injector
    delayed: int = 0  # held for --delay seconds before the real handler ran
    auth_calls: int = 0
    poisoned: int = 0  # DataCaptureUpload calls answered UNKNOWN for --poison-component


class Injector:
    def __init__(
        self,
        rng: random.Random,
        unavailable: float,
        delay: float,
        delay_share: float,
        poison_component: str | None = None,
    ):
        self.rng, self.unavailable, self.delay, self.delay_share = (
            rng,
            unavailable,
            delay,
            delay_share,
        )
        self.poison_component = poison_component
        self.counts = Counts()

    async def hook(self, event: RecvRequest) -> None:
        if "AuthService" in event.method_name:
            self.counts.auth_calls += 1
            return
        if "DataSyncService" not in event.method_name:
            return
        self.counts.calls += 1
        if self.unavailable and self.rng.random() < self.unavailable:
            self.counts.unavailable += 1
            raise GRPCError(Status.UNAVAILABLE, "injected outage")
        if self.delay and self.rng.random() < self.delay_share:
            self.counts.delayed += 1
            event.method_func = _delayed(event.method_func, self.delay)
        if self.poison_component and event.method_name.endswith("/DataCaptureUpload"):
            event.method_func = self._poisoned(event.method_func, self.poison_component)

    def _poisoned(self, inner: Callable[[Any], Awaitable[None]], component: str) -> Any:
        """A server with a bug that fails one component's readings (like a NaN once did):
        the request is read first, so the answer is a real server answer, not a reset."""
        counts = self.counts

        async def handler(stream: Any) -> None:
            request = await stream.recv_message()
            if request is not None and request.metadata.component_name == component:
                counts.poisoned += 1
                raise GRPCError(Status.UNKNOWN, f"injected: cannot store readings of {component}")
            await inner(_Replay(stream, request))

        return handler


class _Replay:
    """The handler's stream with the already-read request handed out again."""

    def __init__(self, stream: Any, first: Any) -> None:
        self._stream, self._first = stream, first

    async def recv_message(self) -> Any:
        first, self._first = self._first, None
        return first if first is not None else await self._stream.recv_message()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _delayed(inner: Callable[[Any], Awaitable[None]], delay: float) -> Any:
    async def handler(stream: Any) -> None:
        # A deliberately slow server: the client's deadline runs out while we sleep; the
        # real handler then runs anyway (a late store the client never hears about).
        await asyncio.sleep(delay)
        await inner(stream)

    return handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="faulty_ingest")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--api-key-id")
    p.add_argument("--api-key-file", type=Path)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--unavailable", type=float, default=0.0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--delay-share", type=float, default=1.0)
    p.add_argument("--counts", type=Path)
    p.add_argument("--poison-component")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    keys: tuple[ApiKey, ...] = ()
    if args.api_key_id:
        keys = (ApiKey(args.api_key_id, read_secret_file(args.api_key_file)),)
    injector = Injector(
        random.Random(args.seed),
        args.unavailable,
        args.delay,
        args.delay_share,
        args.poison_component,
    )
    settings = IngestSettings(
        data_dir=args.data,
        host=host,
        port=int(port),
        keys=keys,
        shutdown_grace_s=2.0,
        synchronous="NORMAL",
        extra_hooks=(injector.hook,),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with IngestServer(settings) as server:
        print(f"edged ingest: listening on {server.address} (plaintext, faulty)", flush=True)
        await stop.wait()
    if args.counts:
        args.counts.write_text(json.dumps(asdict(injector.counts)))


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
