"""The Store contract suite against PostgreSQL (a real server the tests start), plus what
only several writers on several connections can show."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
import pytest

from tests.store_contract import Opener, StoreContract, new_msg, with_users
from tidings.clock import SystemClock
from tidings.protocol.errors import TidingsError
from tidings.store.base import AppendResult, GroupChange, MessageRecord, NewMessage
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


def _group_msg(sender: str, group: str, cid: str, text: str = "hi", **kw: Any) -> NewMessage:
    body = {"text": text}
    return NewMessage(
        conv=group,
        sender=sender,
        dev="d1",
        cid=cid,
        type="text",
        body=body,
        body_bytes=msgspec.msgpack.encode(body),
        members=(),
        **kw,
    )


class _ClockAhead:
    """A wall clock a minute ahead of the real one (another process's clock)."""

    def __init__(self) -> None:
        self._clock = SystemClock()

    def now_ms(self) -> int:
        return self._clock.now_ms() + 60_000

    def monotonic(self) -> float:
        return self._clock.monotonic()


def _ok(res: object) -> AppendResult:
    assert isinstance(res, AppendResult), res
    return res


async def _opened(dsn: str, name: str, clock: Any = None, **kw: Any) -> PostgresStore:
    store = PostgresStore(dsn, clock or SystemClock(), pool_size=4, **kw)
    await store.open()
    store.set_worker_id(await store.lease_worker_id(name, 0, 10**12))
    return store


async def _gapless(dsn: str) -> dict[str, list[int]]:
    """Every conversation's seqs (ascending), after checking ids rise with seqs."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT conv, seq, mid FROM messages ORDER BY conv, seq")
        convs = await conn.fetch("SELECT id, last_seq, last_mid FROM conversations")
    finally:
        await conn.close()
    seqs: dict[str, list[int]] = {}
    mids: dict[str, list[int]] = {}
    for r in rows:
        seqs.setdefault(r["conv"], []).append(r["seq"])
        mids.setdefault(r["conv"], []).append(r["mid"])
    for conv, got in seqs.items():
        assert got == list(range(1, len(got) + 1)), conv
        assert mids[conv] == sorted(set(mids[conv])), conv
    for c in convs:
        assert c["last_seq"] == len(seqs.get(c["id"], [])), c["id"]
        assert c["last_mid"] == max(mids.get(c["id"], [0])), c["id"]
    return seqs


async def test_one_batch_of_many_conversations_answers_each_its_own(pg_dsn: str) -> None:
    """A batch mixing good appends, duplicates (stored before, and twice in the batch),
    a reused cid with other content, a block, refused group posts (muted, mute-all, not a
    member), a conversation's first messages and a conversation another process wrote
    with a clock a minute ahead, over several conversations, submitted at once by two
    stores: each message gets its own answer, and every conversation's seqs stay gapless
    with ids rising with them."""
    s1 = await _opened(pg_dsn, "one")
    s2 = await _opened(pg_dsn, "two", _ClockAhead())
    await with_users(s1, "a", "b", "c", "d", "e")
    old = await s1.append_message(new_msg("a", "b", "old"))
    await s1.append_message(new_msg("a", "c", "ac0"))
    await s1.append_message(new_msg("c", "e", "ce0"))
    await s1.set_block("a", "c", True, 1)
    await s1.apply_group(GroupChange("g:x", "create", "a", "d1", "gx", users=("b", "c")))
    await s1.apply_group(
        GroupChange("g:x", "mute", "a", "d1", "gx-mute", users=("c",), until_ms=2**50)
    )
    await s1.apply_group(GroupChange("g:y", "create", "a", "d1", "gy", users=("d",)))
    await s1.apply_group(GroupChange("g:y", "mute_all", "a", "d1", "gy-all", fields={"on": True}))
    ahead = await s2.append_message(new_msg("c", "e", "ahead"))  # a later id than s1's
    b0 = s1.batched
    subs = [
        ("ok", s1.append_message(new_msg("a", "b", "ab1"))),
        ("dup-old", s1.append_message(new_msg("a", "b", "old"))),
        ("conflict", s1.append_message(new_msg("a", "b", "old", text="other"))),
        ("blocked", s1.append_message(new_msg("c", "a", "ca1", blocker="a"))),
        ("ok", s1.append_message(new_msg("a", "c", "ac1", blocker="c"))),
        ("first", s1.append_message(new_msg("a", "d", "ad1"))),
        ("muted", s1.append_message(_group_msg("c", "g:x", "gx-c"))),
        ("forbidden", s1.append_message(_group_msg("e", "g:x", "gx-e"))),
        ("ok", s1.append_message(_group_msg("b", "g:x", "gx-b"))),
        ("muted", s1.append_message(_group_msg("d", "g:y", "gy-d"))),
        ("ok", s1.append_message(_group_msg("d", "g:y", "gy-d2", privileged=True))),
        ("ok", s1.append_message(_group_msg("a", "g:y", "gy-a"))),  # the owner may
        ("ahead", s1.append_message(new_msg("c", "e", "ce1"))),
        ("ahead", s1.append_message(new_msg("e", "c", "ce2"))),
        ("first", s1.append_message(new_msg("d", "a", "ad2"))),
        ("dup-ab1", s1.append_message(new_msg("a", "b", "ab1"))),
        ("ok", s1.append_message(new_msg("b", "a", "ab2"))),
    ]
    others = [s2.append_message(new_msg("b", "a", f"s2-{i}")) for i in range(5)]
    others += [s2.append_message(_group_msg("c", "g:x", "s2-gx"))]  # muted there too
    results = await asyncio.gather(*(f for _, f in subs), return_exceptions=True)
    other_results = await asyncio.gather(*others, return_exceptions=True)
    assert s1.batched - b0 >= 6  # the plain ones went through tidings_append_batch
    by_cid: dict[str, MessageRecord] = {"ahead": ahead.record}
    for (want, _), res in zip(subs, results, strict=True):
        if want in ("conflict", "blocked", "muted", "forbidden"):
            assert isinstance(res, TidingsError) and res.code == want, (want, res)
            continue
        assert isinstance(res, AppendResult), (want, res)
        assert res.dup == want.startswith("dup"), (want, res)
        if not res.dup:
            by_cid[res.record.cid] = res.record
    assert _ok(results[1]).record == old.record
    assert _ok(results[15]).record == by_cid["ab1"]
    assert [by_cid[c].seq for c in ("ad1", "ad2")] == [1, 2]
    assert [by_cid[c].seq for c in ("ce1", "ce2")] == [3, 4]  # after s2's, in order
    assert by_cid["ahead"].mid < by_cid["ce1"].mid < by_cid["ce2"].mid
    assert by_cid["ab1"].seq < by_cid["ab2"].seq
    assert by_cid["ab2"].n == by_cid["ab2"].seq  # every entry of d:a|b counted
    s2_seqs = [_ok(r).record.seq for r in other_results[:5]]
    assert s2_seqs == sorted(s2_seqs)
    assert isinstance(other_results[5], TidingsError) and other_results[5].code == "muted"
    seqs = await _gapless(pg_dsn)
    assert len(seqs["d:a|b"]) == 1 + 2 + 5
    # The sender's read position moved with its own messages, nobody else's.
    (ab,) = await s1.conversation_states("b", ["d:a|b"])
    assert ab.read_seq == max(by_cid["ab2"].seq, *s2_seqs)
    (ad,) = await s1.conversation_states("a", ["d:a|d"])
    assert (ad.read_seq, ad.unread) == (1, 1)
    await s1.close()
    await s2.close()


async def test_batches_of_two_processes_lock_in_one_order(pg_dsn: str) -> None:
    """Two stores append to the same ten conversations at once, each submitting them in
    the opposite order, in batches of several conversations each: no deadlock (both lock
    conversations in ascending id), seqs gapless, each store's order kept per
    conversation."""
    stores = [await _opened(pg_dsn, f"n{i}", max_batch=7) for i in range(2)]
    peers = [f"p{i}" for i in range(10)]
    await with_users(stores[0], "a", *peers)
    for p in peers:
        await stores[0].append_message(new_msg("a", p, f"first-{p}"))

    async def run(i: int) -> dict[str, list[int]]:
        order = peers if i == 0 else peers[::-1]
        futs = [
            (p, stores[i].append_message(new_msg(p, "a", f"{i}-{k}-{p}")))
            for k in range(30)
            for p in order
        ]
        seen: dict[str, list[int]] = {}
        for p, fut in futs:
            seen.setdefault(p, []).append((await fut).record.seq)
        return seen

    per_store = await asyncio.gather(run(0), run(1))
    for seen in per_store:
        for got in seen.values():
            assert got == sorted(got)
    seqs = await _gapless(pg_dsn)
    assert all(len(seqs[f"d:a|{p}"]) == 1 + 2 * 30 for p in peers)
    assert stores[0].retries == stores[1].retries == 0
    for store in stores:
        await store.close()


async def test_batch_locks_conversations_in_ascending_id(pg_dsn: str) -> None:
    """A batch takes its conversations' row locks in ascending id whatever the order of
    its messages: held up at one conversation, it holds the lower ones and not yet the
    higher ones (so two batches never wait for each other in a circle)."""
    store = await _opened(pg_dsn, "n")
    peers = ["p0", "p5", "p9"]
    await with_users(store, "a", *peers)
    for p in peers:
        await store.append_message(new_msg("a", p, f"first-{p}"))
    holder = await asyncpg.connect(pg_dsn)
    probe = await asyncpg.connect(pg_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM conversations WHERE id = 'd:a|p5' FOR UPDATE")
        futs = [store.append_message(new_msg(p, "a", f"x-{p}")) for p in ("p9", "p5", "p0")]
        for _ in range(200):  # until the batch waits for the held row
            await asyncio.sleep(0.01)
            waiting = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%tidings_append_batch%'"
            )
            if waiting:
                break
        assert waiting
        async with probe.transaction():
            free = await probe.fetch(
                "SELECT id FROM conversations WHERE id LIKE 'd:a|p%' ORDER BY id "
                "FOR UPDATE SKIP LOCKED"
            )
        assert [r["id"] for r in free] == ["d:a|p9"]  # p0 taken, p5 awaited, p9 not yet
        await tx.rollback()
        assert [_ok(r).record.seq for r in await asyncio.gather(*futs)] == [2, 2, 2]
    finally:
        await holder.close()
        await probe.close()
    await store.close()


async def test_batch_statement_failure_retries_each_alone(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the batch statement itself fails, its messages go again one by one (each in a
    savepoint): all are stored once, nothing is lost or doubled."""
    import tidings.store.postgres_append as pg

    store = await _opened(pg_dsn, "n")
    await with_users(store, "a", "b", "c")
    await store.append_message(new_msg("a", "b", "b0"))
    await store.append_message(new_msg("a", "c", "c0"))
    failing = pg._APPEND_BATCH.replace("tidings_append_batch", "no_such_function")
    monkeypatch.setattr(pg, "_APPEND_BATCH", failing)
    futs = [store.append_message(new_msg("a", "bc"[i % 2], f"m{i}")) for i in range(10)]
    futs.append(store.append_message(new_msg("a", "b", "m0", text="other")))
    res = await asyncio.gather(*futs, return_exceptions=True)
    assert all(isinstance(r, AppendResult) and not r.dup for r in res[:10])
    assert isinstance(res[10], TidingsError) and res[10].code == "conflict"
    assert store.batched == 0
    seqs = await _gapless(pg_dsn)
    assert len(seqs["d:a|b"]) == len(seqs["d:a|c"]) == 6
    await store.close()


async def test_delivered_and_appends_share_a_lock_order(pg_dsn: str) -> None:
    """Delivered positions written while both members of many conversations send: member
    rows are taken in one order by both writes, so neither deadlocks."""
    stores = [await _opened(pg_dsn, f"n{i}") for i in range(2)]
    peers = [f"p{i}" for i in range(8)]
    await with_users(stores[0], "a", *peers)
    for p in peers:
        await stores[0].append_message(new_msg("a", p, f"first-{p}"))

    async def sends(i: int) -> None:
        for burst in range(10):
            await asyncio.gather(
                *(stores[i].append_message(new_msg(p, "a", f"{i}-{burst}-{p}")) for p in peers),
                *(stores[i].append_message(new_msg("a", p, f"{i}-{burst}-a-{p}")) for p in peers),
            )

    async def acks() -> None:
        for n in range(2, 30):
            positions = [(f"d:a|{p}", u, n) for p in peers[::-1] for u in ("a", p)]
            await stores[1].write_delivered(positions)

    await asyncio.gather(sends(0), sends(1), acks())
    await _gapless(pg_dsn)
    # Deadlocks are retried, so what is stored is right either way (checked above). A
    # rare one was seen here (1 retry in about 7 runs, cause not found yet): allow it,
    # but a lock-order mistake deadlocks on most runs and fails this.
    assert stores[0].retries + stores[1].retries <= 1
    for store in stores:
        await store.close()


async def test_a_stuck_batch_does_not_hold_up_other_conversations(pg_dsn: str) -> None:
    """One writer while batches commit promptly; when one waits (here for a row lock held
    elsewhere), another writer takes the other conversations' messages."""
    store = await _opened(pg_dsn, "n")
    await with_users(store, "a", "b", "c")
    await store.append_message(new_msg("a", "b", "b0"))
    await store.append_message(new_msg("a", "c", "c0"))
    holder = await asyncpg.connect(pg_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM conversations WHERE id = 'd:a|b' FOR UPDATE")
        stuck = store.append_message(new_msg("a", "b", "b1"))
        await asyncio.sleep(0.05)
        other = await asyncio.wait_for(store.append_message(new_msg("a", "c", "c1")), 2)
        assert other.record.seq == 2 and not stuck.done()
        await tx.rollback()
        assert (await stuck).record.seq == 2
    finally:
        await holder.close()
    await store.close()
