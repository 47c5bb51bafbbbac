"""Several Tidings nodes over one PostgreSQL and one Redis (real servers the tests start):
delivery, receipts, presence, groups and rooms across nodes, devices moving between
nodes, `--workers` sharing a port, and the faults — a node killed between a commit and
its bus publish, Redis restarted, PostgreSQL down. Each fault test ends by checking that
every device holds exactly the acknowledged messages, in order."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import Harness, next_message
from tests.procserver import ServerProcess, free_port, wait_until
from tests.rawclient import Raw
from tidings.bench.services import Postgres, Redis, postgres_server, redis_server
from tidings.client import Client, MessageEvent, PresenceChanged, ReadReceipt, RoomEvent

KEYS = {"signing_key": secrets.token_hex(24), "admin_key": secrets.token_hex(16)}
FAST = {"node_ttl_ms": 1_500, "presence_batch_ms": 200}  # quick death detection
_db_numbers = itertools.cycle(range(1, 16))


@pytest.fixture
async def redis_url(redis_srv: Redis) -> str:
    """A Redis database of its own on the run's server (the bus's keys and channels carry
    the database number)."""
    url = f"redis://127.0.0.1:{redis_srv.port}/{next(_db_numbers)}"
    client = aioredis.from_url(url)
    await client.flushdb()
    await client.aclose()
    return url


@pytest.fixture
async def cluster(
    make_server: Callable[..., Any], pg_server: Postgres, redis_url: str
) -> AsyncIterator[Callable[..., Any]]:
    """``await node()`` starts another in-process node of one cluster."""
    dsn = pg_server.new_database()

    async def node(**overrides: Any) -> Harness:
        settings = {"database_url": dsn, "redis_url": redis_url, **KEYS, **FAST, **overrides}
        h: Harness = await make_server(**settings)
        return h

    yield node


def text(ev: MessageEvent) -> str:
    return str(ev.message.body.get("text"))


async def incoming(client: Client, timeout: float = 10.0) -> MessageEvent:
    """The next message from someone else (a device's own sends come back as echoes)."""
    while True:
        ev: MessageEvent = await next_message(client, timeout)
        if not ev.echo:
            return ev


async def messages_of(client: Client, n: int, timeout: float = 10.0) -> list[MessageEvent]:
    return [await incoming(client, timeout) for _ in range(n)]


async def test_two_nodes_deliver_read_and_presence(cluster: Callable[..., Any]) -> None:
    """Alice on node A, Bob on node B: messages both ways in order, Bob's read receipt and
    presence cross over, and each node's health says it runs on PostgreSQL + Redis."""
    a, b = await cluster(), await cluster()
    alice = await a.client("alice")
    bob = await b.client("bob")
    sent = [await alice.send(to="bob", text=f"a{i}") for i in range(10)]
    got = await messages_of(bob, 10)
    assert [text(m) for m in got] == [f"a{i}" for i in range(10)]
    assert [m.message.seq for m in got] == [s.seq for s in sent] == list(range(1, 11))
    await bob.mark_read("d:alice|bob", 10)

    async def receipt() -> ReadReceipt:
        async for ev in alice.events():
            if isinstance(ev, ReadReceipt) and ev.by == "bob":
                return ev
        raise AssertionError("no receipt")

    assert (await asyncio.wait_for(receipt(), 10)).seq == 10
    await bob.send(to="alice", text="hi back")
    assert text(await incoming(alice)) == "hi back"
    [item] = await bob.presence(["alice"])
    assert item.online
    await alice.close()

    async def offline() -> None:
        async for ev in bob.events():
            if isinstance(ev, PresenceChanged) and any(
                u.user == "alice" and not u.online for u in ev.users
            ):
                return

    await asyncio.wait_for(offline(), 10)
    for h in (a, b):
        health = await asyncio.to_thread(_get, f"{h.http_url}/healthz")
        assert '"store":"postgres"' in health and '"bus":"redis"' in health
        assert '"bus_connected":true' in health


async def test_device_on_another_node_syncs_and_both_get_pushes(
    cluster: Callable[..., Any],
) -> None:
    """Messages sent while Bob is offline are stored once; Bob's phone connecting to node
    B syncs them, and then a second device of his on node A and the phone both get the
    next messages live."""
    a, b = await cluster(), await cluster()
    alice = await a.client("alice")
    await b.user("bob")
    for i in range(5):
        await alice.send(to="bob", text=f"early{i}")
    phone = await b.client("bob", "phone")
    assert [text(m) for m in await messages_of(phone, 5)] == [f"early{i}" for i in range(5)]
    desk = await a.client("bob", "desk", connect=False)
    desk.sync_limit = 2  # page through the five
    await desk.connect()
    assert [m.message.seq for m in await messages_of(desk, 5)] == [1, 2, 3, 4, 5]
    await alice.send(to="bob", text="live")
    assert text(await incoming(phone)) == "live"
    assert text(await incoming(desk)) == "live"


async def test_a_message_in_the_window_before_the_route_lands_is_not_missed(
    cluster: Callable[..., Any],
) -> None:
    """Bob's route to node B lands in Redis a moment after his `ready`. A message Alice
    sends on node A in that moment (after Bob's first sync) is not pushed to B; once the
    route is in, B sees a newer watermark than the one `ready` carried and tells Bob's
    device to sync. (Bob pings once a minute: only that hint can bring it in time.)"""
    a, b = await cluster(), await cluster()
    alice = await a.client("alice")
    await b.user("bob")
    bus, hub = b.server.bus, b.server.hub
    real_online, real_routed = bus.user_online, hub.routed
    deferred: list[str] = []
    bus.user_online = deferred.append  # type: ignore[method-assign]

    async def route_lands_late() -> bool:
        await asyncio.sleep(0.5)  # Bob's device has synced by now
        await alice.send(to="bob", text="in the window")  # committed, pushed nowhere
        for uid in deferred:
            real_online(uid)
        return await real_routed()

    hub.routed = route_lands_late  # type: ignore[method-assign]
    bob = await b.client("bob", heartbeat_s=60, dead_after_s=120)
    assert text(await incoming(bob, 10)) == "in the window"
    await alice.send(to="bob", text="after")
    assert text(await incoming(bob, 10)) == "after"


async def test_group_and_room_across_nodes(cluster: Callable[..., Any]) -> None:
    """A group's members on three nodes all get its messages in order; a live room's
    viewers on two nodes both get a post made on a third."""
    a, b, c = await cluster(), await cluster(), await cluster()
    owner = await a.client("owner")
    m1 = await b.client("m1")
    m2 = await c.client("m2")
    conv = (await owner.create_group(["m1", "m2"], name="three nodes")).conv
    for i in range(5):
        await owner.send(conv=conv, text=f"g{i}")
    for member in (m1, m2):
        texts = [text(m) for m in await messages_of(member, 6) if m.message.type == "text"]
        assert texts == [f"g{i}" for i in range(5)]
    await m1.join_room("r:live")
    await m2.join_room("r:live")
    await asyncio.sleep(0.3)  # both nodes subscribed to the room's channel

    async def post_seen(client: Client) -> None:
        async for ev in client.events():
            if isinstance(ev, RoomEvent) and any(p.body.get("text") == "hey" for p in ev.msgs):
                return

    waiters = [asyncio.ensure_future(post_seen(x)) for x in (m1, m2)]
    await owner.join_room("r:live")
    await owner.room_send("r:live", "chat", {"text": "hey"})
    await asyncio.wait_for(asyncio.gather(*waiters), 10)


async def test_redis_restart_resyncs_devices(
    make_server: Callable[..., Any], pg_server: Postgres
) -> None:
    """Redis stops while Alice (node A) writes to Bob (node B): her messages are stored
    and acknowledged; when Redis is back the nodes reconnect by themselves, Bob's device
    gets a resync hint and syncs them, and later messages flow live again. Bob ends with
    exactly the acknowledged messages, in order."""
    dsn = pg_server.new_database()
    with redis_server() as redis:
        settings = {"database_url": dsn, "redis_url": redis.url, **KEYS, **FAST}
        a = await make_server(**settings)
        b = await make_server(**settings)
        alice = await a.client("alice")
        bob = await b.client("bob", heartbeat_s=60, dead_after_s=120)  # hints, not pongs
        acked = [await alice.send(to="bob", text="before")]
        assert text(await incoming(bob)) == "before"
        redis.stop()
        for i in range(3):
            acked.append(await alice.send(to="bob", text=f"during{i}"))
        await asyncio.sleep(0.5)
        redis.start()  # the same port, empty
        got = await messages_of(bob, 3, timeout=20)
        assert [text(m) for m in got] == [f"during{i}" for i in range(3)]
        acked.append(await alice.send(to="bob", text="after"))
        got.append(await incoming(bob, 10))
        assert [m.message.seq for m in got] == [s.seq for s in acked[1:]]
        history = await bob.history("d:alice|bob")
        assert [m.seq for m in history.msgs] == [s.seq for s in acked] == [1, 2, 3, 4, 5]


async def test_postgres_down_answers_retryable_and_recovers(
    make_server: Callable[..., Any], redis_url: str
) -> None:
    """With PostgreSQL stopped a send is answered `unavailable` with `retry_after_ms`,
    never `sent`; the SDK keeps it and sends it again; once PostgreSQL is back the node
    recovers by itself and the message is stored once."""
    with postgres_server() as pg:
        h = await make_server(database_url=pg.dsn(), redis_url=redis_url, **KEYS)
        alice = await h.client("alice")
        bob = await h.client("bob")
        await alice.send(to="bob", text="one")
        assert text(await incoming(bob)) == "one"
        raw = await Raw.ws(h.ws_url)
        assert (await raw.login(await h.token("carol")))["t"] == "ready"
        pg.stop()
        await raw.send({"t": "send", "id": 5, "to": "bob", "cid": "c1", "body": {"text": "x"}})
        answer = await raw.until("error", timeout=30)
        assert answer["code"] == "unavailable" and answer["retry_after_ms"] > 0
        pending = asyncio.ensure_future(alice.send(to="bob", text="two"))
        await asyncio.sleep(1.0)
        assert not pending.done()  # no false acknowledgement
        pg.start()
        sent = await asyncio.wait_for(pending, 30)
        assert sent.seq == 2 and not sent.dup
        assert text(await incoming(bob, 10)) == "two"
        history = await bob.history("d:alice|bob")
        assert [m.body["text"] for m in history.msgs] == ["one", "two"]
        await raw.close()


# ------------------------------------------------------------------ real processes


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def _node(
    tmp_path: Any, name: str, dsn: str, redis_url: str, keys: bool = True, **settings: Any
) -> ServerProcess:
    return ServerProcess(
        str(tmp_path / name),
        database_url=dsn,
        redis_url=redis_url,
        heartbeat_ms=1_000,
        retransmit_ms=300,
        **(KEYS if keys else {}),
        **FAST,
        **settings,
    )


def _ws(node: ServerProcess) -> str:
    return f"ws://127.0.0.1:{node.port}/v1/ws"


async def test_sigkill_between_commit_and_publish(
    tmp_path: Any, pg_server: Postgres, redis_url: str
) -> None:
    """Node A is killed (SIGKILL, injected) right after its 5th message commits and before
    it is published. Bob on node B learns of that message without Alice sending another
    (the survivors see A's heartbeat expire and send resync hints); Alice's device moves
    to B, resends the unanswered message with the same client id (answered as a
    duplicate) and carries on. Bob holds exactly messages 1..10, in order, once each."""
    dsn = pg_server.new_database()
    a = _node(tmp_path, "a", dsn, redis_url)
    b = _node(tmp_path, "b", dsn, redis_url)
    a.start(env={"TIDINGS_FAULTS": "after_commit:5"})
    b.start()
    try:
        alice = Client(_ws(a), a.token("alice", "phone"), heartbeat_s=0.5, dead_after_s=2.0)
        # Bob pings rarely: the resync hint, not his pong's watermark, must bring the 5th.
        bob = Client(_ws(b), b.token("bob", "phone"), heartbeat_s=60, dead_after_s=120)
        await alice.connect()
        await bob.connect()
        acked = [await alice.send(to="bob", text=f"m{i}") for i in range(1, 5)]
        fifth = asyncio.ensure_future(alice.send(to="bob", text="m5", cid="fifth"))
        assert a.proc is not None
        await wait_until(lambda: a.proc is not None and a.proc.poll() is not None, 10, "A dies")
        got = await messages_of(bob, 5, timeout=15)  # the 5th arrives by the resync hint
        assert [text(m) for m in got] == [f"m{i}" for i in range(1, 6)]
        assert not fifth.done()  # A died before answering
        alice.url = _ws(b)  # the load balancer now sends her to B
        res = await asyncio.wait_for(fifth, 20)
        assert res.seq == 5 and res.dup
        acked.append(res)
        for i in range(6, 11):
            acked.append(await alice.send(to="bob", text=f"m{i}"))
        got += await messages_of(bob, 5)
        assert [m.message.seq for m in got] == [s.seq for s in acked] == list(range(1, 11))
        assert [m["body"]["text"] for m in b.history("d:alice|bob")] == [
            f"m{i}" for i in range(1, 11)
        ]
        await wait_until(lambda: bob.held.get("d:alice|bob") == 10, 5, "Bob holds 1..10")
        await wait_until(lambda: alice.held.get("d:alice|bob") == 10, 5, "Alice holds 1..10")
        mine = await alice.history("d:alice|bob")
        assert [(m.seq, m.body["text"]) for m in mine.msgs] == [(i, f"m{i}") for i in range(1, 11)]
        await alice.close()
        await bob.close()
    finally:
        a.stop()
        b.stop()


async def test_workers_share_one_port(tmp_path: Any, pg_server: Postgres, redis_url: str) -> None:
    """`tidings serve --workers 2`: both workers accept on the one port, and clients
    connected to different workers talk to each other, in order, exactly once. A worker
    killed with SIGKILL is started again by the supervisor."""
    # No keys given: the workers make them in the data directory, once, and share them
    # (a token issued by one worker is accepted by the other).
    node = _node(tmp_path, "w", pg_server.new_database(), redis_url, keys=False, workers=2)
    node.start()
    try:

        def pids() -> set[int]:
            seen = set()
            for _ in range(40):
                try:
                    seen.add(int(node.health()["pid"]))
                except OSError:  # accepted by a worker just killed: reset
                    continue
            return seen

        await wait_until(lambda: len(pids()) == 2, 20, "both workers answering")
        clients = []
        for i in range(8):
            c = Client(_ws(node), node.token(f"u{i}", "d"), heartbeat_s=0.5, dead_after_s=2.0)
            await c.connect()
            clients.append(c)
        for i in range(0, 8, 2):
            for k in range(5):
                await clients[i].send(to=f"u{i + 1}", text=f"{i}-{k}")
        for i in range(1, 8, 2):
            got = await messages_of(clients[i], 5)
            assert [text(m) for m in got] == [f"{i - 1}-{k}" for k in range(5)]
        victim = next(iter(pids()))
        os.kill(victim, 9)
        await wait_until(lambda: len(pids() - {victim}) == 2, 30, "a new worker")
        for c in clients:
            await c.close()
    finally:
        node.stop()


def test_serve_refuses_clearly(tmp_path: Any) -> None:
    """`--workers 2` on SQLite is refused before anything starts (exit 2), and an
    unreachable PostgreSQL or Redis ends start-up with a one-line reason (exit 1), not a
    traceback."""
    import subprocess
    import sys

    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "tidings",
                "serve",
                "--port",
                "0",
                "--tcp-port",
                "-1",
                "--data-dir",
                str(tmp_path),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    r = serve("--workers", "2")
    assert r.returncode == 2 and "needs database_url" in r.stderr
    assert "Traceback" not in r.stderr
    dead = f"127.0.0.1:{free_port()}"
    r = serve("--set", f"database_url=postgresql://x@{dead}/db")
    assert r.returncode == 1 and "cannot start" in r.stderr and "Traceback" not in r.stderr
    r = serve("--set", f"redis_url=redis://{dead}/0")
    assert r.returncode == 1 and "Redis at" in r.stderr and "Traceback" not in r.stderr
