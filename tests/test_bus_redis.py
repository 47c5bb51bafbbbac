"""The Bus contract suite against a real Redis server, and what only Redis has: outages
and reconnects, a node started against no Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.bus_contract import BusContract
from tidings.bench.services import Redis
from tidings.bus.base import Bus
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
