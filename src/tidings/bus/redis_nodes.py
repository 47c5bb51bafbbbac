"""The cluster's nodes as one Redis-bus node sees them at each heartbeat: which are
alive, which died since the last look (their devices' events may be lost: resync
hints), and the clean-up of dead nodes' routes (their users go offline)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis

from tidings.bus.base import BusEvent, PresenceChange, ResyncHint
from tidings.bus.redis_lua import LEFT_KEPT_MS

log = logging.getLogger(__name__)
GC_BATCH = 1_000  # users per clean-up script call
Script = Callable[..., Awaitable[Any]]  # Scripts.run


def redacted(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class NodeTable:
    def __init__(
        self,
        node_id: str,
        ttl_ms: int,
        prefix: str,
        script: Script,
        deliver: Callable[[BusEvent], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.node_id = node_id
        self.ttl_ms = ttl_ms
        self.prefix = prefix
        self.script = script
        self.deliver = deliver
        self.spawn = spawn
        self.alive: set[str] = set()  # the other nodes alive at the last heartbeat
        self._collecting: set[str] = set()  # dead nodes this one is cleaning up

    async def beat(self, client: aioredis.Redis, first: bool) -> bool:
        """Renew this node's heartbeat and look at the others: a node alive at the last
        look that expired or vanished without leaving died (every node's hub gets a
        hint: it may have committed messages it never published). True if this node's
        own heartbeat had expired (it was silent past its TTL: the others may have
        dropped its routes)."""
        p = self.prefix
        beat = [self.node_id, self.ttl_ms, LEFT_KEPT_MS]
        now, prev, flat = await self.script(client, "beat", [p + "nodes"], *beat)
        alive, dead, left = set(), set(), set()
        for i in range(0, len(flat), 2):
            node, score = flat[i].decode(), float(flat[i + 1])
            if node == self.node_id:
                continue
            if score >= now:
                alive.add(node)
            elif score >= 0:
                dead.add(node)
            else:
                left.add(node)
        died = self.alive - alive - left
        self.alive = alive
        for node in sorted(died):
            log.warning("bus: node %s died (heartbeat expired); devices here resync", node)
            self.deliver(ResyncHint("peer_died", node))
        for node in sorted(dead - self._collecting):
            self._collecting.add(node)  # in a task: a big clean-up must not delay beats
            self.spawn(self._collect(client, node))
        return not first and (not prev or float(prev) < now)

    async def _collect(self, client: aioredis.Redis, dead: str) -> None:
        """Drop a dead node's routes (each survivor takes a share); its users left with
        no live node go offline, told to this node's hub."""
        p = self.prefix
        try:
            while True:
                keys = [p + "nodes", p + "nu:" + dead]
                out = await self.script(client, "gc", keys, dead, p + "u:", GC_BATCH)
                for uid in out[1:]:
                    self.deliver(PresenceChange(uid.decode(), False))
                if out[0] != 1:
                    return
        finally:
            self._collecting.discard(dead)
