"""Multi-row INSERTs for rows that share some of their values (one upload's readings in
the ingest server, one file's readings in the outbox).

`executemany` runs the statement once per row; here a chunk of rows is one statement,
with the shared values bound once (?1..?k) and each row adding only its own: about half
SQLite's CPU per row (docs/performance.md). Chunk sizes are few and round, so each statement text
is compiled once and then found in the connection's statement cache (compiling a
1000-row INSERT costs ten times running it); the daemon and the SDK send 1000 readings a
call, so a call is one statement.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CHUNKS = (1000, 500, 200, 100, 50, 20, 10, 5, 2, 1)


@dataclass(frozen=True)
class SharedInsert:
    """INSERT INTO `table`(`columns`) where the `shared` columns have one value for all
    rows of a call; the other columns are each row's own, in `columns` order."""

    table: str
    columns: tuple[str, ...]
    shared: tuple[str, ...]

    def run(
        self, conn: sqlite3.Connection, shared: Sequence[Any], own: Sequence[Sequence[Any]]
    ) -> None:
        """Insert one row per item of `own` (its own columns' values, in `columns` order);
        `shared` holds the shared columns' values, in `self.shared` order."""
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        width = len(self.columns) if _PLAIN else len(self.columns) - len(self.shared)
        sizes = [n for n in CHUNKS if len(self.shared) + n * width <= limit] or [1]
        i = 0
        while i < len(own):
            n = next((size for size in sizes if size <= len(own) - i), 1)
            values: list[Any] = [] if _PLAIN else list(shared)
            for row in own[i : i + n]:
                if _PLAIN:
                    values += shared
                values += row
            conn.execute(_sql(self, n), values)
            i += n


# CPython 3.12.0-3.12.3 warn that numbered `?N` placeholders bound from a sequence are
# deprecated (withdrawn in 3.12.4, gh-117995); there the shared values are repeated in
# each row under plain `?` (~1.5 us more per 16-column row than binding them once).
_PLAIN = (3, 12) <= sys.version_info[:3] < (3, 12, 4)


@functools.lru_cache(maxsize=64)
def _sql(insert: SharedInsert, rows: int) -> str:
    k = len(insert.shared)
    own = [c for c in insert.columns if c not in insert.shared]
    if _PLAIN:
        row = f"({','.join('?' * len(insert.columns))})"
        columns = ", ".join([*insert.shared, *own])
        return f"INSERT INTO {insert.table}({columns}) VALUES {','.join([row] * rows)}"
    values = []
    for r in range(rows):
        slots = [
            f"?{insert.shared.index(c) + 1}"
            if c in insert.shared
            else f"?{k + r * len(own) + own.index(c) + 1}"
            for c in insert.columns
        ]
        values.append(f"({','.join(slots)})")
    return f"INSERT INTO {insert.table}({', '.join(insert.columns)}) VALUES {','.join(values)}"
