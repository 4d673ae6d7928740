"""End to end: `edged ingest --blobs s3://...` as a subprocess against a real S3-compatible
endpoint (moto on loopback); uploads through edged.client come back byte-identical
through the query API and `edged query export-binaries`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edged.client import connect
from edged.ingest.blobs import blob_key
from tests.support.big_files import write_big_file
from tests.support.credentials import KeyFile
from tests.support.processes import edged_cmd, ingest_process, peak_rss_bytes
from tests.support.s3server import S3Endpoint

MiB = 1024 * 1024


@pytest.fixture
async def bucket(s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; the AWS_* credentials in our environment, for the children."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return await s3.new_bucket()


async def _keys(s3: S3Endpoint, bucket: str) -> tuple[list[str], list[str]]:
    async with s3.client() as c:
        objs = await c.list_objects_v2(Bucket=bucket)
        ups = await c.list_multipart_uploads(Bucket=bucket)
    return sorted(o["Key"] for o in objs.get("Contents", [])), [
        u["Key"] for u in ups.get("Uploads", [])
    ]


def _flags(key: KeyFile, s3: S3Endpoint, bucket: str) -> list[str]:
    return [
        *("--api-key-id", key.key_id, "--api-key-file", str(key.path), "--org-id", "acme"),
        *("--blobs", f"s3://{bucket}/edged", "--s3-endpoint", s3.url),
    ]


async def test_uploads_through_ingest_come_back_byte_identical(
    tmp_path: Path, key: KeyFile, s3: S3Endpoint, bucket: str
) -> None:
    data = tmp_path / "ingest"
    streamed_bytes = os.urandom(MiB) * 9 + b"tail"  # two multipart parts
    log = tmp_path / "ingest.log"
    with ingest_process(data, _flags(key, s3, bucket), log=log) as (server, port):
        address = f"127.0.0.1:{port}"
        async with connect(address, api_key_id=key.key_id, api_key=key.secret, tls=False) as c:
            notes = await c.file_upload(
                "part-1", b"run notes\n", file_name="notes", file_extension=".txt"
            )
            streamed = await c.streaming_data_capture_upload(streamed_bytes, "part-1", ".bin")
            got = await c.binary_data_by_ids([notes, streamed])
        assert [g.binary for g in got] == [b"run notes\n", streamed_bytes]

        query = ["--address", address, "--api-key-id", key.key_id]
        query += ["--api-key-file", str(key.path), "--insecure"]
        out = tmp_path / "out"
        res = await asyncio.to_thread(
            subprocess.run,
            edged_cmd("query", "export-binaries", str(out), *query),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert (out / "notes.txt").read_bytes() == b"run notes\n"  # its original name
        assert (out / f"{streamed}.bin").read_bytes() == streamed_bytes

        objects, uploads = await _keys(s3, bucket)
        assert objects == sorted(f"edged/{blob_key('acme', b)}" for b in (notes, streamed))
        assert uploads == []  # and no pending marker: both rows committed
        assert not (data / "blobs").exists()
        server.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(server.wait, 30) == 0
        logged = log.read_text()
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in logged


CLIENT_SCRIPT = """
import asyncio, sys
from pathlib import Path
from edged.client import UploadClient

async def main() -> None:
    addr, key_id, key, path = sys.argv[1:5]
    async with UploadClient(addr, api_key_id=key_id, api_key=key, tls=False) as c:
        print(await c.file_upload_from_path(path, "part-1"), flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
def test_large_file_streams_to_the_bucket_with_flat_server_memory(
    tmp_path: Path, key: KeyFile, s3: S3Endpoint, bucket: str
) -> None:
    """The server holds one 8 MiB part at a time, never the file: its peak RSS stays far
    below the file's size."""
    size = 160 * MiB
    big = tmp_path / "big.bin"
    digest = write_big_file(big, size)
    with ingest_process(tmp_path / "ingest", _flags(key, s3, bucket)) as (server, port):
        client = subprocess.run(
            [sys.executable, "-c", CLIENT_SCRIPT, f"127.0.0.1:{port}", key.key_id, key.secret,
             str(big)],
            check=False, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        binary_id = client.stdout.strip()
        server_peak = peak_rss_bytes(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0

    async def fetch() -> tuple[int, str]:
        async with s3.client() as c:
            got = await c.get_object(Bucket=bucket, Key=f"edged/{blob_key('acme', binary_id)}")
            sha = hashlib.sha256()
            n = 0
            async with got["Body"] as body:
                async for chunk in body.iter_chunks():
                    sha.update(chunk)
                    n += len(chunk)
        return n, sha.hexdigest()

    assert asyncio.run(fetch()) == (size, digest)
    print(f"\npeak RSS of edged ingest with --blobs s3://: {server_peak / MiB:.1f} MiB")
    assert server_peak < size  # holding the file would need all of it and the baseline


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--blobs", "s3://Fleet_Data/x"], {}, "is not an S3 bucket name"),
        (["--blobs", "/srv/blobs"], {}, "is not s3://BUCKET[/PREFIX]"),
        (["--s3-endpoint", "http://127.0.0.1:9"], {}, "--s3-endpoint needs --blobs"),
        (["--blobs", "s3://fleet-data"], {"AWS_ACCESS_KEY_ID": "id"}, "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_blob_flag_errors_exit_2_with_one_sentence(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    res = subprocess.run(
        edged_cmd("ingest", "--data", str(tmp_path / "d"), *args),
        env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr
