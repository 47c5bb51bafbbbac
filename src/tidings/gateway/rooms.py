"""Live rooms at the gateway: who is in which room on this node (memory only), and one
frame per room per tick, encoded once per (codec, framing) and written as the same bytes
to every viewer (ARCHITECTURE.md invariant 6). A viewer that does not read fills its
send buffer and is disconnected by its link; it never holds the room up."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from tidings.bus.base import Bus, RoomEvent
from tidings.clock import Clock
from tidings.config import Settings
from tidings.domain.rooms import Lanes, RoomPost
from tidings.gateway.bounded import encoded_for
from tidings.protocol import close
from tidings.protocol.frames import RoomFrame, RoomMsg

if TYPE_CHECKING:
    from tidings.session.session import Session

log = logging.getLogger(__name__)
SLOW_CHECK_EVERY = 10  # ticks between looks at the viewers' send buffers
LATE_READ_S = 0.002  # the least pause between two ticks (for the loop to read posts)


def _write_all(viewers: dict[Session, Any], data: bytes, limit: int, check: bool) -> None:
    """The hot loop: the same bytes straight to every viewer's transport. With ``check``
    (about once a second) viewers whose send buffer is over ``limit`` are closed after
    the loop: a viewer that does not read costs at most a second of frames."""
    for t in viewers.values():
        t.write(data)
    if check:
        _close_slow(viewers, limit)


def _close_slow(viewers: dict[Session, Any], limit: int) -> None:
    slow = [s for s, t in viewers.items() if t.get_write_buffer_size() > limit]
    for s in slow:
        s.close(close.SLOW_CONSUMER, "send buffer full")


def _key(session: Session) -> tuple[str, str]:
    link = session.link
    return (link.codec.name, link.framing)


def _wire(p: RoomPost) -> RoomMsg:
    return RoomMsg(p.sender, p.kind, p.body, p.ts)


class Room:
    __slots__ = ("groups", "lanes", "name", "online_due", "ring_cache", "viewers")

    def __init__(self, name: str, lanes: Lanes) -> None:
        self.name = name
        self.lanes = lanes
        self.viewers: set[Session] = set()
        # The viewers by (codec, framing), each with its transport: each group gets one
        # encoding per tick, written in one tight loop.
        self.groups: dict[tuple[str, str], dict[Session, Any]] = {}
        self.online_due = 0.0
        self.ring_cache: tuple[int, dict[tuple[str, str], bytes]] = (-1, {})


class RoomHub:
    """The rooms with viewers on this node. With a ``bus``, it is told when a room gets
    its first viewer here and loses its last, so posts reach this node while it
    watches."""

    def __init__(
        self,
        clock: Clock,
        settings: Settings,
        rng: random.Random | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.clock = clock
        self.bus = bus
        self.s = settings
        self.tick_s = settings.room_tick_ms / 1000
        self.rooms: dict[str, Room] = {}
        self._rng = rng
        self._task: asyncio.Task[None] | None = None
        self.deliveries = 0  # statistics: posts written to viewers (post x viewer)
        self.frames = 0  # room frames written (frame x viewer)
        self.ticks = 0
        self.late_ticks = 0  # ticks that began more than a period after they were due
        self.tick_time_s = 0.0  # wall time spent in ticks

    # ------------------------------------------------------------------ membership

    def join(self, session: Session, name: str) -> int:
        """Put ``session`` in room ``name``; the room's online count here."""
        link: Any = session.link  # every link is a BoundedWriter: it has its transport
        room = self.rooms.get(name)
        if link.transport is None:  # the connection is gone already
            return 0 if room is None else len(room.viewers)
        if room is None:
            s = self.s
            lanes = Lanes(s.room_render_per_s, self.tick_s, s.room_ring_size, self._rng)
            room = self.rooms[name] = Room(name, lanes)
            if self.bus is not None:
                self.bus.watch_room(name)
        room.viewers.add(session)
        room.groups.setdefault(_key(session), {})[session] = link.transport
        session.rooms.add(name)
        return len(room.viewers)

    def greet(self, session: Session, name: str) -> None:
        """Write the room's ring of recent posts to a viewer that just joined (encoded
        once per ring version and codec, however many join)."""
        room = self.rooms.get(name)
        if room is None or not room.lanes.ring:
            return
        version, cache = room.ring_cache
        if version != room.lanes.ring_version:
            cache = {}
            room.ring_cache = (room.lanes.ring_version, cache)
        frame = RoomFrame(name, [_wire(p) for p in room.lanes.ring], recent=True)
        session.link.write(encoded_for(frame, session.link, cache))

    def leave(self, session: Session, name: str) -> None:
        session.rooms.discard(name)
        room = self.rooms.get(name)
        if room is not None:
            room.viewers.discard(session)
            group = room.groups.get(_key(session))
            if group is not None:
                group.pop(session, None)
            if not room.viewers:
                del self.rooms[name]  # what was pending is for nobody here
                if self.bus is not None:
                    self.bus.unwatch_room(name)

    def leave_all(self, session: Session) -> None:
        for name in list(session.rooms):
            self.leave(session, name)

    def stats(self) -> tuple[int, int, int, int, int]:
        """(viewers, ticks, late ticks, deliveries, ms spent in ticks) on this process."""
        viewers = sum(len(r.viewers) for r in self.rooms.values())
        busy = int(self.tick_time_s * 1000)
        return viewers, self.ticks, self.late_ticks, self.deliveries, busy

    def online(self, name: str) -> int:
        room = self.rooms.get(name)
        return 0 if room is None else len(room.viewers)

    # ------------------------------------------------------------------ posts and ticks

    def post(self, event: RoomEvent) -> None:
        room = self.rooms.get(event.room)
        if room is None:  # no viewer on this node
            return
        if event.kind == "like":
            room.lanes.like()
            return
        post = RoomPost(event.sender, event.kind, event.body, event.ts)
        if self.s.room_coalesce:
            room.lanes.post(post)
            return
        # Coalescing off: this post alone, now, to every viewer.
        room.lanes.remember(post)
        frame = RoomFrame(room.name, [_wire(post)], ts=self.clock.now_ms())
        self._send(room, frame, 1, False)

    def _send(self, room: Room, frame: RoomFrame, posts: int, check: bool) -> None:
        """``frame`` to every viewer of ``room``: encoded once per (codec, framing)."""
        for group in list(room.groups.values()):
            if not group:
                continue
            first = next(iter(group))
            data = encoded_for(frame, first.link, {})
            _write_all(group, data, self.s.send_buffer_bytes, check)
            self.frames += len(group)
            self.deliveries += posts * len(group)

    def tick(self, now: float) -> None:
        """Send every room's batch (and, when due, its online count)."""
        check = self.ticks % SLOW_CHECK_EVERY == 0
        self.ticks += 1
        now_ms = self.clock.now_ms()
        interval = self.s.room_online_interval_ms / 1000
        for room in list(self.rooms.values()):
            online = 0
            if now >= room.online_due:
                online = len(room.viewers)
                room.online_due = now + interval
            batch = room.lanes.take()
            if batch is None and not online:
                if check and not self.s.room_coalesce:
                    for group in list(room.groups.values()):
                        _close_slow(group, self.s.send_buffer_bytes)
                continue
            msgs = [] if batch is None else [_wire(p) for p in (*batch.high, *batch.low)]
            frame = RoomFrame(
                room.name,
                msgs,
                0 if batch is None else batch.likes,
                0 if batch is None else batch.dropped,
                online,
                ts=now_ms,
            )
            self._send(room, frame, len(msgs), check)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        # Ticks on a fixed schedule (the time a tick takes does not stretch the period);
        # a tick that is late by more than a period is skipped, not bunched. A late tick
        # still waits LATE_READ_S: the posts that came in while the last one was being
        # written must be read off their sockets first, or the tick goes out empty and
        # they wait a whole period more.
        due = self.clock.monotonic()
        while True:
            due += self.tick_s
            now = self.clock.monotonic()
            if due < now + LATE_READ_S:
                if now - due > self.tick_s:
                    self.late_ticks += 1
                due = now + LATE_READ_S
            await asyncio.sleep(due - now)
            t0 = time.perf_counter()
            try:
                self.tick(self.clock.monotonic())
            except Exception:
                log.exception("room tick failed")
            self.tick_time_s += time.perf_counter() - t0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
