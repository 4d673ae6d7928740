"""What a real `edged ingest` stored, read straight from its SQLite index (read-only)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from edged.ingest.values import decode_python


def _open(data: Path) -> sqlite3.Connection:
    return sqlite3.connect((data / "ingest.sqlite3").as_uri() + "?mode=ro", uri=True)


def ingest_count(data: Path, table: str = "readings") -> int:
    """Rows in `table`; 0 while the server has not created its index yet."""
    if not (data / "ingest.sqlite3").exists():
        return 0
    with contextlib.closing(_open(data)) as db:
        try:
            return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return 0  # the file is there, its schema not yet


def ingest_seqs(data: Path) -> list[int]:
    """The `seq` of every stored reading, sorted (see capture_files.tabular_reading)."""
    with contextlib.closing(_open(data)) as db:
        return sorted(stored_seqs(db))


def stored_seqs(db: sqlite3.Connection) -> list[int]:
    """The `seq` of every reading in the index open as `db`, in row order (rows hold JSON
    or, since schema 2, the Struct's bytes: values.decode_python reads both)."""
    rows = db.execute("SELECT data, data_exact FROM readings ORDER BY rowid")
    return [int(decode_python(*r)["seq"]) for r in rows]


def read_index(data: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of a stopped server's index."""
    with contextlib.closing(_open(data)) as db:
        db.row_factory = sqlite3.Row
        return {
            table: [dict(row) for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]
            for table in ("uploads", "readings", "binaries")
        }
