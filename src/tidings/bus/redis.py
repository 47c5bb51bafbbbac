"""Redis bus: routing, presence, live-room fan-out and global counters for a cluster of
processes and nodes (docs/architecture.md, "The bus across nodes"; the keys, channels
and scripts are in redis_lua.py).

Events for sessions on this node go straight to the handler. Everything else is queued
for one publisher task, which sends it in order, in pipelines of up to ``batch``
operations: a routed event is one script call that looks its users' nodes up and
PUBLISHes to each live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
from hiredis import pack_command
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
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
from tidings.bus.redis_lua import Command, Scripts
from tidings.bus.redis_nodes import NodeTable, redacted
from tidings.clock import Clock

log = logging.getLogger(__name__)
LOST = (RedisConnectionError, RedisTimeoutError, OSError)  # the connection is gone
MAX_COUNTERS = 100_000
LOG_EVERY_S = 10.0  # the least time between two "dropping events" warnings

# Operations for the publisher task, in order.
ROUTED, CHANNEL, UP, DOWN, ASK, COUNT, SUB, UNSUB, RECONCILE = range(9)


class Op(NamedTuple):
    kind: int
    arg: Any = None
    extra: Any = None


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    node: str  # the publisher (a node skips its own echoes on shared channels)
    event: BusEvent


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
        self._timeout_s = max(1.0, node_ttl_ms / 2000)  # for a Redis answer
        self.batch = batch
        self.max_queue = max_queue
        p = f"{prefix}:{db}:"  # channels are server-wide: the db keeps clusters apart
        self.lua = Scripts(p, node_id)
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
        self._conn: Connection | None = None  # the publisher's own
        self._pubsub: PubSub | None = None
        self._sub_seen = 0.0  # when the subscription connection last said anything
        self._connected = False
        self._closed = False
        self._first = True
        self._lost = asyncio.Event()
        self._logged: dict[str, float] = {}  # kind of warning -> when last logged
        self._reloading = False
        self._dropped_unsaid = 0  # dropped events the other nodes were not told of
        self.nodes = NodeTable(
            node_id, node_ttl_ms, p, self.lua.run, self.deliver, self._spawn_conn
        )
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
                async with asyncio.timeout(2):
                    await self.lua.leave(self._client)
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
            self._enqueue(Op(CHANNEL, self.lua.room_channel + event.room, self._wrap(event)))
            return
        users = users_of(event)
        if users is None:
            self.deliver(event)
            self._enqueue(Op(CHANNEL, self.lua.all_channel, self._wrap(event)))
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
            self._dropped_unsaid += 1
            self._log_now_and_then("drop", "dropping events, %s (devices resync)", why)
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
                self._enqueue(Op(SUB, self.lua.room_channel + room))

    def unwatch_room(self, room: str) -> None:
        if room in self.rooms:
            self.rooms.discard(room)
            if self._connected:
                self._enqueue(Op(UNSUB, self.lua.room_channel + room))

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
            if self._dropped_unsaid and self._connected and len(self._queue) < self.batch:
                self._tell_dropped()

    def _tell_dropped(self) -> None:
        """Events were dropped (queue full, Redis away or refusing): every node's
        devices resync, since some of those events were theirs."""
        self._dropped_unsaid = 0
        hint = ResyncHint("peer_dropped", self.node_id)
        self._queue.append(Op(CHANNEL, self.lua.all_channel, self._wrap(hint)))
        self._wake.set()

    async def _send(self, batch: list[Op]) -> None:
        """One round trip for the batch: the commands packed into one write on the
        publisher's own connection, then their answers read in order."""
        client, pubsub, conn = self._client, self._pubsub, self._conn
        assert client is not None and pubsub is not None and conn is not None
        ops: list[Op] = []
        cmds: list[Command] = []
        lua = self.lua
        for op in batch:
            k = op.kind
            if k == ROUTED:
                cmds.append(lua.route(op.arg, op.extra))
            elif k == CHANNEL:
                cmds.append(("PUBLISH", op.arg, op.extra))
            elif k in (UP, DOWN):
                cmds.append(lua.register(op.arg, k == UP))
            elif k == ASK:
                cmds.append(lua.query(op.arg))
            elif k == COUNT:
                cmds.append(lua.count(op.arg, *op.extra))
            elif k == RECONCILE:
                await self._reconcile(client, pubsub, reconnected=op.arg)
                continue
            else:
                await (pubsub.subscribe if k == SUB else pubsub.unsubscribe)(op.arg)
                continue
            ops.append(op)
        if not ops:
            return
        packed = b"".join([pack_command(c) for c in cmds])  # type: ignore[arg-type]
        await conn.send_packed_command(packed, check_health=False)
        for op in ops:
            try:
                res = await conn.read_response(disable_decoding=True)
            except ResponseError as exc:  # that command alone failed
                self._command_failed(op, exc)
            else:
                self._done(op, res)

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

    def _log_now_and_then(self, kind: str, msg: str, *args: Any) -> None:
        """A warning at most every LOG_EVERY_S per kind (an outage is one line)."""
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[kind] = now
            log.warning("bus: " + msg, *args)

    def _command_failed(self, op: Op, exc: Exception) -> None:
        if isinstance(exc, NoScriptError):  # flushed behind our back: load them again
            if not self._reloading:
                self._reloading = True
                log.warning("bus: Redis forgot our scripts; loading them again")
                self._spawn(self._reload_scripts(), self._conn_tasks)
        else:
            self._log_now_and_then("refused", "Redis refused an operation: %s", exc)
        self._drop_op(op, f"Redis refused it: {exc}")

    async def _reload_scripts(self) -> None:
        """Load the scripts again, then put this node's routes right (registrations
        may have failed meanwhile)."""
        try:
            if self._client is not None:
                async with asyncio.timeout(self._timeout_s):
                    await self.lua.load(self._client)
                self._queue.appendleft(Op(RECONCILE, False))
                self._wake.set()
        finally:
            self._reloading = False

    # ------------------------------------------------------------------ connection

    def _spawn_conn(self, coro: Any) -> None:
        """Run ``coro`` while this connection lasts."""
        self._spawn(coro, self._conn_tasks)

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
        while not self._closed:
            await self._lost.wait()
            await self._teardown()
            delay = 0.05
            while not self._closed:
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                try:
                    await self._connect()
                    break
                except (*LOST, RedisError) as exc:
                    log.debug("bus: reconnecting to Redis failed: %s", exc)
                    await self._teardown()
                    delay = min(delay * 2, 5.0)

    async def _connect(self) -> None:
        # No read timeout on the connections: the publisher and the subscription block
        # on reads; the heartbeat (with its own timeout) finds a dead Redis and the
        # teardown then closes them under whoever waits.
        client = aioredis.Redis.from_url(
            self.url,
            retry=Retry(NoBackoff(), 0),  # we reconnect ourselves, and never send twice
            socket_connect_timeout=self._timeout_s,
            client_name=f"tidings-bus:{self.node_id}",  # for CLIENT LIST
        )
        self._client = client
        async with asyncio.timeout(self._timeout_s):
            await self._open(client)
        self._lost.clear()
        self._connected = True
        self._queue.appendleft(Op(RECONCILE, True))
        self._wake.set()
        self._spawn(self._beat_forever(client), self._conn_tasks)

    async def _open(self, client: aioredis.Redis) -> None:
        await self.lua.load(client)
        await self._beat(client)
        self._conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        self._pubsub = client.pubsub()

    async def _reconcile(self, client: aioredis.Redis, pubsub: PubSub, reconnected: bool) -> None:
        """(On a new connection: subscribe.) Bring this node's routes in Redis in line
        with its sessions; after a reconnect, tell the hub and, if events were dropped,
        the others. Runs in the publisher, so later operations queue behind it."""
        if reconnected:
            lua = self.lua
            rooms = [lua.room_channel + r for r in self.rooms]
            await pubsub.subscribe(lua.node_channel + self.node_id, lua.all_channel, *rooms)
            assert pubsub.connection is not None
            self._sub_seen = asyncio.get_running_loop().time()
            self._spawn(self._read(pubsub.connection), self._conn_tasks)
        async with asyncio.timeout(self._timeout_s):
            have = {m.decode() for m in await client.smembers(self.lua.mine)}  # type: ignore[misc]
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
        log.info("bus: reconnected to Redis at %s", redacted(self.url))
        self.deliver(ResyncHint("reconnected"))

    async def _teardown(self) -> None:
        self._connected = False
        while self._queue:  # what was queued for the old connection is lost with it
            self._drop_op(self._queue.popleft(), "Redis is unreachable")
        await self._cancel(self._conn_tasks)
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = self._conn = None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
        """Cancel ``tasks`` and wait for them, a little: a task that ignored its
        cancellation must not hang the caller (a server's drain)."""
        me = asyncio.current_task()
        doomed = [t for t in tasks if t is not me]
        for t in doomed:
            t.cancel()
        if doomed:
            _, stuck = await asyncio.wait(doomed, timeout=2)
            for t in stuck:
                log.error("bus: task %s did not stop when cancelled", t.get_coro())

    async def _read(self, conn: Connection) -> None:
        """The subscription: every message goes to the handler (but our own echoes on
        shared channels); answers to (un)subscribe and PING just show it is alive."""
        decode, me, loop = self._decode, self.node_id, asyncio.get_running_loop()
        while True:
            msg = await conn.read_response(disable_decoding=True)
            self._sub_seen = loop.time()
            if not isinstance(msg, list) or len(msg) != 3 or msg[0] != b"message":
                continue
            try:
                env = decode(msg[2])
            except (msgspec.DecodeError, TypeError) as exc:
                log.warning("bus: undecodable message on %s: %s", msg[1], exc)
                continue
            if env.node == me:
                continue  # our own, on a shared channel: delivered here at publish
            self.received += 1
            self.deliver(env.event)

    # ------------------------------------------------------------------ heartbeat

    async def _beat_forever(self, client: aioredis.Redis) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.node_ttl_ms / 3000)
            async with asyncio.timeout(self._timeout_s):
                await self._beat(client)
            pubsub = self._pubsub
            if pubsub is not None and pubsub.connection is not None:
                if loop.time() - self._sub_seen > 2 * self._timeout_s:
                    raise RedisConnectionError("the subscription connection went silent")
                await pubsub.execute_command("PING")  # answered on the subscription

    async def _beat(self, client: aioredis.Redis) -> None:
        lapsed = await self.nodes.beat(client, self._first)
        if lapsed and self._connected:
            log.warning("bus: this node was silent past its TTL; registering again")
            self._queue.appendleft(Op(RECONCILE, False))
            self._wake.set()
            self.deliver(ResyncHint("lapsed"))
