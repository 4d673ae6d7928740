"""The reference DataSync + auth server (`edged ingest`) and its storage."""

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
]
