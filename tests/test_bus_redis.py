"""The Bus contract suite against a real Redis server, and what only Redis has: outages
and reconnects, a node started against no Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis as syncredis
import redis.asyncio as aioredis

from tests.bus_contract import BusContract, Got, event, settle
from tests.conftest import Harness, next_message
from tidings.bench.services import Redis, free_port, redis_server
from tidings.bus.base import Bus, BusUnavailable, RoomEvent
from tidings.bus.redis import RedisBus
from tidings.client import Client, Disconnected, PresenceChanged
from tidings.clock import SystemClock
from tidings.protocol import close


class RedisNodes:
    ttl_ms = 1_000

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"t{uuid.uuid4().hex[:8]}"  # tests share one server
        self.started: list[RedisBus] = []

    async def node(self) -> Bus:
        n = len(self.started) + 1
        bus = RedisBus(self.url, f"n{n}", SystemClock(), self.ttl_ms, prefix=self.prefix)
        await bus.start()
        self.started.append(bus)
        return bus

    async def kill(self, bus: Bus) -> None:
        assert isinstance(bus, RedisBus)
        await bus.halt()


@pytest.fixture
async def nodes(redis_srv: Redis) -> AsyncIterator[RedisNodes]:
    n = RedisNodes(redis_srv.url)
    yield n
    for bus in n.started:
        await bus.close()


class TestRedisBus(BusContract):
    pass


# ---------------------------------------------------------------------- Redis faults


def bus(url: str, node: str, prefix: str = "x", ttl_ms: int = 1_000) -> RedisBus:
    return RedisBus(url, node, SystemClock(), ttl_ms, prefix=prefix)


def reasons(got: Got) -> list[str]:
    return [h.reason for h in got.hints()]


async def until_online(node: RedisBus, uid: str) -> None:
    for _ in range(250):
        if await node.online([uid]):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{uid} never came back online")


async def test_redis_restart_reconnects_registers_again_and_hints() -> None:
    """Redis killed and started again (empty): publish() neither raises nor blocks while
    it is away (the events are dropped and counted); each node reconnects by itself,
    registers its users and rooms again, and its handler gets a resync hint; then
    delivery works as before."""
    with redis_server() as srv:
        a, b = bus(srv.url, "a"), bus(srv.url, "b")
        await a.start()
        await b.start()
        got_a, got_b = Got(a), Got(b)
        b.user_online("u")
        b.watch_room("r:x")
        await b.flush()
        a.publish(event(1, ("u",)))
        await settle(lambda: got_b.seqs() == [1])

        srv.stop()
        await settle(lambda: not a.connected and not b.connected)
        t0 = time.perf_counter()
        for i in range(2, 1002):
            a.publish(event(i, ("u",)))
        assert time.perf_counter() - t0 < 0.5
        assert a.dropped >= 1000
        assert await a.online(["u"]) == set()  # its own view only: no wait for Redis

        srv.start()
        await settle(lambda: a.connected and b.connected, 20)
        await settle(lambda: "reconnected" in reasons(got_a) and "reconnected" in reasons(got_b))
        await until_online(a, "u")
        a.publish(event(2000, ("u",)))
        a.publish(RoomEvent("r:x", "p", "chat", {}, 1))
        await settle(lambda: 2000 in got_b.seqs() and got_b.rooms() == ["p"])
        assert got_b.seqs() == [1, 2000]
        assert a.reconnects == 1 and b.reconnects == 1
        await a.close()
        await b.close()


async def test_a_node_cut_off_tells_the_others_what_it_dropped(redis_srv: Redis) -> None:
    """When one node's connection is cut (Redis stays up), the events it drops meanwhile
    make every other node hint its sessions once it is back."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a, b = bus(redis_srv.url, "a", prefix), bus(redis_srv.url, "b", prefix)
    await a.start()
    await b.start()
    got_b = Got(b)
    b.user_online("u")
    await b.flush()
    admin = aioredis.Redis.from_url(redis_srv.url)
    for c in await admin.client_list():
        if c.get("name") == f"tidings-bus:{a.node_id}":
            await admin.client_kill_filter(_id=c["id"])
    for i in range(1, 50):
        a.publish(event(i, ("u",)))
        await asyncio.sleep(0.002)
    await settle(lambda: a.reconnects == 1, 10)
    await settle(lambda: ("peer_dropped", "a") in [(h.reason, h.node) for h in got_b.hints()])
    assert a.dropped > 0
    await admin.aclose()
    await a.close()
    await b.close()


