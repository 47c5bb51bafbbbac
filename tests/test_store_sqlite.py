"""The Store contract suite against the SQLite store, plus SQLite-specific checks."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from tests.store_contract import Opener, StoreContract, new_msg, with_users
from tidings.clock import SystemClock
from tidings.protocol.errors import TidingsError
from tidings.store.sqlite import SqliteStore


@pytest.fixture
def open_store(tmp_path: Any) -> Opener:
    path = str(tmp_path / "t.db")

    async def opener() -> SqliteStore:
        store = SqliteStore(path, SystemClock())
        await store.open()
        store.set_worker_id(await store.lease_worker_id("test", 0, 10**12))
        return store

    return opener


class TestSqliteStore(StoreContract):
    pass


async def test_wal_and_full_sync(open_store: Opener, tmp_path: Any) -> None:
    """The database runs in WAL mode with synchronous=FULL on the writer."""
    store = await open_store()
    assert isinstance(store, SqliteStore)
    assert store._wconn is not None
    assert store._wconn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._wconn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    await store.close()


async def test_group_commit_batches_writes(open_store: Opener) -> None:
    """Many concurrent appends are committed in fewer transactions than messages."""
    store = await open_store()
    assert isinstance(store, SqliteStore)
    await with_users(store, "a", "b")
    before = store.batches
    await asyncio.gather(*(store.append_message(new_msg("a", "b", f"g{i}")) for i in range(500)))
    assert store.batches - before < 500
    await store.close()


async def test_full_queue_is_unavailable(open_store: Opener) -> None:
    """Past max_pending writes the store refuses with a retryable `unavailable`."""
    store = await open_store()
    assert isinstance(store, SqliteStore)
    await with_users(store, "a", "b")
    store.max_pending = 0
    with pytest.raises(TidingsError) as err:
        await store.append_message(new_msg("a", "b", "x"))
    assert err.value.code == "unavailable" and err.value.retryable
    store.max_pending = 10
    assert (await store.append_message(new_msg("a", "b", "x"))).record.seq == 1
    await store.close()


async def test_migrations_recorded(open_store: Opener, tmp_path: Any) -> None:
    """Migrations are numbered and recorded; reopening applies nothing twice."""
    store = await open_store()
    await store.close()
    store = await open_store()
    await store.close()
    conn = sqlite3.connect(str(tmp_path / "t.db"))
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == [1]
