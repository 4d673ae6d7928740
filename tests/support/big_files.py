"""A large file whose every MiB differs, for the tests that stream one and check that
neither side held it in memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MiB = 1024 * 1024


def write_big_file(path: Path, size: int) -> str:
    """`size` bytes (whole MiB) of random data at `path`, each MiB numbered so none
    repeats; returns their SHA-256 in hex."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for i in range(size // MiB):
            piece = block[:-4] + i.to_bytes(4, "big")
            f.write(piece)
            digest.update(piece)
    return digest.hexdigest()
