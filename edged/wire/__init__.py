"""The wire layer: the one `Connection` to an ingest/DataSync server (channel, TLS, API
key -> token, re-authentication, error mapping) and `connect()`, which the daemon, the
CLI and SDK scripts all use. Imports nothing of edged but `errors` and `_proto`."""

from edged.wire.connection import Connection, connect

__all__ = ["Connection", "connect"]
