"""A thin layer over an asyncpg connection for the PostgreSQL store: SQL is written with
``?`` placeholders (as for SQLite) and numbered once per statement text; ``exe`` answers
the number of rows a statement touched."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import asyncpg

# Connection-level failures: the database is down, restarting, unreachable or full.
DOWN = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # The client's own state after the connection broke mid-transaction.
    asyncpg.InternalClientError,
)
RETRY = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)  # run it again


class Answer(Exception):
    """Raised inside a transaction to roll it back and answer ``value`` (a duplicate)."""

    def __init__(self, value: Any) -> None:
        super().__init__("answer")
        self.value = value


@functools.lru_cache(maxsize=2048)
def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2, ...`` (our SQL has no ``?`` literals)."""
    parts = sql.split("?")
    out = [parts[0]]
    for i, part in enumerate(parts[1:], start=1):
        out.append(f"${i}")
        out.append(part)
    return "".join(out)


class Db:
    """One connection (inside a transaction when the store opened one)."""

    __slots__ = ("conn", "written")

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.written = 0  # rows inserted, updated or deleted through this object

    async def one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(numbered(sql), *args)

    async def all(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(numbered(sql), *args))

    async def val(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(numbered(sql), *args)

    async def exe(self, sql: str, *args: Any) -> int:
        status: str = await self.conn.execute(numbered(sql), *args)
        last = status.rsplit(" ", 1)[-1]
        n = int(last) if last.isdigit() and not status.startswith("SELECT") else 0
        self.written += n
        return n

    async def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            await self.conn.executemany(numbered(sql), rows)
            self.written += len(rows)


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection handed back: nothing to undo. The store sets no
    session state (no SET, LISTEN, cursors or advisory locks left held), and asyncpg
    rolls back an open transaction itself; the default reset would cost every
    acquisition a round trip of its own."""
