"""`edged ingest` as operators run it: a real process, real signals, real exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edged.client import UploadClient
from edged.ingest.storage import SCHEMA_VERSION
from tests.support.big_files import write_big_file
from tests.support.credentials import Certs, KeyFile, make_key_file
from tests.support.processes import edged_cmd, ingest_process, peak_rss_bytes

MiB = 1024 * 1024


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(edged_cmd(*args), capture_output=True, text=True, timeout=60, check=False)


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    key = make_key_file(tmp_path)
    os.chmod(key.path, 0o644)
    res = _run("ingest", "--data", str(tmp_path / "d"), *key.ingest_args())
    assert res.returncode == 2
    assert f"API key file {key.path} has mode 0644" in res.stderr
    assert key.secret not in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_migrate_creates_and_checks_the_sqlite_schema(tmp_path: Path) -> None:
    data = tmp_path / "d"
    pending = _run("ingest", "migrate", "--data", str(data), "--check")
    assert pending.returncode == 1
    assert f"--data {data}: schema 0 -> {SCHEMA_VERSION} pending" in pending.stdout
    assert not data.exists()  # --check changes nothing
    refused = _run("ingest", "--listen", "127.0.0.1:0", "--data", str(data), "--no-migrate")
    assert refused.returncode == 2
    assert f"run `edged ingest migrate --data {data}` first" in refused.stderr
    done = _run("ingest", "migrate", "--data", str(data))
    assert done.returncode == 0 and f"schema 0 -> {SCHEMA_VERSION}" in done.stdout, done.stderr
    assert _run("ingest", "migrate", "--data", str(data), "--check").returncode == 0


def test_an_index_newer_than_edged_is_refused_untouched(tmp_path: Path) -> None:
    data = tmp_path / "d"
    assert _run("ingest", "migrate", "--data", str(data)).returncode == 0
    with contextlib.closing(sqlite3.connect(data / "ingest.sqlite3")) as db:
        db.execute("PRAGMA user_version = 99")
    for args in (
        ["migrate", "--data", str(data)],
        ["--listen", "127.0.0.1:0", "--data", str(data)],
    ):
        res = _run("ingest", *args)
        assert res.returncode == 2
        assert f"is at schema version 99, newer than this edged's {SCHEMA_VERSION}" in res.stderr
    with contextlib.closing(sqlite3.connect(data / "ingest.sqlite3")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (99,)


def test_migrate_needs_one_index(tmp_path: Path) -> None:
    for args in ([], ["--data", str(tmp_path), "--database", "postgresql://h/db"]):
        res = _run("ingest", "migrate", *args)
        assert res.returncode == 2
        assert "needs --database URL or --data DIR (one)" in res.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--api-key-id", "abc"], "give them in pairs"),
        (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
        (["--listen", "nonsense"], "is not HOST:PORT"),
        (["--max-message-bytes", "lots"], "is not a size"),
    ],
)
def test_usage_errors_exit_2_with_one_sentence(
    tmp_path: Path, args: list[str], message: str
) -> None:
    res = _run("ingest", "--data", str(tmp_path / "d"), *args)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr


async def test_readme_commands_with_relative_paths_serve_uploads_and_queries(
    tmp_path: Path, certs: Certs
) -> None:
    """README: `edged ingest --data ./var/ingest ... --tls-cert cert.pem` then `edged query`,
    every path relative to the directory both run in."""
    site = tmp_path / "site"
    site.mkdir()
    for src, name in ((certs.cert_file, "cert.pem"), (certs.key_file, "key.pem")):
        shutil.copy(src, site / name)
    shutil.copy(certs.ca_file, site / "ca.pem")
    key = make_key_file(site)
    key_arg = f"./{key.path.name}"
    extra = ["--api-key-id", key.key_id, "--api-key-file", key_arg]
    tls = ["--tls-cert", "cert.pem", "--tls-key", "key.pem"]
    with ingest_process("./var/ingest", [*extra, *tls], cwd=site) as (server, port):
        address = f"127.0.0.1:{port}"
        async with UploadClient(
            address, api_key_id=key.key_id, api_key=key.secret, ca_file=certs.ca_file
        ) as client:
            await client.tabular_data_capture_upload(
                [{"temp_c": 21.5}], "part-1", "rdk:component:sensor", "thermo", "Readings"
            )
            bid = await client.binary_data_capture_upload(
                b"jpeg", "part-1", "rdk:component:camera", "cam", "GetImages", ".jpg"
            )
        query = ["--address", address, "--api-key-id", key.key_id, *["--api-key-file", key_arg]]
        query += ["--ca-file", "ca.pem"]

        def run(*args: str) -> str:
            res = subprocess.run(
                edged_cmd("query", *args, *query),
                cwd=site, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert res.returncode == 0, res.stderr
            return res.stdout

        tabular = await asyncio.to_thread(run, "tabular", "--json")
        assert json.loads(tabular)["data"] == {"temp_c": 21.5}
        binary = await asyncio.to_thread(run, "binary", "--json")
        assert json.loads(binary)["binary_data_id"] == bid
        sql = await asyncio.to_thread(run, "sql", "SELECT count(*) AS n FROM readings")
        assert json.loads(sql) == {"n": 1}
        await asyncio.to_thread(run, "export-binaries", "./out")
        assert (site / "out" / f"{bid}.jpg").read_bytes() == b"jpeg"
        assert (site / "var" / "ingest" / "ingest.sqlite3").is_file()
        server.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 30) == 0


CLIENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from edged.client import UploadClient

async def main() -> None:
    addr, key_id, key, path = sys.argv[1:5]
    async with UploadClient(addr, api_key_id=key_id, api_key=key, tls=False) as c:
        bid = await c.file_upload_from_path(path, "part-1", tags=["big"])
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    hwm = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")]
    print(bid, int(hwm[0].split()[1]) * 1024, flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
def test_200mb_file_streams_with_flat_memory_and_sigterm_exits_0(
    tmp_path: Path, key: KeyFile
) -> None:
    """Neither side may hold the file: peak RSS of both stays far below its size."""
    size = 200 * MiB
    big = tmp_path / "big.bin"
    digest = write_big_file(big, size)
    data = tmp_path / "ingest"
    with ingest_process(data, ["--api-key-id", key.key_id, "--api-key-file", str(key.path)]) as (
        server,
        port,
    ):
        client = subprocess.run(
            [
                sys.executable,
                "-c",
                CLIENT_SCRIPT,
                f"127.0.0.1:{port}",
                key.key_id,
                key.secret,
                str(big),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert client.returncode == 0, client.stderr
        binary_id, client_peak = client.stdout.split()
        server_peak = peak_rss_bytes(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    blobs = [p for p in (data / "blobs").rglob("*") if p.is_file() and p.name == binary_id]
    assert len(blobs) == 1
    assert blobs[0].stat().st_size == size
    with open(blobs[0], "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == digest
    # Flat memory: an implementation that buffers the file would exceed 200 MiB.
    print(
        f"\npeak RSS: client {int(client_peak) / MiB:.1f} MiB, server {server_peak / MiB:.1f} MiB"
    )
    assert int(client_peak) < 100 * MiB
    assert server_peak < 100 * MiB


async def test_sigterm_with_an_idle_authenticated_client_exits_within_grace(
    tmp_path: Path, key: KeyFile
) -> None:
    """An open idle connection must not hold shutdown: asyncio's Server.wait_closed waits
    for every connection since Python 3.12.1, so the server has to close them itself."""
    grace_s = 2
    with ingest_process(
        tmp_path / "ingest",
        ["--api-key-id", key.key_id, "--api-key-file", str(key.path), "--grace", str(grace_s)],
        log=tmp_path / "ingest.err",
    ) as (server, port):
        async with UploadClient(
            f"127.0.0.1:{port}", api_key_id=key.key_id, api_key=key.secret, tls=False
        ) as client:
            assert await client.tabular_data_capture_upload([{"a": 1}], "p", "t", "n", "m")
            server.send_signal(signal.SIGTERM)  # the client's connection stays open, idle
            try:
                code = await asyncio.to_thread(server.wait, grace_s + 10)  # a bound, not a timing
            except subprocess.TimeoutExpired:
                pytest.fail(f"edged ingest still running {grace_s + 10}s after SIGTERM")
        assert code == 0
        assert b"Traceback" not in (tmp_path / "ingest.err").read_bytes()
