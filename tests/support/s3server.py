"""A real S3-compatible endpoint for tests: moto's server in a child process on loopback.

A child rather than a thread: its memory (moto keeps objects) and CPU stay out of the
test process, and the endpoint is as remote to the code under test as a real one.
Run as `python -m tests.support.s3server`: prints "moto listening on 127.0.0.1:PORT", serves
until its stdin closes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.support.processes import read_line

# moto accepts any credentials; these only have to be present (AWS_* only, see s3blobs).
ENV = {
    "AWS_ACCESS_KEY_ID": "edged-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "edged-test-secret-never-logged",
    "AWS_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    env: dict[str, str]
    pid: int

    def client(self) -> Any:
        """An S3 client of this endpoint, to use as `async with` (aiobotocore is untyped)."""
        from edged.ingest.s3blobs import botocore_session  # the `s3` extra: tests only

        return botocore_session().create_client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    async def new_bucket(self) -> str:
        """A fresh, empty bucket's name."""
        name = f"edged-{uuid.uuid4().hex[:12]}"
        async with self.client() as c:
            await c.create_bucket(Bucket=name)
        return name


@contextmanager
def s3_server() -> Iterator[S3Endpoint]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.s3server"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        line = read_line(proc, 60).decode().strip()
        assert line.startswith("moto listening on "), line
        yield S3Endpoint(f"http://{line.rsplit(' ', 1)[1]}", dict(ENV), proc.pid)
    finally:
        if proc.stdin:
            proc.stdin.close()  # the child's cue to stop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def main() -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"moto listening on {host}:{port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or dies)
    server.stop()


if __name__ == "__main__":
    main()
