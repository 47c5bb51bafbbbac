"""Redis bus: routing, presence, live-room fan-out and global counters for a cluster of
processes and nodes (docs/architecture.md, "The bus across nodes").

Under ``<prefix>:<db>:`` Redis holds
- ``nodes``: a ZSET of node id -> heartbeat expiry (Redis server time, ms); a node that
  leaves cleanly is kept a while with a negative score (-time it left);
- ``u:<uid>``: the SET of nodes where the user has sessions (valid while the node is
  alive: every script checks ``nodes``, so a dead node's routes vanish when its
  heartbeat expires, with no per-user refresh);
- ``nu:<node>``: the SET of users routed to the node (re-registration after an outage,
  and clean-up of a dead node by the survivors);
- ``rl:<key>:<window>``: rate-limit counters.
Channels: ``n:<node>`` (events for users there), ``all`` (group entries, resync hints:
every node), ``r:<room>`` (a live room's posts: the nodes with viewers in it).

One publisher task sends everything in publish order, in pipelines of up to
``batch`` operations: a routed event is one script call that looks its users' nodes
up and PUBLISHes to each. Events for sessions on this node go straight to the handler.
Every script reads Redis' own clock, so node clocks need not agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tidings.bus.base import (
    BusEvent,
    BusUnavailable,
    Handler,
    PresenceChange,
    ResyncHint,
    RoomEvent,
    users_of,
)
from tidings.bus.redis_lua import LEFT_KEPT_MS, SCRIPTS
from tidings.clock import Clock

log = logging.getLogger(__name__)
LOST = (RedisConnectionError, RedisTimeoutError, OSError)  # the connection is gone
MAX_COUNTERS = 100_000
GC_BATCH = 1_000

# Operations for the publisher task, in order.
ROUTED, CHANNEL, UP, DOWN, ASK, COUNT, SUB, UNSUB, RECONCILE = range(9)


class Op(NamedTuple):
    kind: int
    arg: Any = None
    extra: Any = None


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    node: str  # the publisher (a node skips its own echoes on shared channels)
    event: BusEvent


def redacted(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisBus:
    """The bus over Redis. ``node_id`` must be unique among live processes (one per
    process start); ``node_ttl_ms``: a node silent this long is dead. ``start()`` joins
    the cluster (raises `BusUnavailable` if Redis cannot be reached); after that, Redis
    outages are ridden out: publishes are dropped (counted in ``dropped``), the bus
    reconnects with backoff, registers again and hands its handler a `ResyncHint`."""

    shared = True

    def __init__(
        self,
        url: str,
        node_id: str,
        clock: Clock,
        node_ttl_ms: int = 5_000,
        *,
        prefix: str = "tidings",
        batch: int = 512,
        max_queue: int = 100_000,
    ) -> None:
        try:
            db = int(parse_url(url).get("db", 0) or 0)
        except ValueError as exc:
            raise ValueError(f"bad redis url {redacted(url)!r}: {exc}") from exc
        self.url = url
        self.node_id = node_id
        self.clock = clock
        self.node_ttl_ms = node_ttl_ms
        self.batch = batch
        self.max_queue = max_queue
        p = f"{prefix}:{db}:"  # channels are server-wide: the db keeps clusters apart
        self._k_nodes = p + "nodes"
        self._k_user = p + "u:"
        self._k_mine = p + "nu:" + node_id
        self._k_rate = p + "rl:"
        self._p = p
        self._c_node = p + "n:"
        self._c_all = p + "all"
        self._c_room = p + "r:"
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Envelope).decode
        self._handler: Handler | None = None
        self.local: set[str] = set()  # users with sessions here
        self.rooms: set[str] = set()  # rooms with viewers here
        self._counts: dict[str, list[int]] = {}  # key -> [window, known total, unconfirmed]
        self._queue: deque[Op] = deque()
        self._wake = asyncio.Event()
        self._sending = False
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._shas: dict[str, str] = {}
        self._connected = False
        self._closed = False
        self._first = True
        self._lost = asyncio.Event()
        self._outage_logged = False
        self._dropped_since_connect = 0
        self._alive: set[str] = set()  # other nodes alive at the last heartbeat
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn_tasks: set[asyncio.Task[None]] = set()  # die with the connection
        # statistics
        self.published = 0
        self.received = 0
        self.dropped = 0
        self.reconnects = 0
        self.hints = 0

    # ------------------------------------------------------------------ lifecycle

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self) -> None:
        try:
            await self._connect()
        except LOST as exc:
            await self._teardown()
            raise BusUnavailable(f"Redis at {redacted(self.url)} is unreachable: {exc}") from exc
        except RedisError as exc:
            await self._teardown()
            raise BusUnavailable(f"Redis at {redacted(self.url)} refused us: {exc}") from exc
        self._spawn(self._publish_forever(), self._tasks)
        self._spawn(self._supervise(), self._tasks)
        await self.flush()  # subscribed before anyone is routed here

    async def flush(self, timeout_s: float = 2.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self._queue or self._sending) and self._connected and loop.time() < deadline:
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        """Send what is queued, leave the cluster (routes and rooms go at once; the
        others send no resync hint), disconnect."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        await self._cancel(self._tasks)
        if self._connected and self._client is not None:
            try:
                await asyncio.wait_for(self._script(self._client, "leave", self._leave_args()), 2)
            except (*LOST, RedisError) as exc:
                log.warning("bus: leaving cleanly failed (%s): others see a dead node", exc)
        await self._teardown()
        self._handler = None

    async def halt(self) -> None:
        """Stop at once, as a killed process would: no clean leave, so the others see
        this node's heartbeat expire (tests of node death)."""
        self._closed = True
        self._handler = None
        await self._cancel(self._tasks)
        await self._teardown()

    # ------------------------------------------------------------------ publishing

    def publish(self, event: BusEvent) -> None:
        if self._closed:
            return
        self.published += 1
        try:
            self._publish(event)
        except Exception:  # publish never fails a send: the event is lost, sync finds it
            log.exception("bus publish failed")

    def _publish(self, event: BusEvent) -> None:
        if isinstance(event, RoomEvent):
            if event.room in self.rooms:
                self.deliver(event)
            self._enqueue(Op(CHANNEL, self._c_room + event.room, self._wrap(event)))
            return
        users = users_of(event)
        if users is None:
            self.deliver(event)
            self._enqueue(Op(CHANNEL, self._c_all, self._wrap(event)))
            return
        local = self.local
        for u in users:
            if u in local:
                self.deliver(event)
                break
        if users:
            self._enqueue(Op(ROUTED, users, self._wrap(event)))

    def _wrap(self, event: BusEvent) -> bytes:
        return self._encode(Envelope(self.node_id, event))

    def deliver(self, event: BusEvent) -> None:
        handler = self._handler
        if handler is None:
            return
        if isinstance(event, ResyncHint):
            self.hints += 1
        try:
            handler(event)
        except Exception:  # a handler bug must not stop the bus
            log.exception("bus handler failed")

    def _enqueue(self, op: Op) -> None:
        if not self._connected:
            self._drop_op(op, "Redis is unreachable")
        elif len(self._queue) >= self.max_queue:
            self._drop_op(op, "the publish queue is full")
        else:
            self._queue.append(op)
            self._wake.set()

    def _drop_op(self, op: Op, why: str) -> None:
        if op.kind in (ROUTED, CHANNEL):
            self.dropped += 1
            self._dropped_since_connect += 1
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("bus: dropping events, %s (devices resync when it recovers)", why)
        elif op.kind == ASK and not op.extra.done():
            op.extra.set_result({u for u in op.arg if u in self.local})

    # ------------------------------------------------------------------ routing state

    def user_online(self, uid: str) -> None:
        if uid not in self.local:
            self.local.add(uid)
            if self._connected:  # else the reconnect registers it
                self._enqueue(Op(UP, uid))

    def user_offline(self, uid: str) -> None:
        if uid in self.local:
            self.local.discard(uid)
            if self._connected:
                self._enqueue(Op(DOWN, uid))

    def watch_room(self, room: str) -> None:
        if room not in self.rooms:
            self.rooms.add(room)
            if self._connected:
                self._enqueue(Op(SUB, self._c_room + room))

    def unwatch_room(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.discard(room)
            if self._connected:
                self._enqueue(Op(UNSUB, self._c_room + room))

    async def online(self, users: Sequence[str]) -> set[str]:
        if not users or not self._connected or self._closed:
            return {u for u in users if u in self.local}
        fut: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._enqueue(Op(ASK, tuple(users), fut))
        return await fut

    def allow(self, key: str, limit: int, window_ms: int = 1000) -> int:
        now = self.clock.now_ms()
        window = now // window_ms
        c = self._counts.get(key)
        if c is None or c[0] != window:
            if len(self._counts) >= MAX_COUNTERS:
                self._counts = {k: v for k, v in self._counts.items() if v[0] >= window - 1}
            c = self._counts[key] = [window, 0, 0]
        if c[1] + c[2] >= limit:
            return max(1, (window + 1) * window_ms - now)
        c[2] += 1
        if self._connected:
            self._enqueue(Op(COUNT, key, (window, window_ms)))
        return 0

    # ------------------------------------------------------------------ the publisher

    async def _publish_forever(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._connected:
                while self._queue:
                    self._drop_op(self._queue.popleft(), "Redis is unreachable")
                continue
            n = min(len(self._queue), self.batch)
            batch = [self._queue.popleft() for _ in range(n)]
            self._sending = True
            try:
                await self._send(batch)
            except LOST as exc:
                for op in batch:
                    self._drop_op(op, "Redis is unreachable")
                self._connection_lost(exc)
            except Exception:
                log.exception("bus: a batch of %d operations failed", len(batch))
                for op in batch:
                    self._drop_op(op, "a batch failed")
            finally:
                self._sending = False

    async def _send(self, batch: list[Op]) -> None:
        client, pubsub = self._client, self._pubsub
        assert client is not None and pubsub is not None
        ops: list[Op] = []
        async with client.pipeline(transaction=False) as pipe:
            for op in batch:
                k = op.kind
                if k == RECONCILE:
                    await self._reconcile(client, pubsub, reconnected=op.arg)
                elif k == SUB:
                    await pubsub.subscribe(op.arg)
                elif k == UNSUB:
                    await pubsub.unsubscribe(op.arg)
                else:
                    self._queue_command(pipe, op)
                    ops.append(op)
            if not ops:
                return
            results = await pipe.execute(raise_on_error=False)
        for op, res in zip(ops, results, strict=True):
            if isinstance(res, Exception):
                self._command_failed(op, res)
            else:
                self._done(op, res)

    def _queue_command(self, pipe: Any, op: Op) -> None:
        k, sha = op.kind, self._shas
        if k == ROUTED:
            keys = [self._k_nodes, *[self._k_user + u for u in op.arg]]
            pipe.evalsha(sha["route"], len(keys), *keys, self.node_id, self._c_node, op.extra)
        elif k == CHANNEL:
            pipe.publish(op.arg, op.extra)
        elif k in (UP, DOWN):
            name = "online" if k == UP else "offline"
            keys = [self._k_user + op.arg, self._k_nodes, self._k_mine]
            pipe.evalsha(sha[name], 3, *keys, self.node_id, op.arg)
        elif k == ASK:
            keys = [self._k_nodes, *[self._k_user + u for u in op.arg]]
            pipe.evalsha(sha["query"], len(keys), *keys)
        elif k == COUNT:
            window, window_ms = op.extra
            pipe.evalsha(sha["incr"], 1, f"{self._k_rate}{op.arg}:{window}", 2 * window_ms)

    def _done(self, op: Op, res: Any) -> None:
        k = op.kind
        if k in (UP, DOWN) and res == 1:
            self.deliver(PresenceChange(op.arg, k == UP))
        elif k == ASK:
            if not op.extra.done():
                op.extra.set_result({u for u, on in zip(op.arg, res, strict=True) if on})
        elif k == COUNT:
            c = self._counts.get(op.arg)
            if c is not None and c[0] == op.extra[0]:
                c[1] = max(c[1], int(res))
                c[2] = max(0, c[2] - 1)

    def _command_failed(self, op: Op, exc: Exception) -> None:
        if isinstance(exc, NoScriptError):  # flushed behind our back: load them again
            log.warning("bus: Redis forgot our scripts; loading them again")
            self._spawn(self._reload_scripts(), self._conn_tasks)
        else:
            log.error("bus: Redis refused an operation: %s", exc)
        self._drop_op(op, f"Redis refused it: {exc}")

    async def _reload_scripts(self) -> None:
        if self._client is not None:
            await self._load_scripts(self._client)

    # ------------------------------------------------------------------ connection

    def _spawn(self, coro: Any, into: set[asyncio.Task[None]]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        into.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._conn_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if not isinstance(exc, LOST):
            log.error("bus task failed; reconnecting", exc_info=exc)
        self._connection_lost(exc)

    def _connection_lost(self, exc: BaseException) -> None:
        if not self._connected or self._closed:
            return
        self._connected = False
        log.warning("bus: lost Redis at %s (%s); reconnecting", redacted(self.url), exc)
        self._lost.set()

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            await self._teardown()
            delay = 0.05
            while True:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                try:
                    await self._connect()
                    break
                except (*LOST, RedisError) as exc:
                    log.debug("bus: reconnecting to Redis failed: %s", exc)
                    await self._teardown()
                    delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        timeout = max(1.0, self.node_ttl_ms / 2000)
        client = aioredis.Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),  # we reconnect ourselves, and never send twice
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=max(1, self.node_ttl_ms // 3000),
            client_name=f"tidings-bus:{self.node_id}",  # for CLIENT LIST
        )
        self._client = client
        await self._load_scripts(client)
        await self._beat(client)
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._lost.clear()
        self._connected = True
        self._queue.appendleft(Op(RECONCILE, True))
        self._wake.set()
        self._spawn(self._beat_forever(client), self._conn_tasks)

    async def _reconcile(self, client: aioredis.Redis, pubsub: PubSub, reconnected: bool) -> None:
        """(On a new connection: subscribe.) Bring this node's routes in Redis in line
        with its sessions; after a reconnect, tell the hub and, if events were dropped,
        the others. Runs in the publisher, so later operations queue behind it."""
        if reconnected:
            rooms = [self._c_room + r for r in self.rooms]
            await pubsub.subscribe(self._c_node + self.node_id, self._c_all, *rooms)
            self._spawn(self._read(pubsub), self._conn_tasks)
        have = {m.decode() for m in await client.smembers(self._k_mine)}  # type: ignore[misc]
        for uid in have - self.local:
            self._queue.appendleft(Op(DOWN, uid))
        for uid in self.local - have:
            self._queue.appendleft(Op(UP, uid))
        if not reconnected:
            return
        if self._first:
            self._first = False
            return
        self.reconnects += 1
        self._outage_logged = False
        log.info("bus: reconnected to Redis at %s", redacted(self.url))
        if self._dropped_since_connect:
            self._dropped_since_connect = 0
            hint = ResyncHint("peer_dropped", self.node_id)
            self._queue.append(Op(CHANNEL, self._c_all, self._wrap(hint)))
        self.deliver(ResyncHint("reconnected"))

    async def _teardown(self) -> None:
        self._connected = False
        while self._queue:  # what was queued for the old connection is lost with it
            self._drop_op(self._queue.popleft(), "Redis is unreachable")
        await self._cancel(self._conn_tasks)
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
        me = asyncio.current_task()
        doomed = [t for t in tasks if t is not me]
        for t in doomed:
            t.cancel()
        for t in doomed:
            with contextlib.suppress(BaseException):
                await t

    async def _load_scripts(self, client: aioredis.Redis) -> None:
        for name, body in SCRIPTS.items():
            self._shas[name] = await client.script_load(body)

    async def _script(self, client: aioredis.Redis, name: str, args: list[Any]) -> Any:
        keys, argv = args
        return await client.evalsha(self._shas[name], len(keys), *keys, *argv)  # type: ignore[misc]

    def _leave_args(self) -> list[Any]:
        return [[self._k_nodes, self._k_mine], [self.node_id, self._k_user]]

    async def _read(self, pubsub: PubSub) -> None:
        decode, me = self._decode, self.node_id
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None or msg.get("type") != "message":
                continue
            try:
                env = decode(msg["data"])
            except (msgspec.DecodeError, TypeError) as exc:
                log.warning("bus: undecodable message on %s: %s", msg.get("channel"), exc)
                continue
            if env.node == me:
                continue  # our own, on a shared channel: delivered here at publish
            self.received += 1
            self.deliver(env.event)

    # ------------------------------------------------------------------ heartbeat

    async def _beat_forever(self, client: aioredis.Redis) -> None:
        while True:
            await asyncio.sleep(self.node_ttl_ms / 3000)
            await self._beat(client)

    async def _beat(self, client: aioredis.Redis) -> None:
        """Renew this node; find the nodes that died (resync hint, clean-up); notice if
        this node itself was silent past its TTL (the others may have dropped it)."""
        args = [[self._k_nodes], [self.node_id, self.node_ttl_ms, LEFT_KEPT_MS]]
        now, prev, flat = await self._script(client, "beat", args)
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
        died = self._alive - alive - left
        self._alive = alive
        lapsed = not self._first and (not prev or float(prev) < now)
        if lapsed and self._connected:
            log.warning("bus: this node was silent past its TTL; registering again")
            self._queue.appendleft(Op(RECONCILE, False))
            self._wake.set()
            self.deliver(ResyncHint("lapsed"))
        for node in sorted(died):
            log.warning("bus: node %s died (heartbeat expired); devices here resync", node)
            self.deliver(ResyncHint("peer_died", node))
        for node in sorted(dead):
            await self._collect(client, node)

    async def _collect(self, client: aioredis.Redis, dead: str) -> None:
        """Drop a dead node's routes (each survivor takes a share); its users left with
        no live node go offline, told to this node's hub."""
        while True:
            keys = [self._k_nodes, self._p + "nu:" + dead]
            out = await self._script(client, "gc", [keys, [dead, self._k_user, GC_BATCH]])
            for uid in out[1:]:
                self.deliver(PresenceChange(uid.decode(), False))
            if out[0] != 1:
                return
