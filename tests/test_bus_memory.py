"""The Bus contract suite against the in-process bus (nodes sharing a MemoryCluster),
and the single-process bus that hands everything to its hub."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.bus_contract import BusContract, Got, event
from tidings.bus.base import Bus, PresenceChange, RoomEvent
from tidings.bus.memory import MemoryBus, MemoryCluster


class MemoryNodes:
    ttl_ms = 300

    def __init__(self) -> None:
        self.cluster = MemoryCluster(self.ttl_ms)
        self.started: list[MemoryBus] = []

    async def node(self) -> Bus:
        bus = MemoryBus(self.cluster, f"n{len(self.started) + 1}")
        await bus.start()
        self.started.append(bus)
        return bus

    async def kill(self, bus: Bus) -> None:
        assert isinstance(bus, MemoryBus)
        await bus.halt()


@pytest.fixture
async def nodes() -> AsyncIterator[MemoryNodes]:
    n = MemoryNodes()
    yield n
    for bus in n.started:
        await bus.close()


class TestMemoryBus(BusContract):
    pass


async def test_a_lone_bus_hands_every_event_to_its_hub() -> None:
    """Without a cluster, every event goes to the handler at once (the hub drops what is
    for nobody here), presence transitions included; it keeps no global state."""
    bus = MemoryBus()
    await bus.start()
    got = Got(bus)
    assert not bus.shared
    bus.publish(event(1, ("nobody",)))
    bus.publish(RoomEvent("r:x", "p", "chat", {}, 1))
    bus.user_online("u")
    bus.user_online("u")
    assert got.seqs() == [1] and got.rooms() == ["p"]
    assert got.presence() == [("u", True)]
    assert await bus.online(["u", "v"]) == {"u"}
    bus.user_offline("u")
    assert got.events[-1] == PresenceChange("u", False)
    assert bus.allow("k", 2) == 0 and bus.allow("k", 2) == 0 and bus.allow("k", 2) > 0
    await bus.close()
