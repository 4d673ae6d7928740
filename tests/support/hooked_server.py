"""An in-process plaintext `edged ingest` (no keys) that hands every request to a test's
hook: how tests watch or break calls on a real server instead of mocking it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from grpclib.events import RecvRequest

from edged.ingest import IngestServer, IngestSettings


@asynccontextmanager
async def hooked_server(
    data_dir: Path, hook: Callable[[RecvRequest], Coroutine[Any, Any, None]]
) -> AsyncIterator[IngestServer]:
    """Started on a loopback port, stopped on exit; `synchronous=NORMAL` for speed (no
    test here cuts the power)."""
    settings = IngestSettings(data_dir=data_dir, extra_hooks=(hook,), synchronous="NORMAL")
    async with IngestServer(settings) as srv:
        yield srv
