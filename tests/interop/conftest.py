"""Each interop case runs on both backends: `edged ingest --data DIR` (SQLite), and two
replicas sharing one PostgreSQL and one S3 bucket (the session's pgserver and moto; a
fresh database and bucket per test). Without pgserver (no wheel for this Python yet)
the second variant skips, saying so."""

from __future__ import annotations

import uuid

import pytest

from tests.support.interop import Backend


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite")
    database: str = request.getfixturevalue("pg_url")
    s3 = request.getfixturevalue("s3")
    chosen = Backend("postgresql", database, s3, f"edged-interop-{uuid.uuid4().hex[:12]}")
    chosen.create_bucket()
    return chosen
