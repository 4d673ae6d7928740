"""The stock SDK's side of the interop tests: which interpreter runs it, and the real
`edged ingest` (the console script users run, TLS, one API key) it talks to, on either
backend (`Backend`): the embedded SQLite index under `--data DIR`, or two replicas
sharing one PostgreSQL (`--database`) and one S3 bucket (`--blobs s3://`), the SDK
uploading through one and querying through the other (`ingest_pair`)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tests.interop import sdk_upload as sdk
from tests.support.credentials import Certs, KeyFile
from tests.support.ingest_db import read_index
from tests.support.processes import read_line
from tests.support.s3server import S3Endpoint

INTEROP_PYTHON = os.environ.get("EDGED_INTEROP_PYTHON", "")
"""The interpreter with the stock viam-sdk (`make interop` sets it); empty: skip."""
ORG = sdk.ORG
START_DEADLINE_S = 30.0
SDK_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
_LISTENING = re.compile(
    r"edged ingest: listening on 127\.0\.0\.1:(\d+) \(tls, 1 API key\(s\)\),"
    r"(?: index in [^,]+,)? data in ([^;]+)(?:; blobs in (.+))?"
)
# uploads has no rowid in PostgreSQL: ordered by time of arrival there.
_TABLES = {"uploads": "created_at_ns, upload_id", "readings": "rowid", "binaries": "rowid"}


@dataclass(frozen=True)
class Backend:
    """Where `edged ingest` keeps its index and blobs. "sqlite": `--data DIR` only;
    "postgresql": `--database URL --blobs s3://BUCKET/edged/ --s3-endpoint URL` (a
    fresh database and bucket per test, on the session's servers)."""

    name: str
    database: str = ""
    s3: S3Endpoint | None = None
    bucket: str = ""
    prefix: str = "edged/"

    def flags(self) -> list[str]:
        if self.s3 is None:
            return []
        blobs = f"s3://{self.bucket}/{self.prefix.rstrip('/')}"
        return ["--database", self.database, "--blobs", blobs, "--s3-endpoint", self.s3.url]

    def env(self) -> dict[str, str]:
        return {**os.environ, **(self.s3.env if self.s3 else {})}

    def _s3_client(self) -> Any:
        import botocore.session

        assert self.s3 is not None
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.s3.url,
            region_name="us-east-1",
            aws_access_key_id=self.s3.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.s3.env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self) -> None:
        self._s3_client().create_bucket(Bucket=self.bucket)

    def stored(self, data_dir: Path) -> dict[str, list[dict[str, Any]]]:
        """Every row of the uploads, readings and binaries tables, in arrival order."""
        if not self.database:
            return read_index(data_dir)
        with psycopg.connect(self.database, row_factory=dict_row) as conn:
            return {
                t: [dict(r) for r in conn.execute(f"SELECT * FROM {t} ORDER BY {order}")]
                for t, order in _TABLES.items()
            }

    def blob(self, data_dir: Path, blob_path: str) -> bytes:
        """The stored bytes of a binaries row's `blob_path`."""
        if self.s3 is None:
            return (data_dir / blob_path).read_bytes()
        got = self._s3_client().get_object(Bucket=self.bucket, Key=self.prefix + blob_path)
        return bytes(got["Body"].read())

    def blob_names(self, data_dir: Path) -> list[str]:
        """Every stored blob (files under DIR/blobs, objects under PREFIX/blobs/)."""
        if self.s3 is None:
            root = data_dir / "blobs"
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        return self._keys("blobs/")

    def half_written(self, data_dir: Path) -> list[str]:
        """Blobs begun and never finished: temp files, or pending markers and multipart
        uploads in the bucket."""
        if self.s3 is None:
            return [p.name for p in (data_dir / "blobs" / ".tmp").iterdir()]
        ups = self._s3_client().list_multipart_uploads(Bucket=self.bucket)
        return self._keys("pending/") + [u["Key"] for u in ups.get("Uploads", [])]

    def _keys(self, under: str) -> list[str]:
        got = self._s3_client().list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + under)
        return sorted(o["Key"] for o in got.get("Contents", []))


def _edged_console() -> list[str]:
    script = Path(sys.executable).with_name("edged")  # the console script users run
    return [str(script)] if script.exists() else [sys.executable, "-m", "edged"]


@dataclass
class IngestProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    stderr_path: Path
    backend: Backend = field(default_factory=lambda: Backend("sqlite"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then wait for the graceful exit; returns (exit code, rest of stdout)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        return self.proc.returncode, out.decode(errors="replace")


@contextlib.contextmanager
def running_ingest(
    tmp_path: Path,
    key: KeyFile,
    certs: Certs,
    backend: Backend | None = None,
    name: str = "ingest",
) -> Iterator[IngestProcess]:
    backend = backend or Backend("sqlite")
    data_dir = tmp_path / f"{name}-data"
    stderr_path = tmp_path / f"{name}.stderr"
    args = [
        *_edged_console(), "ingest", "--listen", "127.0.0.1:0", "--data", str(data_dir),
        "--api-key-id", key.key_id, "--api-key-file", str(key.path), "--org-id", ORG,
        "--tls-cert", str(certs.cert_file), "--tls-key", str(certs.key_file), *backend.flags(),
    ]  # fmt: skip
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=err, bufsize=0, env=backend.env()
        )
    try:
        try:
            line = read_line(proc, START_DEADLINE_S).decode().rstrip("\n")
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{exc}\nstderr:\n{stderr_path.read_text()}") from None
        match = _LISTENING.fullmatch(line)
        assert match, f"unexpected first line from edged ingest: {line!r}"
        assert match[2] == str(data_dir)
        assert (match[3] is None) == (backend.s3 is None), line
        yield IngestProcess(proc, int(match[1]), data_dir, stderr_path, backend)
    finally:
        if proc.poll() is None:  # the test failed before stopping it
            proc.kill()
            proc.communicate()
        assert proc.stdout is not None
        proc.stdout.close()


@contextlib.contextmanager
def ingest_pair(
    tmp_path: Path, key: KeyFile, certs: Certs, backend: Backend
) -> Iterator[tuple[IngestProcess, IngestProcess]]:
    """(the replica the SDK uploads through, the one it queries through): one process
    on SQLite, two sharing the database and bucket otherwise."""
    with running_ingest(tmp_path, key, certs, backend, "replica-1") as first:
        if backend.s3 is None:
            yield first, first
            return
        with running_ingest(tmp_path, key, certs, backend, "replica-2") as second:
            yield first, second
