"""The reference DataSync + auth server (`edged ingest`) and its storage.

Needs the `ingest` extra (`pip install 'edged[ingest]'`: pymongo's bson for the query
languages and stored values). The names below load lazily, so the limits and auth
modules that the CLI and daemon read (`edged.ingest.guard`, `.auth`, `.limits`) import
on a robot installed without it; `require_server()` says what is missing instead of an
ImportError deep in a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from edged.errors import MissingExtra

if TYPE_CHECKING:
    from edged.ingest.auth import ApiKey, KeyStore
    from edged.ingest.server import IngestServer, IngestSettings
    from edged.ingest.storage import IngestStore, StoredBinary, StoredReading, UploadIds

__all__ = [
    "ApiKey",
    "IngestServer",
    "IngestSettings",
    "IngestStore",
    "KeyStore",
    "StoredBinary",
    "StoredReading",
    "UploadIds",
    "require_server",
]

_SERVER_ONLY = ("bson", "pymongo")
_HOME = {
    "ApiKey": "auth",
    "KeyStore": "auth",
    "IngestServer": "server",
    "IngestSettings": "server",
    "IngestStore": "storage",
    "StoredBinary": "storage",
    "StoredReading": "storage",
    "UploadIds": "storage",
}


def require_server(what: str = "edged ingest") -> None:
    """Import the server, or raise MissingExtra naming the extra that provides it."""
    try:
        importlib.import_module("edged.ingest.server")
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in _SERVER_ONLY:
            raise
        raise MissingExtra(what) from None


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'edged.ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edged.ingest.{home}"), name)
