"""The Bus contract suite against a real Redis server, and what only Redis has: outages
and reconnects, a node started against no Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests.bus_contract import BusContract, Got, event, settle
from tidings.bench.services import Redis, free_port, redis_server
from tidings.bus.base import Bus, BusUnavailable, RoomEvent
from tidings.bus.redis import RedisBus
from tidings.clock import SystemClock


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
