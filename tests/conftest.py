"""Shared fixtures: real TLS material, real API-key files, real loopback servers.

Also a leak guard: a test that leaves an aiosqlite connection, a non-daemon thread, a
listening socket or a child process behind fails (in teardown), and the run always
exits, because one leaked non-daemon thread would otherwise keep pytest (and CI) alive
forever after the last test.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path

import aiosqlite
import psutil
import pytest
import trustme

from edged.client import UploadClient
from edged.daemon.config import OutboxConfig
from edged.daemon.outbox import Outbox
from edged.ingest import ApiKey, IngestServer, IngestSettings
from tests.support.credentials import Certs, KeyFile, make_key_file
from tests.support.pg import PgServer
from tests.support.s3server import S3Endpoint


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    for extra in cert.cert_chain_pems[1:]:
        with open(d / "cert.pem", "ab") as f:
            f.write(extra.bytes())
    return Certs(d / "ca.pem", d / "cert.pem", d / "key.pem")


@pytest.fixture
def key(tmp_path: Path) -> KeyFile:
    return make_key_file(tmp_path)


@pytest.fixture
async def ingest(tmp_path: Path, key: KeyFile, certs: Certs) -> AsyncIterator[IngestServer]:
    """TLS + API-key ingest server on an ephemeral loopback port."""
    settings = IngestSettings(
        data_dir=tmp_path / "ingest",
        keys=(ApiKey(key.key_id, key.secret, "org-1"),),
        tls_cert=certs.cert_file,
        tls_key=certs.key_file,
        shutdown_grace_s=2.0,
    )
    async with IngestServer(settings) as server:
        yield server


@pytest.fixture
async def client(ingest: IngestServer, key: KeyFile, certs: Certs) -> AsyncIterator[UploadClient]:
    async with UploadClient(
        ingest.address, api_key_id=key.key_id, api_key=key.secret, ca_file=certs.ca_file
    ) as c:
        yield c


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Outbox]:
    """An outbox in `tmp_path/state`; `synchronous=NORMAL` for speed (no test here cuts
    the power, and a crash test closes and reopens it)."""
    ob = await Outbox.open(tmp_path / "state", OutboxConfig(synchronous="NORMAL"))
    yield ob
    await ob.close()


@pytest.fixture(scope="session")
def pg_server() -> Generator[PgServer, None, None]:
    """One real PostgreSQL for the session (tests/pg.py), stopped and removed at its end."""
    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("pgserver (the tests' PostgreSQL) has no wheel for this Python yet")
    server = PgServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Generator[str, None, None]:
    """A fresh, empty database for one test; its URL."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


# --------------------------------------------------------------------------- leak guard

LEAK_GRACE_S = 5.0  # how long a finishing thread/child may take to go after teardown
EXIT_JOIN_S = 10.0  # at session end: bounded wait for stray threads, then a hard exit


@dataclass(frozen=True)
class _Snapshot:
    threads: frozenset[int]
    children: frozenset[int]
    listening: frozenset[str]


def _listening(proc: psutil.Process) -> frozenset[str]:
    """Sockets this process listens on: TCP in LISTEN, and bound Unix sockets."""
    found = {
        f"tcp {c.laddr.ip}:{c.laddr.port}"
        for c in proc.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr
    }
    found |= {f"unix {c.laddr}" for c in proc.net_connections(kind="unix") if c.laddr}
    return frozenset(found)


def _snapshot() -> _Snapshot:
    me = psutil.Process()
    return _Snapshot(
        frozenset(t.ident for t in threading.enumerate() if t.ident is not None),
        frozenset(c.pid for c in me.children()),
        _listening(me),
    )


def _stop_leaked_aiosqlite() -> int:
    """Stop the worker thread of every aiosqlite connection nobody closed (it would
    block interpreter exit); returns how many there were. A closed connection's thread
    may take a moment to end: joined, not counted."""
    alive = [
        (obj, thread)
        for obj in gc.get_objects()
        # type(), not isinstance(): a weak proxy (botocore keeps some) whose referent is
        # gone raises ReferenceError on isinstance().
        if issubclass(type(obj), aiosqlite.Connection)
        and isinstance(thread := getattr(obj, "_thread", None), threading.Thread)
        and thread.is_alive()
    ]
    leaked = [conn for conn, _ in alive if getattr(conn, "_running", False)]
    for conn in leaked:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            conn.stop()  # queues close-and-exit on its own thread
    for _, thread in alive:
        thread.join(LEAK_GRACE_S)
    return len(leaked)


def _leaks(before: _Snapshot) -> list[str]:
    problems: list[str] = []
    deadline = time.monotonic() + LEAK_GRACE_S
    if n := _stop_leaked_aiosqlite():
        problems.append(f"{n} aiosqlite connection(s) not closed (stopped now)")
    for t in threading.enumerate():
        if t.ident in before.threads or t.ident in _WIDE["threads"] or t.daemon:
            continue
        if t is threading.current_thread():
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            problems.append(f"non-daemon thread {t.name!r} still running")
    me = psutil.Process()
    for child in me.children():
        if child.pid in before.children or child.pid in _WIDE["children"]:
            continue
        with_name = f"{child.pid} ({' '.join(child.cmdline()[:4])})"
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except psutil.TimeoutExpired:
            child.kill()
            child.wait(LEAK_GRACE_S)
            problems.append(f"child process {with_name} still running (killed now)")
    for sock in sorted(_listening(me) - before.listening - _WIDE["listening"]):
        problems.append(f"server still listening: {sock}")
    return problems


# Threads, children and sockets that a module-, class- or session-scoped fixture started:
# they outlive the test that first asked for the fixture on purpose, so they are no leak.
_WIDE: dict[str, set[object]] = {"threads": set(), "children": set(), "listening": set()}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[object], request: pytest.FixtureRequest
) -> Generator[None, object, object]:
    if fixturedef.scope == "function":
        return (yield)
    before = _snapshot()
    try:
        return (yield)
    finally:
        after = _snapshot()
        _WIDE["threads"] |= after.threads - before.threads
        _WIDE["children"] |= after.children - before.children
        _WIDE["listening"] |= after.listening - before.listening


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_BEFORE] = _snapshot()
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """Runs after every fixture of the test is torn down; a leak is a teardown error."""
    result = yield
    before = item.stash.get(_BEFORE, None)
    if before is not None and (problems := _leaks(before)):
        pytest.fail(f"{item.nodeid} leaked: " + "; ".join(problems), pytrace=False)
    return result


_BEFORE = pytest.StashKey[_Snapshot]()
_EXIT_STATUS = [0]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS[0] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Last hook of the run: whatever non-daemon thread is still alive now would make
    the interpreter wait forever; name it and exit hard with a failure code instead."""
    _stop_leaked_aiosqlite()
    deadline = time.monotonic() + EXIT_JOIN_S
    stuck = []
    for t in threading.enumerate():
        if t.daemon or t is threading.main_thread():
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            stuck.append(t.name)
    if stuck:
        print(f"\nleak guard: non-daemon threads still running: {stuck}; exiting", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0] or 1)


@pytest.fixture(scope="session")
def s3() -> Generator[S3Endpoint, None, None]:
    """One S3-compatible endpoint (moto, a child process on loopback) for the session;
    each test makes its own bucket."""
    from tests.support.s3server import s3_server

    with s3_server() as endpoint:
        # Registered here too: the setup hook misses a session fixture that a
        # parametrized fixture pulls in (it outlives that test on purpose).
        _WIDE["children"].add(endpoint.pid)
        yield endpoint
