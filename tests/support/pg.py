"""A real PostgreSQL 16 for the tests (the `pgserver` package's binaries; it runs the
server as a dedicated user when we are root). One server per test session, reached over
a Unix socket only (nothing listens on TCP); a fresh database per test that asks for
`pg_url`, dropped afterwards (fixtures in conftest.py).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import psycopg


class PgServer:
    """A started server: `url(db)` for a database on it, `admin` for CREATE/DROP."""

    def __init__(self) -> None:
        # Not under pytest's 0700 tmp tree: as root, pgserver runs PostgreSQL as another
        # user, which must be able to traverse to its data directory (0711: no listing).
        self._dir = Path(tempfile.mkdtemp(prefix="edged-pg-"))
        self._dir.chmod(0o711)
        with warnings.catch_warnings():  # platformdirs warns about an unset XDG_RUNTIME_DIR
            warnings.simplefilter("ignore")
            import pgserver

            self._server: Any = pgserver.get_server(  # type: ignore[attr-defined]
                self._dir / "data", cleanup_mode="delete"
            )
        with psycopg.connect(self.url(), autocommit=True) as conn:
            # A throwaway server: durability costs seconds per CREATE/DROP DATABASE here and
            # proves nothing (crash safety is PostgreSQL's, not ours).
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")

    def url(self, database: str = "postgres") -> str:
        return str(self._server.get_uri(database))

    def create_database(self) -> str:
        name = f"edged_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._server.cleanup()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
