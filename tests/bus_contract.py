"""The `Bus` contract: every implementation must pass these (see bus/base.py).

A test module subclasses `BusContract` and provides a ``nodes`` fixture: a `Nodes`
whose ``node()`` starts one more bus on a transport shared with the others (the nodes of
one cluster), and whose ``kill()`` stops one as a killed process would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from tidings.bus.base import (
    Bus,
    BusEvent,
    MessageEvent,
    PresenceChange,
    ReadNotice,
    ResyncHint,
    RevokeEvent,
    RoomEvent,
    SessionStarted,
    SettingsNotice,
    TypingNotice,
)
from tidings.store.base import ConvSettings, MessageRecord


class Nodes(Protocol):
    ttl_ms: int

    async def node(self) -> Bus: ...

    async def kill(self, bus: Bus) -> None: ...


def event(seq: int, users: tuple[str, ...] = ("a", "b"), conv: str = "d:a|b") -> MessageEvent:
    rec = MessageRecord(
        conv=conv,
        seq=seq,
        mid=1000 + seq,
        sender="a",
        dev="d1",
        cid=f"c{seq}",
        type="text",
        body={"text": str(seq)},
        ts=seq,
    )
    return MessageEvent(rec, users, exclude_device="d1")


async def settle(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "bus did not deliver in time"
        await asyncio.sleep(0.005)


class Got:
    """A handler that keeps what it is given."""

    def __init__(self, bus: Bus) -> None:
        self.events: list[BusEvent] = []
        bus.set_handler(self.events.append)

    def seqs(self) -> list[int]:
        return [e.record.seq for e in self.events if isinstance(e, MessageEvent)]

    def hints(self) -> list[ResyncHint]:
        return [e for e in self.events if isinstance(e, ResyncHint)]

    def presence(self) -> list[tuple[str, bool]]:
        return [(e.uid, e.online) for e in self.events if isinstance(e, PresenceChange)]

    def others(self) -> list[BusEvent]:
        """What is neither a message nor this node's own presence transition."""
        return [e for e in self.events if not isinstance(e, (MessageEvent, PresenceChange))]

    def rooms(self) -> list[str]:
        return [e.sender for e in self.events if isinstance(e, RoomEvent)]


async def marker(pub: Bus, got: Got, uid: str, seq: int) -> None:
    """Publish a last event to ``uid`` (on ``got``'s node) and wait for it: whatever the
    same publisher sent before has arrived by then (publish order per publisher)."""
    pub.publish(event(seq, (uid,)))
    await settle(lambda: seq in got.seqs())