async def test_start_without_redis_is_a_clear_error() -> None:
    """A node whose Redis cannot be reached refuses to start, saying where it looked
    (without the password); a malformed URL is refused when the bus is made."""
    url = f"redis://:sekret@127.0.0.1:{free_port()}/0"
    node = RedisBus(url, "a", SystemClock())
    with pytest.raises(BusUnavailable) as err:
        await node.start()
    assert "unreachable" in str(err.value) and "sekret" not in str(err.value)
    with pytest.raises(ValueError):
        RedisBus("http://127.0.0.1:6379/0", "a", SystemClock())


async def test_garbage_on_a_channel_is_skipped(redis_srv: Redis) -> None:
    """A message that is not a bus envelope is logged and skipped; later events still
    arrive."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a = bus(redis_srv.url, "a", prefix)
    await a.start()
    got = Got(a)
    a.user_online("u")
    await a.flush()
    admin = aioredis.Redis.from_url(redis_srv.url)
    await admin.publish(f"{prefix}:0:n:a", b"\xc1 not msgpack")
    await admin.publish(f"{prefix}:0:all", b"")
    b = bus(redis_srv.url, "b", prefix)
    await b.start()
    b.publish(event(1, ("u",)))
    await settle(lambda: got.seqs() == [1])
    assert a.connected and a.reconnects == 0
    await admin.aclose()
    await a.close()
    await b.close()


async def test_close_while_redis_is_away_returns(redis_srv: Redis) -> None:
    """Closing a node whose Redis is gone ends promptly, without raising."""
    with redis_server() as srv:
        a = bus(srv.url, "a")
        await a.start()
        a.user_online("u")
        srv.stop()
        await settle(lambda: not a.connected)
        t0 = time.perf_counter()
        await a.close()
        assert time.perf_counter() - t0 < 3


async def test_scripts_flushed_behind_the_bus_are_loaded_again(redis_srv: Redis) -> None:
    """SCRIPT FLUSH (an operator, a failover): the operations that fail are dropped and
    counted, the bus loads its scripts again, puts its routes right and tells the
    others to resync; delivery resumes."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    a, b = bus(redis_srv.url, "a", prefix), bus(redis_srv.url, "b", prefix)
    await a.start()
    await b.start()
    got_b = Got(b)
    b.user_online("u")
    await b.flush()
    admin = aioredis.Redis.from_url(redis_srv.url)
    await admin.script_flush()
    b.user_online("v")  # both fail: the scripts are gone
    a.publish(event(1, ("u",)))
    await settle(lambda: a.dropped == 1)
    await settle(lambda: ("peer_dropped", "a") in [(h.reason, h.node) for h in got_b.hints()])
    await until_online(a, "v")  # registered again once the scripts were back
    a.publish(event(2, ("v",)))
    await settle(lambda: got_b.seqs() == [2])
    assert a.connected and b.connected and a.reconnects == 0
    await admin.aclose()
    await a.close()
    await b.close()


# ---------------------------------------------------------------------- servers in a cluster

_DB = itertools.count(1)


@pytest.fixture
def cluster(make_server: Any, pg_dsn: str, redis_srv: Redis) -> Any:
    """Makes servers (in this process) sharing one PostgreSQL database and one Redis
    (a database of its own for each test)."""
    url = redis_srv.url.rsplit("/", 1)[0] + f"/{next(_DB) % 16}"
    with syncredis.Redis.from_url(url) as r:
        r.flushdb()

    async def make(n: int = 2, **overrides: Any) -> list[Harness]:
        settings = {
            "database_url": pg_dsn,
            "redis_url": url,
            "node_ttl_ms": 1_000,
            "signing_key": "a-signing-key-all-the-nodes-of-the-cluster-share",
            "presence_batch_ms": 100,
            **overrides,
        }
        nodes = [await make_server(**settings) for _ in range(n)]
        for h in nodes:
            h.server.hub.resync_jitter_s = 0.05
        return nodes

    return make


