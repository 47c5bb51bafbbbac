"""The Bus contract suite against the in-process bus (nodes sharing a MemoryCluster),
and the single-process bus that hands everything to its hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.bus_contract import BusContract, Got, event
from tests.conftest import Harness, next_message
from tests.rawclient import Raw
from tidings.bus.base import Bus, PresenceChange, ResyncHint, RoomEvent
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


async def test_sdk_syncs_on_a_resync_hint(make_server: Any) -> None:
    """A device whose push was lost (its publish never reached the hub) gets the message
    as soon as the server sends a resync hint, without waiting for its next pong."""
    h: Harness = await make_server()
    hub = h.server.hub
    hub.resync_jitter_s = 0
    bob = await h.client("bob", heartbeat_s=60, dead_after_s=120)
    alice = await h.client("alice")
    h.server.bus.set_handler(lambda e: None)  # the publish of the next send is lost
    sent = await alice.send(to="bob", text="lost push")
    h.server.bus.set_handler(hub.handle)
    with pytest.raises(TimeoutError):
        await next_message(bob, timeout=0.3)
    answers = bob.sync_answers
    h.server.bus.publish(ResyncHint("peer_died", "n9"))
    ev = await next_message(bob, timeout=3)
    assert ev.message.mid == sent.mid and ev.message.body == {"text": "lost push"}
    assert bob.sync_answers > answers
    assert hub.resyncs == 2  # one frame per session here


async def test_resync_frame_on_the_wire(make_server: Any) -> None:
    """The hint is the frame {"t": "resync"}; hints that come before a pass went out are
    answered by it, a later one by one more pass."""
    h: Harness = await make_server()
    hub = h.server.hub
    hub.resync_jitter_s = 0.05
    raw = await Raw.ws(h.ws_url)
    assert (await raw.login(await h.token("bob")))["t"] == "ready"
    for _ in range(5):
        hub.handle(ResyncHint("reconnected"))
    assert await raw.until("resync") == {"t": "resync"}
    hub.handle(ResyncHint("peer_died", "n2"))
    assert await raw.until("resync") == {"t": "resync"}
    await asyncio.sleep(0.2)
    assert hub.resyncs == 2
    await raw.close()
