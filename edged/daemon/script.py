"""SQL run on the outbox connection's own thread in one call.

aiosqlite runs each call (`execute`, `fetchone`, a cursor's close) as one job on its
SQLite thread: a queue put, a future, and the event loop and that thread taking turns
for the GIL. A transaction of ten statements was ten such hops. A `Script` collects
statements (or small functions of the `sqlite3.Connection`) and runs them all in one
hop; `on_thread` runs any such function. Nothing here holds a lock or a transaction:
the outbox decides where scripts run (see `outbox.Outbox._tx`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import aiosqlite

_T = TypeVar("_T")
Step = Callable[[sqlite3.Connection], object]


class Script:
    """Statements to run in order, in one hop; what they return is not read back."""

    def __init__(self) -> None:
        self.steps: list[Step] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.steps.append(lambda conn: conn.execute(sql, args))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.steps.append(lambda conn: conn.executemany(sql, rows))

    def call(self, step: Step) -> None:
        """A function of the connection (e.g. a read whose result the next write needs)."""
        self.steps.append(step)

    def run(self, conn: sqlite3.Connection) -> None:
        for step in self.steps:
            step(conn)


async def on_thread(db: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """`fn(connection)` on `db`'s SQLite thread, in one hop. aiosqlite runs all its calls
    this way (`Connection._execute`, in every version we allow) but has no public name
    for a caller's own function."""
    run: Callable[..., Any] = db._execute
    return cast(_T, await run(lambda: fn(db._conn)))


async def run_script(db: aiosqlite.Connection, script: Script) -> None:
    if script.steps:
        await on_thread(db, script.run)


def fetchone(sql: str, args: Sequence[Any] = ()) -> Callable[[sqlite3.Connection], Any]:
    """A one-row read for `on_thread`."""
    return lambda conn: conn.execute(sql, args).fetchone()
