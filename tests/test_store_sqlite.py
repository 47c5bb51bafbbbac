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
    from tidings.store.migrations import migration_scripts

    expected = [v for v, _ in migration_scripts()]
    assert expected[:2] == [1, 2]
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version")] == expected


async def test_disk_full_keeps_seqs_gapless_and_writer_alive(open_store: Opener) -> None:
    """A full disk fails the affected batch as `unavailable`; after space returns, retries
    commit with gapless seqs and the writer keeps serving (also non-message writes)."""
    store = await open_store()
    assert isinstance(store, SqliteStore) and store._wconn is not None
    await with_users(store, "a", "b", "c")
    await store.append_message(new_msg("a", "b", "x0"))
    pages = store._wconn.execute("PRAGMA page_count").fetchone()[0]
    store._wconn.execute(f"PRAGMA max_page_count={pages + 2}")
    huge = new_msg("a", "c", "y1", text="z" * 200_000)
    results = await asyncio.gather(
        store.append_message(new_msg("a", "b", "x1")),
        store.append_message(huge),
        store.append_message(new_msg("a", "b", "x2")),
        return_exceptions=True,
    )
    codes = [r.code if isinstance(r, TidingsError) else "ok" for r in results]
    assert codes[1] != "ok"
    with pytest.raises(TidingsError):  # a non-message write on a full disk fails cleanly
        await store.put_user("d" * 10, "d", "x" * 300_000, None, 1)
    store._wconn.execute("PRAGMA max_page_count=1073741823")
    for cid in ("x1", "x2"):
        await store.append_message(new_msg("a", "b", cid))
    rows = await store.messages_after("d:a|b", 0, 10)
    assert [r.seq for r in rows] == [1, 2, 3]
    assert [r.cid for r in rows] == ["x0", "x1", "x2"]
    await store.put_user("e", "e", "", None, 1)  # the writer is alive
    await store.close()


async def test_write_gate_resumes_after_any_commit(tmp_path: Any) -> None:
    """Paused senders resume when the backlog drains, whichever write drained it last."""
    from tidings.session.gate import WriteGate

    store = SqliteStore(str(tmp_path / "g.db"), SystemClock(), max_batch=1)
    await store.open()
    store.set_worker_id(1)
    await with_users(store, "a", "b")

    class FakeLink:
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def resume_reading(self) -> None:
            self.paused = False

    class FakeSession:
        link = FakeLink()

    gate = WriteGate(store, high=1, low=0)
    session = FakeSession()
    fut = store.append_message(new_msg("a", "b", "m1"))
    gate.after_submit(session)  # type: ignore[arg-type]
    assert session.link.paused
    await asyncio.gather(fut, store.put_user("c", "c", "", None, 1))
    assert not session.link.paused and not gate.paused
    await store.close()


async def test_a_reader_that_cannot_open_fails_its_reads(
    open_store: Opener, monkeypatch: Any
) -> None:
    """A reader thread that cannot open its connection (out of file descriptors, say)
    answers its batch `unavailable` at once instead of leaving the reads waiting; once it
    can open again, reads work."""
    store = await open_store()
    assert isinstance(store, SqliteStore)
    await with_users(store, "a")

    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    real = store._reader
    monkeypatch.setattr(store, "_reader", broken)
    with pytest.raises(TidingsError) as err:
        await asyncio.wait_for(store.get_user("a"), 5)
    assert err.value.code == "unavailable"
    monkeypatch.setattr(store, "_reader", real)
    assert (await store.get_user("a")) is not None
    await store.close()
    with pytest.raises(TidingsError):
        await asyncio.wait_for(store.get_user("a"), 5)  # closed: refused, not hanging


async def test_checkpointer_keeps_the_wal_bounded_and_rests_when_idle(tmp_path: Any) -> None:
    """The checkpointer copies the WAL back after commits, makes it start over once it
    passes wal_restart_bytes (the file stops growing), and runs no rounds while nothing
    is committed."""
    import os

    path = str(tmp_path / "c.db")
    store = SqliteStore(path, SystemClock(), checkpoint_interval_s=0.01, wal_restart_bytes=64 << 10)
    await store.open()
    store.set_worker_id(await store.lease_worker_id("test", 0, 10**12))
    await with_users(store, "a", "b")
    for i in range(300):  # separate commits, each a few WAL pages
        await store.append_message(new_msg("a", "b", f"m{i}" + "x" * 500))
        if i % 50 == 0:
            await asyncio.sleep(0.03)
    await asyncio.sleep(0.1)
    assert store.wal_restarts > 0
    assert os.path.getsize(path + "-wal") < 2 << 20  # 300 commits x >4 KB, without restarts
    rounds = store.checkpoints
    await asyncio.sleep(0.3)  # about 30 intervals with nothing committed
    assert store.checkpoints == rounds
    await store.append_message(new_msg("a", "b", "one more"))
    await asyncio.sleep(0.1)
    assert store.checkpoints == rounds + 1
    await store.close()
