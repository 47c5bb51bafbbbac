"""Live rooms: checking a post (kind, body, the poster's rate limits) and publishing it
to every node with viewers in the room. Membership and fan-out live in the gateway
(`gateway/rooms.py`): nothing of a room is stored.

Rate limits are token buckets in this process's memory; when the bus is shared by
several nodes (`Bus.shared`) a post that passes them is also counted against the same
rate per second across the cluster (`Bus.allow`: no round trip of its own, the count
rides in the pipeline that publishes the post), so a user posting through devices on
several nodes gets no more than one node's share."""

from __future__ import annotations

from typing import Any

import msgspec

from tidings.bus.base import Bus, RoomEvent
from tidings.clock import Clock
from tidings.config import Settings
from tidings.domain.rooms import CLIENT_KINDS, RateLimits, check_room, lane_of
from tidings.protocol.codec import check_json_model
from tidings.protocol.errors import TidingsError

_pack = msgspec.msgpack.Encoder().encode
SERVER_KINDS = frozenset({"admin", "gift", "chat"})


class Rooms:
    def __init__(self, bus: Bus, clock: Clock, settings: Settings) -> None:
        self.bus = bus
        self.clock = clock
        self.settings = settings
        self._limits: dict[str, RateLimits] = {}

    def _limits_of(self, room: str) -> RateLimits:
        limits = self._limits.get(room)
        if limits is None:
            if len(self._limits) > 10_000:
                self._limits.clear()
            s = self.settings
            limits = RateLimits(s.room_chat_per_s, s.room_high_per_s, s.room_likes_per_s)
            self._limits[room] = limits
        return limits

    def post(
        self, uid: str, room: str, kind: str, body: dict[str, Any], server: bool = False
    ) -> None:
        """Check and publish a post; raises TidingsError (`invalid`, `too_large`,
        `rate_limited` with the wait)."""
        check_room(room)
        if kind not in (SERVER_KINDS if server else CLIENT_KINDS):
            raise TidingsError("invalid", f"unknown room post kind {kind[:32]!r}")
        if not check_json_model(body):
            raise TidingsError("invalid", "body must hold only JSON values")
        if len(_pack(body)) > self.settings.room_max_body_bytes:
            raise TidingsError("too_large", f"body over {self.settings.room_max_body_bytes} bytes")
        if not server:
            limits = self._limits_of(room)
            wait = limits.check(uid, kind, self.clock.monotonic())
            if not wait and self.bus.shared:
                lane = lane_of(kind)
                per_s = max(1, round(limits.rate(lane)))
                wait = self.bus.allow(f"room:{room}:{lane}:{uid}", per_s, 1000) / 1000
            if wait:
                raise TidingsError(
                    "rate_limited", f"too many {kind} posts", retry_after_ms=int(wait * 1000) + 1
                )
        self.bus.publish(
            RoomEvent(room, uid, kind, body if kind != "like" else {}, self.clock.now_ms())
        )
