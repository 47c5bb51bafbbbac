"""In-process bus: one process alone, or several "nodes" sharing a `MemoryCluster`.

Alone (no cluster given) it hands every event straight to this process's hub, which
drops what is for nobody here: the single-node server pays nothing for routing. Nodes
sharing a cluster follow the same rules as the Redis bus (routes per user, rooms per
node, presence transitions, node death after a TTL, shared counters), so one contract
suite holds both to them (tests/bus_contract.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from tidings.bus.base import (
    BusEvent,
    Handler,
    PresenceChange,
    ResyncHint,
    RoomEvent,
    users_of,
)

log = logging.getLogger(__name__)
MAX_COUNTERS = 100_000


class MemoryCluster:
    """What Redis holds for the Redis bus, in this process: routes (user -> nodes),
    rooms (room -> nodes), rate counters, and which nodes are alive."""

    def __init__(self, node_ttl_ms: int = 5_000) -> None:
        self.node_ttl_ms = node_ttl_ms
        self.nodes: dict[str, MemoryBus] = {}  # alive (a halted node stays until its TTL)
        self.routes: dict[str, set[str]] = {}
        self.rooms: dict[str, set[str]] = {}
        self.counters: dict[tuple[str, int, int], int] = {}

    def publish(self, event: BusEvent) -> None:
        """Deliver to every node that should have ``event``, at once, in order."""
        if isinstance(event, RoomEvent):
            targets: Sequence[str] = list(self.rooms.get(event.room, ()))
        else:
            users = users_of(event)
            if users is None:
                targets = list(self.nodes)
            else:
                found: dict[str, None] = {}
                for u in users:
                    for n in self.routes.get(u, ()):
                        found[n] = None
                targets = list(found)
        for n in targets:
            node = self.nodes.get(n)
            if node is not None:
                node.deliver(event)

    def add_route(self, uid: str, node: str) -> bool:
        """Route ``uid`` to ``node``; True if no other node had the user."""
        nodes = self.routes.setdefault(uid, set())
        if node in nodes:
            return False
        first = not nodes
        nodes.add(node)
        return first

    def drop_route(self, uid: str, node: str) -> bool:
        """Remove the route; True if it was the user's last."""
        nodes = self.routes.get(uid)
        if nodes is None or node not in nodes:
            return False
        nodes.discard(node)
        if nodes:
            return False
        del self.routes[uid]
        return True

    def halted(self, node: str) -> None:
        """``node`` stopped without leaving: after the TTL its routes go, its users with
        no other node go offline (told to one surviving node) and every survivor gets a
        resync hint."""
        asyncio.get_running_loop().call_later(self.node_ttl_ms / 1000, self._expire, node)

    def _expire(self, dead: str) -> None:
        gone = [u for u in list(self.routes) if self.drop_route(u, dead)]
        for nodes in self.rooms.values():
            nodes.discard(dead)
        self.nodes.pop(dead, None)
        survivors = list(self.nodes.values())
        if survivors:
            for uid in gone:
                survivors[0].deliver(PresenceChange(uid, False))
        for node in survivors:
            node.deliver(ResyncHint("peer_died", dead))

    def count(self, key: str, window_ms: int, window: int) -> int:
        """One more use of ``key`` in ``window``; the uses so far, this one included."""
        k = (key, window_ms, window)
        if k not in self.counters and len(self.counters) >= MAX_COUNTERS:
            self.counters = {c: n for c, n in self.counters.items() if c[2] >= window - 1}
        n = self.counters.get(k, 0) + 1
        self.counters[k] = n
        return n

    def used(self, key: str, window_ms: int, window: int) -> int:
        return self.counters.get((key, window_ms, window), 0)


class MemoryBus:
    def __init__(self, cluster: MemoryCluster | None = None, node_id: str = "local") -> None:
        self._solo = cluster is None
        self.shared = cluster is not None
        self.cluster = cluster if cluster is not None else MemoryCluster()
        self.node_id = node_id
        self._handler: Handler | None = None
        self._closed = False
        self.local: set[str] = set()  # users with sessions here
        self.rooms: set[str] = set()  # rooms with viewers here
        self.published = 0

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    async def start(self) -> None:
        if self.node_id in self.cluster.nodes:
            raise ValueError(f"node id {self.node_id!r} is already in the cluster")
        self.cluster.nodes[self.node_id] = self

    async def close(self) -> None:
        """Leave cleanly: routes and rooms go at once, no hint for the others."""
        if self._closed:
            return
        self._closed = True
        for uid in self.local:
            self.cluster.drop_route(uid, self.node_id)
        for room in self.rooms:
            self.cluster.rooms.get(room, set()).discard(self.node_id)
        self.cluster.nodes.pop(self.node_id, None)
        self._handler = None

    async def halt(self) -> None:
        """Stop as a killed process would: nothing delivered here from now on, and the
        routes stay until the cluster's node TTL runs out."""
        self._closed = True
        self._handler = None
        self.cluster.halted(self.node_id)

    async def flush(self) -> None:
        return None

    def publish(self, event: BusEvent) -> None:
        if self._closed:
            return
        self.published += 1
        if self._solo:
            self.deliver(event)
        else:
            self.cluster.publish(event)

    def deliver(self, event: BusEvent) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler(event)
        except Exception:  # a handler bug must not fail the publisher's send
            log.exception("bus handler failed")

    # ------------------------------------------------------------------ routing state

    def user_online(self, uid: str) -> None:
        if self._closed or uid in self.local:
            return
        self.local.add(uid)
        if self.cluster.add_route(uid, self.node_id):
            self.deliver(PresenceChange(uid, True))

    def user_offline(self, uid: str) -> None:
        if self._closed or uid not in self.local:
            return
        self.local.discard(uid)
        if self.cluster.drop_route(uid, self.node_id):
            self.deliver(PresenceChange(uid, False))

    def watch_room(self, room: str) -> None:
        if not self._closed:
            self.rooms.add(room)
            self.cluster.rooms.setdefault(room, set()).add(self.node_id)

    def unwatch_room(self, room: str) -> None:
        self.rooms.discard(room)
        nodes = self.cluster.rooms.get(room)
        if nodes is not None:
            nodes.discard(self.node_id)
            if not nodes:
                del self.cluster.rooms[room]

    async def online(self, users: Sequence[str]) -> set[str]:
        routes = self.cluster.routes
        return {u for u in users if routes.get(u)}

    def allow(self, key: str, limit: int, window_ms: int = 1000) -> int:
        now = int(time.monotonic() * 1000)
        window = now // window_ms
        if self.cluster.used(key, window_ms, window) >= limit:
            return max(1, (window + 1) * window_ms - now)
        self.cluster.count(key, window_ms, window)
        return 0
