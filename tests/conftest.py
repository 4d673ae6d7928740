"""Shared fixtures: real TLS material, real API-key files, real loopback servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from edged.client import UploadClient
from edged.ingest import ApiKey, IngestServer, IngestSettings

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Certs:
    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class KeyFile:
    key_id: str
    secret: str
    path: Path


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


def make_key_file(directory: Path) -> KeyFile:
    key_id, secret = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    path = directory / f"key-{key_id}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return KeyFile(key_id, secret, path)


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