class BusContract:
    # ------------------------------------------------------------------ one node

    async def test_delivers_in_publish_order(self, nodes: Nodes) -> None:
        """Events from one publisher reach a user's node in publish order, intact, both
        on the publisher's own node and on another."""
        a, b = await nodes.node(), await nodes.node()
        got_a, got_b = Got(a), Got(b)
        a.user_online("a")
        b.user_online("b")
        await a.flush()
        await b.flush()
        sent = [event(i, ("a",) if i % 2 else ("b",)) for i in range(1, 201)]
        for ev in sent:
            a.publish(ev)
        await settle(lambda: len(got_a.seqs()) + len(got_b.seqs()) >= 200)
        mine = [e for e in got_a.events if isinstance(e, MessageEvent)]
        theirs = [e for e in got_b.events if isinstance(e, MessageEvent)]
        assert mine == [e for e in sent if e.users == ("a",)]
        assert theirs == [e for e in sent if e.users == ("b",)]

    async def test_revocations_and_session_starts_reach_the_users_nodes(self, nodes: Nodes) -> None:
        """Per-user events (revocation, session start, settings, typing, read) reach the
        nodes where their user is online, and only those."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        got_b, got_c = Got(b), Got(c)
        b.user_online("u")
        c.user_online("w")
        await b.flush()
        await c.flush()
        per_user: list[BusEvent] = [
            RevokeEvent("u", "d1", before_ms=5, jti="j"),
            SessionStarted("u", "d2", "ios", "s1"),
            SettingsNotice("d:u|x", "u", "d1", ConvSettings(muted=True)),
            TypingNotice("d:u|x", "x", ("u",)),
            ReadNotice("d:u|x", "u", "d1", 3, 0, ("x",)),  # the reader's own devices too
        ]
        for ev in per_user:
            a.publish(ev)
        await marker(a, got_c, "w", 1)
        await settle(lambda: len(got_b.others()) >= len(per_user))
        await marker(a, got_b, "u", 2)
        assert got_b.others()[: len(per_user)] == per_user
        assert got_c.others() == []

    async def test_handler_failure_does_not_reach_publisher(self, nodes: Nodes) -> None:
        """A handler that raises neither breaks publish() nor stops later deliveries."""
        bus = await nodes.node()
        got: list[BusEvent] = []

        def flaky(ev: BusEvent) -> None:
            if isinstance(ev, MessageEvent) and ev.record.seq == 1:
                raise RuntimeError("handler bug")
            got.append(ev)

        bus.set_handler(flaky)
        bus.user_online("a")
        bus.publish(event(1))
        bus.publish(event(2))
        await settle(lambda: any(isinstance(e, MessageEvent) for e in got))
        assert [e.record.seq for e in got if isinstance(e, MessageEvent)] == [2]

    async def test_publish_without_handler_or_after_close(self, nodes: Nodes) -> None:
        """Publishing with nobody listening, or after close, is a silent no-op."""
        bus = await nodes.node()
        bus.user_online("a")
        bus.publish(event(1))
        got = Got(bus)
        await bus.close()
        bus.publish(event(2))
        await bus.close()  # twice is fine
        await asyncio.sleep(0.05)
        assert got.seqs() == []

    # ------------------------------------------------------------------ routing

    async def test_routes_only_to_nodes_with_the_user(self, nodes: Nodes) -> None:
        """An event for a user online only on B reaches B's handler, not C's nor the
        publisher's; a user online nowhere gets nothing anywhere."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        got_a, got_b, got_c = Got(a), Got(b), Got(c)
        b.user_online("bob")
        c.user_online("carol")
        await b.flush()
        await c.flush()
        a.publish(event(1, ("bob",)))
        a.publish(event(2, ("nobody",)))
        b.publish(event(3, ("nobody", "ghost")))
        await marker(a, got_b, "bob", 4)
        await marker(a, got_c, "carol", 5)
        await marker(b, got_b, "bob", 6)
        await marker(b, got_c, "carol", 7)
        assert got_a.seqs() == []
        assert got_b.seqs() == [1, 4, 6]
        assert got_c.seqs() == [5, 7]

    async def test_a_users_devices_on_several_nodes_each_get_it_once(self, nodes: Nodes) -> None:
        """A user online on the publisher's node and on two others: each node's handler
        gets the event exactly once (the publisher's own at once, without an echo)."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        gots = [Got(a), Got(b), Got(c)]
        for n in (a, b, c):
            n.user_online("u")
            await n.flush()
        a.publish(event(1, ("u", "u", "v")))
        assert gots[0].seqs() == [1]  # local: no round trip
        for g in gots[1:]:
            await settle(lambda g=g: g.seqs() == [1])
        a.publish(event(2, ("u",)))
        for g in gots:
            await settle(lambda g=g: 2 in g.seqs())
        assert [g.seqs() for g in gots] == [[1, 2]] * 3

    async def test_group_entries_reach_every_node_once(self, nodes: Nodes) -> None:
        """An event without users (a group entry) reaches every node, the publisher's
        too, exactly once."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        gots = [Got(a), Got(b), Got(c)]
        b.publish(event(1, (), conv="g:1"))
        b.publish(event(2, (), conv="g:1"))
        for g in gots:
            await settle(lambda g=g: len(g.seqs()) >= 2)
        await asyncio.sleep(0.05)
        assert [g.seqs() for g in gots] == [[1, 2]] * 3

    async def test_room_posts_reach_only_watching_nodes(self, nodes: Nodes) -> None:
        """A room post reaches the nodes with viewers in the room (the publisher's own
        only if it watches), and stops reaching a node that unwatched."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        got_a, got_b, got_c = Got(a), Got(b), Got(c)
        b.watch_room("r:x")
        c.watch_room("r:other")
        c.user_online("carol")
        await b.flush()
        await c.flush()
        a.publish(RoomEvent("r:x", "p1", "chat", {"text": "hi"}, 1))
        await settle(lambda: got_b.rooms() == ["p1"])
        b.publish(RoomEvent("r:x", "p2", "chat", {}, 2))
        assert got_b.rooms() == ["p1", "p2"]  # own node: at once
        await b.flush()
        b.unwatch_room("r:x")
        a.watch_room("r:x")
        await b.flush()
        await a.flush()
        a.publish(RoomEvent("r:x", "p3", "like", {}, 3))
        await marker(a, got_c, "carol", 1)
        await marker(b, got_c, "carol", 2)  # b's echo of p2, if any, would be in by now
        assert got_a.rooms() == ["p3"]
        assert got_b.rooms() == ["p1", "p2"]
        assert got_c.rooms() == []

    # ------------------------------------------------------------------ presence

    async def test_presence_is_cluster_wide(self, nodes: Nodes) -> None:
        """A user's first session in the cluster is a transition (told to the node where
        it happened), a second node is not; leaving one of two nodes is not offline;
        leaving the last is. Every node answers online() the same."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        got_a, got_b, got_c = Got(a), Got(b), Got(c)
        b.user_online("u")
        await settle(lambda: got_b.presence() == [("u", True)])
        c.user_online("u")
        await c.flush()
        assert await a.online(["u", "v"]) == {"u"}
        b.user_offline("u")
        await b.flush()
        assert await a.online(["u"]) == {"u"}
        assert await b.online(["u"]) == {"u"}
        c.user_offline("u")
        await settle(lambda: got_c.presence() == [("u", False)])
        assert await a.online(["u"]) == set()
        await asyncio.sleep(0.05)
        assert got_a.presence() == [] and got_b.presence() == [("u", True)]
        assert got_c.presence() == [("u", False)]

    # ------------------------------------------------------------------ node death

    async def test_a_dead_nodes_routes_vanish_and_the_others_resync(self, nodes: Nodes) -> None:
        """A node that stops without leaving: within the node TTL its routes are gone
        (online() and routing ignore it); every other node gets a resync hint naming
        it; its users online nowhere else go offline, told to one survivor only."""
        a, b, c = await nodes.node(), await nodes.node(), await nodes.node()
        got_a, got_c = Got(a), Got(c)
        b.user_online("only-b")
        b.user_online("both")
        c.user_online("both")
        await b.flush()
        await c.flush()
        assert await a.online(["only-b", "both"]) == {"only-b", "both"}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await nodes.kill(b)
        while await a.online(["only-b"]):
            assert loop.time() - t0 < nodes.ttl_ms / 1000 + 0.5, "routes outlived the TTL"
            await asyncio.sleep(0.02)
        assert await a.online(["both"]) == {"both"}
        b_id = b.node_id
        for g in (got_a, got_c):
            await settle(lambda g=g: bool(g.hints()), nodes.ttl_ms / 1000 * 2 + 2)
            assert [(h.reason, h.node) for h in g.hints()] == [("peer_died", b_id)]
        await settle(lambda: bool(got_a.presence() + got_c.presence()))
        await asyncio.sleep(0.2)
        assert sorted(got_a.presence() + got_c.presence()) == [("only-b", False)]
        a.publish(event(1, ("only-b", "both")))
        await settle(lambda: got_c.seqs() == [1])

    async def test_a_clean_leave_is_no_death(self, nodes: Nodes) -> None:
        """A node that closes takes its routes and rooms with it at once; the others get
        no resync hint for it."""
        a, b = await nodes.node(), await nodes.node()
        got_a = Got(a)
        b.user_online("u")
        b.watch_room("r:x")
        await b.flush()
        assert await a.online(["u"]) == {"u"}
        await b.close()
        assert await a.online(["u"]) == set()
        await asyncio.sleep(nodes.ttl_ms / 1000 * 1.5)
        assert got_a.hints() == []

    # ------------------------------------------------------------------ counters

    async def test_rate_limit_counters_are_global(self, nodes: Nodes) -> None:
        """Uses counted on one node count on the others: after A used up the window's
        limit, B is admitted at most once more (the counter's answer is a round trip
        late) and then refused with the wait until the window ends."""
        a, b = await nodes.node(), await nodes.node()
        key, limit, window = "room:r:x:chat:u", 5, 3_600_000
        assert [a.allow(key, limit, window) for _ in range(limit)] == [0] * limit
        wait = a.allow(key, limit, window)
        assert 0 < wait <= window
        await a.flush()
        extra = 0
        for _ in range(3):
            if b.allow(key, limit, window) == 0:
                extra += 1
            await b.flush()
        assert extra <= 1
        assert 0 < b.allow(key, limit, window) <= window
        assert b.allow("another key", limit, window) == 0
