"""edged.rows.SharedInsert: the same rows, in the same order, as one INSERT per row."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edged.rows import SharedInsert

INSERT = SharedInsert("t", ("a", "b", "c", "d"), shared=("c", "a"))


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(":memory:")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, a, b, c, d)")
    yield c
    c.close()


def _rows(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return conn.execute("SELECT a, b, c, d FROM t ORDER BY id").fetchall()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 2100), limit=st.sampled_from([999, 32766]))
def test_rows_arrive_in_order_with_their_shared_values(n: int, limit: int) -> None:
    c = sqlite3.connect(":memory:")
    try:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, a, b, c, d)")
        c.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
        INSERT.run(c, ("C", 1), [(i, b"x" * (i % 3)) for i in range(n)])
        assert _rows(c) == [(1, i, "C", b"x" * (i % 3)) for i in range(n)]
    finally:
        c.close()


def test_a_tiny_variable_limit_still_inserts_row_by_row(conn: sqlite3.Connection) -> None:
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 4)
    INSERT.run(conn, ("C", 1), [(0, "p"), (1, "q")])
    assert _rows(conn) == [(1, 0, "C", "p"), (1, 1, "C", "q")]
