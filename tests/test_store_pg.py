"""The Store contract suite against PostgreSQL (a real server the tests start), plus what
only several writers on several connections can show."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.store_contract import Opener, StoreContract, new_msg, with_users
from tidings.clock import SystemClock
from tidings.store.postgres import PostgresStore


@pytest.fixture
def open_store(pg_dsn: str) -> Opener:
    n = 0

    async def opener() -> PostgresStore:
        nonlocal n
        n += 1
        store = PostgresStore(pg_dsn, SystemClock(), pool_size=4)
        await store.open()
        store.set_worker_id(await store.lease_worker_id(f"test-{n}", 0, 10**12))
        return store

    return opener


class TestPostgresStore(StoreContract):
    pass


async def test_eight_writers_gapless_in_commit_order(pg_dsn: str) -> None:
    """Eight stores (as eight processes or nodes, each with its own pool and worker id)
    append to one conversation at once: seqs are 1..N with no gap and no repeat, they
    increase in commit order (PostgreSQL's own commit timestamps), message ids increase
    with seq, and each writer's messages keep the order it submitted them in."""
    stores = []
    for i in range(8):
        store = PostgresStore(pg_dsn, SystemClock(), pool_size=3)
        await store.open()
        store.set_worker_id(await store.lease_worker_id(f"node-{i}", 0, 10**12))
        stores.append(store)
    await with_users(stores[0], "a", "b")

    async def writer(i: int) -> list[int]:
        seqs = []
        for burst in range(4):  # bursts of ten submitted at once, then awaited
            futs = [
                stores[i].append_message(new_msg("a", "b", f"w{i}-{burst}-{k}")) for k in range(10)
            ]
            seqs += [r.record.seq for r in await asyncio.gather(*futs)]
        return seqs

    per_writer = await asyncio.gather(*(writer(i) for i in range(8)))
    for seqs in per_writer:
        assert seqs == sorted(seqs)
    assert sorted(s for seqs in per_writer for s in seqs) == list(range(1, 321))
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT seq, mid, cid, pg_xact_commit_timestamp(xmin) AS committed "
            "FROM messages WHERE conv = 'd:a|b' ORDER BY seq"
        )
    finally:
        await conn.close()
    assert [r["seq"] for r in rows] == list(range(1, 321))
    committed = [r["committed"] for r in rows]
    assert all(c is not None for c in committed)
    assert committed == sorted(committed)
    mids = [r["mid"] for r in rows]
    assert mids == sorted(mids) and len(set(mids)) == 320
    assert len({m & 0x3FF000 for m in mids}) == 8  # eight worker ids wrote them
    for store in stores:
        await store.close()


async def test_database_down_is_retryable_and_recovers() -> None:
    """With PostgreSQL stopped, a send fails promptly with `unavailable` (retryable),
    never a false success; once it is back the same store writes again by itself, and
    the retry of the failed send is stored once."""
    from tidings.bench.services import postgres_server
    from tidings.protocol.errors import TidingsError

    with postgres_server() as pg:
        store = PostgresStore(pg.dsn(), SystemClock(), pool_size=2, acquire_timeout_s=2)
        await store.open()
        store.set_worker_id(await store.lease_worker_id("n", 0, 10**12))
        await with_users(store, "a", "b")
        assert (await store.append_message(new_msg("a", "b", "1"))).record.seq == 1
        pg.stop()
        with pytest.raises(TidingsError) as err:
            await asyncio.wait_for(store.append_message(new_msg("a", "b", "2")), 15)
        assert err.value.code == "unavailable" and err.value.retry_after_ms
        with pytest.raises(TidingsError) as err:
            await asyncio.wait_for(store.history("d:a|b", 0, 10), 15)
        assert err.value.code == "unavailable"
        pg.start()
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                res = await store.append_message(new_msg("a", "b", "2"))
                break
            except TidingsError as exc:
                assert exc.code == "unavailable"
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.2)
        assert res.record.seq == 2 and not res.dup
        assert [m.seq for m in await store.history("d:a|b", 0, 10)] == [1, 2]
        await store.close()
