"""Live-room rules, sans I/O: priority lanes, likes aggregated into counts, sampling of
the low lane to what a viewer can render, per-user rate limits, and the ring of recent
messages. Time comes in as ``now`` (seconds, monotonic), so every rule is tested with an
injected clock.

Rooms are at-most-once by design: a viewer gets what is posted while it is in the room;
the high lane (gifts, admin messages) is never sampled away, the chat lane is sampled
down when the room outruns ``render_per_s``, likes travel as counts.
"""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tidings.protocol.errors import TidingsError

ROOM_PREFIX = "r:"
_ROOM_RE = re.compile(r"^r:[A-Za-z0-9._-]{1,64}$")
HIGH_KINDS = frozenset({"gift", "admin"})  # never sampled away
LOW_KINDS = frozenset({"chat"})
CLIENT_KINDS = frozenset({"chat", "gift", "like"})  # `admin` comes from the server API


def check_room(room: object) -> str:
    if not isinstance(room, str) or not _ROOM_RE.fullmatch(room):
        raise TidingsError("invalid", "a room id is r: and 1-64 of A-Z a-z 0-9 . _ -")
    return room


@dataclass(frozen=True, slots=True)
class RoomPost:
    """One message posted to a room (what viewers get in a `room` frame)."""

    sender: str
    kind: str
    body: dict[str, Any]
    ts: int  # server time, UTC ms


@dataclass(slots=True)
class TickBatch:
    high: list[RoomPost]
    low: list[RoomPost]
    likes: int
    dropped: int  # low-lane posts sampled away this tick


class Bucket:
    """A token bucket: ``rate`` per second, ``burst`` at most."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1 - 1e-9:  # (float time: a full token less a rounding error)
            self.tokens = max(0.0, self.tokens - 1)
            return 0.0
        return (1 - self.tokens) / self.rate


def lane_of(kind: str) -> str:
    """The rate-limit lane of a post kind: ``like``, ``high`` or ``chat``."""
    return "like" if kind == "like" else "high" if kind in HIGH_KINDS else "chat"


@dataclass
class RateLimits:
    """Per-user limits of one room on this node (token buckets). In a cluster the same
    rates also hold across nodes, counted per second by the bus (services/rooms.py)."""

    chat_per_s: float = 20.0
    high_per_s: float = 10.0
    likes_per_s: float = 20.0
    _buckets: dict[tuple[str, str], Bucket] = field(default_factory=dict)

    def rate(self, lane: str) -> float:
        return {"like": self.likes_per_s, "high": self.high_per_s}.get(lane, self.chat_per_s)

    def check(self, user: str, kind: str, now: float) -> float:
        """0 if ``user`` may post ``kind`` now, else the seconds to wait."""
        lane = lane_of(kind)
        key = (user, lane)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 100_000:  # idle users' buckets are full anyway
                self._buckets.clear()
            rate = self.rate(lane)
            bucket = self._buckets[key] = Bucket(rate, max(rate, 1.0), now)
        return bucket.take(now)


class Lanes:
    """What a room has pending for its next tick, and the ring of recent posts."""

    def __init__(
        self,
        render_per_s: float,
        tick_s: float,
        ring_size: int = 20,
        rng: random.Random | None = None,
    ) -> None:
        self.budget = max(1, round(render_per_s * tick_s))  # posts a viewer gets per tick
        self.high: list[RoomPost] = []
        self.low: list[RoomPost] = []
        self.low_seen = 0  # low posts this tick, kept or not (reservoir sampling)
        self.likes = 0
        self.ring: deque[RoomPost] = deque(maxlen=ring_size) if ring_size > 0 else deque(maxlen=0)
        self.ring_version = 0
        self._rng = rng or random.Random()

    def post(self, p: RoomPost) -> None:
        if p.kind in HIGH_KINDS:
            self.high.append(p)
            return
        # Reservoir of `budget` low posts: uniform over the tick whatever arrives, and
        # memory bounded in a flood.
        self.low_seen += 1
        if len(self.low) < self.budget:
            self.low.append(p)
        else:
            i = self._rng.randrange(self.low_seen)
            if i < self.budget:
                self.low[i] = p

    def like(self, n: int = 1) -> None:
        self.likes += n

    def remember(self, p: RoomPost) -> None:
        """Put a post that went out on its own (coalescing off) in the ring."""
        if self.ring.maxlen:
            self.ring.append(p)
            self.ring_version += 1

    @property
    def pending(self) -> bool:
        return bool(self.high or self.low or self.likes)

    def take(self) -> TickBatch | None:
        """The tick's batch: every high post, then as many low posts (in arrival order)
        as the render budget leaves room for, and the likes counted."""
        if not self.pending:
            return None
        high, low = self.high, self.low
        room = max(0, self.budget - len(high))
        if len(low) > room:
            keep = sorted(self._rng.sample(range(len(low)), room))
            low = [low[i] for i in keep]
        low.sort(key=lambda p: p.ts)
        batch = TickBatch(high, low, self.likes, self.low_seen - len(low))
        self.high, self.low, self.low_seen, self.likes = [], [], 0, 0
        if self.ring.maxlen and (high or low):
            self.ring.extend(high)
            self.ring.extend(low)
            self.ring_version += 1
        return batch