async def next_of(client: Client, kind: type, timeout: float = 5.0) -> Any:
    async def get() -> Any:
        async for ev in client.events():
            if isinstance(ev, kind):
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(get(), timeout)


async def quiet(client: Client, kind: type, for_s: float = 0.4) -> list[Any]:
    """The events of ``kind`` until none came for ``for_s``."""
    got = []
    while True:
        try:
            got.append(await next_of(client, kind, for_s))
        except TimeoutError:
            return got


async def test_messages_cross_nodes_to_every_device(cluster: Any) -> None:
    """A message sent on node A reaches the recipient's devices on A and on B, and the
    sender's other device on B, each once."""
    a, b = await cluster()
    assert isinstance(a.server.bus, RedisBus) and isinstance(b.server.bus, RedisBus)
    alice = await a.client("alice")
    alice2 = await b.client("alice", "d2")
    bob_a = await a.client("bob", "b1")
    bob_b = await b.client("bob", "b2")
    pushes = a.server.hub.pushes + b.server.hub.pushes
    sent = await alice.send(to="bob", text="hello across")
    for c in (bob_a, bob_b, alice2):
        ev = await next_message(c)
        assert ev.message.mid == sent.mid
    await asyncio.sleep(0.1)
    assert a.server.hub.pushes + b.server.hub.pushes - pushes == 3  # no second copy
    reply = await bob_b.send(to="alice", text="back")
    ev = await next_message(alice)
    while ev.echo:
        ev = await next_message(alice)
    assert ev.message.mid == reply.mid


async def test_presence_is_cluster_wide_between_servers(cluster: Any) -> None:
    """A contact on another node is pushed online/offline; leaving one of two nodes is
    not offline; a query on any node sees devices on every node."""
    a, b = await cluster()
    alice = await a.client("alice")
    bob = await b.client("bob")
    await bob.send(to="alice", text="hi")  # contacts now
    await quiet(alice, PresenceChanged)  # bob's first coming online may still arrive
    bob2 = await a.client("bob", "b2")
    await bob.close()
    with pytest.raises(TimeoutError):
        await next_of(alice, PresenceChanged, 0.6)  # still on node A
    assert [(p.user, p.online) for p in await alice.presence(["bob"])] == [("bob", True)]
    await bob2.close()
    ev = await next_of(alice, PresenceChanged)
    assert [(p.user, p.online) for p in ev.users] == [("bob", False)]
    await b.client("bob", "b3")
    ev = await next_of(alice, PresenceChanged)
    assert [(p.user, p.online) for p in ev.users] == [("bob", True)]
    assert [(p.user, p.online) for p in await alice.presence(["bob"])] == [("bob", True)]


async def test_login_policy_kicks_across_nodes(cluster: Any) -> None:
    """Under one_total, a new session on node B kicks the user's session on node A."""
    a, b = await cluster(login_policy="one_total")
    first = await a.client("carol", "c1")
    await b.client("carol", "c2")
    ev = await next_of(first, Disconnected)
    assert ev.final and ev.code == close.KICKED


async def test_a_dead_nodes_lost_publish_is_found_by_resync(cluster: Any) -> None:
    """Node B commits a message and dies before publishing it: within the node TTL the
    recipient on node A gets a resync hint, syncs, and has it (nothing waits for the
    next message or pong)."""
    a, b = await cluster()
    alice = await a.client("alice", heartbeat_s=60, dead_after_s=120)
    bob = await b.client("bob", heartbeat_s=60, dead_after_s=120)
    await bob.send(to="alice", text="first")
    await next_message(alice)
    bus_b = b.server.bus
    assert isinstance(bus_b, RedisBus)
    await bus_b.halt()  # B is gone as far as the cluster is concerned
    lost = await bob.send(to="alice", text="committed, never published")
    ev = await next_message(alice, timeout=5)
    assert ev.message.mid == lost.mid
    assert a.server.hub.resyncs >= 1
