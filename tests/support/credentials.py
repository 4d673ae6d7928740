"""TLS material and API-key files as operators hold them (the fixtures are in conftest)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path


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

    def ingest_args(self) -> list[str]:
        """The `edged ingest` flags that make this key the server's one key."""
        return ["--api-key-id", self.key_id, "--api-key-file", str(self.path)]


def make_key_file(directory: Path) -> KeyFile:
    """A fresh API key in a new mode-0600 file `key-<id>` under `directory`."""
    key_id, secret = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    path = directory / f"key-{key_id}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return KeyFile(key_id, secret, path)
