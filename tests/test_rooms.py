"""Live rooms: lanes, sampling, likes, rate limits and the ring with an injected clock;
the gateway's per-tick fan-out (the same bytes to every viewer, slow viewers dropped);
and rooms over real sockets."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import msgspec
import pytest

from tests.conftest import Harness
from tests.rawclient import Raw
from tests.test_errors import err
from tests.test_http_api import call
from tidings.bus.base import RoomEvent as BusRoomEvent
from tidings.client import Client, RequestError, RoomEvent
from tidings.clock import SystemClock
from tidings.config import Settings
from tidings.domain.rooms import Lanes, RateLimits, RoomPost, check_room
from tidings.gateway.rooms import RoomHub
from tidings.protocol import close
from tidings.protocol.codec import Codec
from tidings.protocol.errors import TidingsError


def post(kind: str, i: int, who: str = "u") -> RoomPost:
    return RoomPost(who, kind, {"i": i}, 1000 + i)


# ------------------------------------------------------------------ sans-I/O rules


def test_high_lane_is_never_sampled_and_chat_fills_the_budget() -> None:
    """Per tick: every gift/admin post, then chat up to the render budget (sampled, kept
    in arrival order), likes as one count, and how many chat posts were dropped."""
    lanes = Lanes(render_per_s=50, tick_s=0.1, ring_size=0, rng=random.Random(1))
    assert lanes.budget == 5
    for i in range(3):
        lanes.post(post("gift", i))
    for i in range(40):
        lanes.post(post("chat", 100 + i))
    for _ in range(7):
        lanes.like()
    batch = lanes.take()
    assert batch is not None
    assert [p.body["i"] for p in batch.high] == [0, 1, 2]
    assert len(batch.low) == 2 and batch.dropped == 38
    assert [p.ts for p in batch.low] == sorted(p.ts for p in batch.low)
    assert batch.likes == 7
    assert lanes.take() is None  # nothing pending: no frame


def test_high_lane_above_budget_is_kept_whole() -> None:
    """A burst of gifts larger than the budget goes out whole; chat gets nothing then."""
    lanes = Lanes(render_per_s=50, tick_s=0.1, ring_size=0)
    for i in range(12):
        lanes.post(post("admin", i))
    lanes.post(post("chat", 99))
    batch = lanes.take()
    assert batch is not None and len(batch.high) == 12 and batch.low == []
    assert batch.dropped == 1


def test_quiet_room_is_not_sampled() -> None:
    """Below the render rate every chat post is delivered."""
    lanes = Lanes(render_per_s=50, tick_s=0.1, ring_size=0)
    for i in range(5):
        lanes.post(post("chat", i))
    batch = lanes.take()
    assert batch is not None and [p.body["i"] for p in batch.low] == [0, 1, 2, 3, 4]
    assert batch.dropped == 0


def test_chat_flood_keeps_memory_bounded_and_sample_uniform() -> None:
    """A flood of chat in one tick holds only `budget` posts (reservoir), and over many
    ticks every position in the tick is about equally likely to be kept."""
    lanes = Lanes(render_per_s=50, tick_s=0.1, ring_size=0, rng=random.Random(7))
    kept_first_half = 0
    for _ in range(400):
        for i in range(100):
            lanes.post(post("chat", i))
            assert len(lanes.low) <= lanes.budget
        batch = lanes.take()
        assert batch is not None and len(batch.low) == 5 and batch.dropped == 95
        kept_first_half += sum(1 for p in batch.low if p.body["i"] < 50)
    assert 0.4 < kept_first_half / 2000 < 0.6


def test_rate_limits_per_user_and_lane_with_injected_clock() -> None:
    """20 chat/s and 10 high/s per user, each lane and user on its own bucket."""
    limits = RateLimits(chat_per_s=20, high_per_s=10, likes_per_s=20)
    now = 100.0
    assert all(limits.check("a", "chat", now) == 0 for _ in range(20))
    wait = limits.check("a", "chat", now)
    assert wait == pytest.approx(0.05)
    assert limits.check("b", "chat", now) == 0  # another user
    assert all(limits.check("a", "gift", now) == 0 for _ in range(10))
    assert limits.check("a", "gift", now) == pytest.approx(0.1)
    assert limits.check("a", "chat", now + 0.05) == 0  # one token back
    assert limits.check("a", "chat", now + 0.05) > 0
    assert all(limits.check("a", "gift", now + 1.0) == 0 for _ in range(10))


def test_ring_keeps_the_last_posts_delivered() -> None:
    lanes = Lanes(render_per_s=1000, tick_s=0.1, ring_size=3)
    for i in range(5):
        lanes.post(post("chat", i))
    lanes.take()
    assert [p.body["i"] for p in lanes.ring] == [2, 3, 4]
    assert lanes.ring_version == 1


def test_room_ids() -> None:
    assert check_room("r:live-1") == "r:live-1"
    for bad in ("live", "r:", "r:bad id", "g:x", 5):
        with pytest.raises(TidingsError):
            check_room(bad)


# ------------------------------------------------------------------ gateway fan-out


class FakeTransport:
    def __init__(self, full: bool) -> None:
        self.writes: list[bytes] = []
        self.full = full  # a viewer that does not read: its buffer only grows

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return 1 << 30 if self.full else 0


class FakeLink:
    framing = "ws"
    peer = "test"
    max_buffer = 1 << 20

    def __init__(self, codec: Codec, full: bool = False) -> None:
        self.codec = codec
        self.transport = FakeTransport(full)
        self.writes = self.transport.writes

    def frame(self, payload: bytes) -> bytes:
        return b"F" + payload


class FakeSession:
    def __init__(self, hub: RoomHub, codec: Codec, full: bool = False) -> None:
        self.link = FakeLink(codec, full)
        self.rooms: set[str] = set()
        self.hub = hub
        self.closed: int | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = code
        self.hub.leave_all(self)  # type: ignore[arg-type]


class ManualTime:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def now_ms(self) -> int:
        return int(self.t * 1000)


def test_tick_writes_the_same_bytes_to_every_viewer() -> None:
    """One encoding per codec per tick, the very same bytes object to every viewer of
    that codec; a viewer whose buffer is full is dropped and the others still get it;
    the online count goes out every interval."""
    clock = ManualTime()
    settings = Settings(room_online_interval_ms=5_000, room_render_per_s=50, room_tick_ms=100)
    hub = RoomHub(clock, settings, random.Random(3))
    js, mp = Codec("json"), Codec("msgpack")
    viewers = [FakeSession(hub, js) for _ in range(5)] + [FakeSession(hub, mp) for _ in range(3)]
    slow = FakeSession(hub, js, full=True)
    for v in [*viewers, slow]:
        hub.join(v, "r:show")  # type: ignore[arg-type]
    hub.tick(clock.t)  # the first online count
    first = {id(v.link.writes[0]) for v in viewers}
    assert len(first) == 2  # one per codec
    assert "r:show" not in slow.rooms and hub.online("r:show") == 8
    assert slow.closed == close.SLOW_CONSUMER
    clock.t = 0.1
    hub.post(BusRoomEvent("r:show", "a", "gift", {"g": 1}, 1))
    hub.post(BusRoomEvent("r:show", "b", "chat", {"text": "hi"}, 2))
    hub.post(BusRoomEvent("r:show", "c", "like", {}, 3))
    hub.tick(clock.t)
    last = [v.link.writes[-1] for v in viewers]
    assert len({id(b) for b in last[:5]}) == 1 and len({id(b) for b in last[5:]}) == 1
    frame = msgspec.json.decode(last[0][1:])
    assert frame == {
        "t": "room",
        "room": "r:show",
        "msgs": [
            {"from": "a", "kind": "gift", "body": {"g": 1}, "ts": 1},
            {"from": "b", "kind": "chat", "body": {"text": "hi"}, "ts": 2},
        ],
        "likes": 1,
        "ts": 100,  # the tick's server time (the injected clock's)
    }
    assert hub.deliveries == 2 * 8
    clock.t = 0.2
    hub.tick(clock.t)  # nothing pending, online not due: no frame
    assert all(len(v.link.writes) == 2 for v in viewers)
    clock.t = 5.1
    hub.tick(clock.t)
    assert msgspec.json.decode(viewers[0].link.writes[-1][1:])["online"] == 8
    for v in viewers:
        hub.leave_all(v)  # type: ignore[arg-type]
    assert hub.rooms == {}


def test_coalescing_off_sends_each_post_alone_at_once() -> None:
    """``room_coalesce=False``: every post (chat beyond the render budget too) is its own
    frame, written at once as the same bytes to every viewer of a codec and kept in the
    ring; likes and the online count still wait for the tick."""
    clock = ManualTime()
    settings = Settings(room_coalesce=False, room_render_per_s=10, room_tick_ms=100)
    hub = RoomHub(clock, settings, random.Random(3))
    js = Codec("json")
    viewers = [FakeSession(hub, js) for _ in range(4)]
    for v in viewers:
        hub.join(v, "r:live")  # type: ignore[arg-type]
    clock.t = 0.05
    for i in range(5):  # five times the render budget of one tick (1 post)
        hub.post(BusRoomEvent("r:live", "a", "chat", {"n": i}, i))
    hub.post(BusRoomEvent("r:live", "b", "like", {}, 9))
    for v in viewers:
        assert len(v.link.writes) == 5
    assert all(v.link.writes[2] is viewers[0].link.writes[2] for v in viewers)
    frames = [msgspec.json.decode(w[1:]) for w in viewers[0].link.writes]
    assert [f["msgs"][0]["body"]["n"] for f in frames] == [0, 1, 2, 3, 4]
    assert all(len(f["msgs"]) == 1 and f["ts"] == 50 and "dropped" not in f for f in frames)
    assert hub.deliveries == 5 * 4
    clock.t = 0.1
    hub.tick(clock.t)  # the likes and the first online count, no posts again
    tick = msgspec.json.decode(viewers[0].link.writes[-1][1:])
    assert tick == {"t": "room", "room": "r:live", "likes": 1, "online": 4, "ts": 100}
    assert [p.body["n"] for p in hub.rooms["r:live"].lanes.ring] == [0, 1, 2, 3, 4]
    slow = FakeSession(hub, js, full=True)
    hub.join(slow, "r:live")  # type: ignore[arg-type]
    for _ in range(10):  # the buffers are looked at every 10th tick
        clock.t += 0.1
        hub.tick(clock.t)
    assert slow.closed == close.SLOW_CONSUMER and hub.online("r:live") == 4


async def test_tick_scheduler_keeps_its_period_and_skips_late_ticks() -> None:
    """The real tick loop: ticks on a fixed period; after the loop was blocked for
    several periods one late tick runs (counted), not a burst of the missed ones."""
    hub = RoomHub(SystemClock(), Settings(room_tick_ms=20))
    v = FakeSession(hub, Codec("json"))
    hub.join(v, "r:t")  # type: ignore[arg-type]
    hub.start()
    try:
        await asyncio.sleep(0.205)
        assert 5 <= hub.ticks <= 11, hub.ticks
        hub.post(BusRoomEvent("r:t", "a", "gift", {}, 1))
        await asyncio.sleep(0.045)
        assert any(b'"kind":"gift"' in w for w in v.link.writes)
        before, late = hub.ticks, hub.late_ticks
        time.sleep(0.15)  # noqa: ASYNC251 (the loop is blocked for 7 periods, on purpose)
        await asyncio.sleep(0.012)
        assert hub.ticks - before <= 2, (before, hub.ticks)
        assert hub.late_ticks == late + 1
        await asyncio.sleep(0.1)
        assert 3 <= hub.ticks - before <= 8
    finally:
        await hub.stop()


def test_tick_setting_is_bounded() -> None:
    for bad in (0, 101, -5):
        with pytest.raises(ValueError, match="room_tick_ms"):
            Settings(room_tick_ms=bad)
    assert Settings(room_tick_ms=1).room_tick_ms == 1


def test_posts_for_rooms_without_viewers_here_are_dropped() -> None:
    hub = RoomHub(ManualTime(), Settings())
    hub.post(BusRoomEvent("r:empty", "a", "gift", {}, 1))
    assert hub.rooms == {}


# ------------------------------------------------------------------ over sockets


async def viewer(h: Harness, uid: str, codec: str = "json") -> Raw:
    raw = await Raw.ws(h.ws_url, codec)
    assert (await raw.login(await h.token(uid)))["t"] == "ready"
    return raw


async def frames_until(raw: Raw, pred: Any, timeout: float = 3.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def loop() -> list[dict[str, Any]]:
        while True:
            f = await raw.recv()
            assert f is not None, "connection closed"
            seen.append(f)
            if pred(f):
                return seen

    return await asyncio.wait_for(loop(), timeout)


async def test_room_over_websocket(harness: Harness) -> None:
    """Viewers join, posts arrive in tick frames (gifts first, likes counted), a late
    joiner is greeted with the recent posts, leaving stops delivery, the backend posts
    admin messages, and bad requests get clear errors."""
    h = harness
    a = await viewer(h, "alice")
    b = await viewer(h, "bob", "msgpack")
    await a.send({"t": "join", "id": 2, "room": "r:show"})
    assert (await a.until("joined")) == {"t": "joined", "id": 2, "room": "r:show", "online": 1}
    await b.send({"t": "join", "id": 2, "room": "r:show"})
    assert (await b.until("joined"))["online"] == 2
    await a.send({"t": "rsend", "id": 3, "room": "r:show", "body": {"text": "hello"}})
    assert (await a.until("ok"))["id"] == 3
    await a.send({"t": "rsend", "room": "r:show", "kind": "gift", "body": {"rose": 1}})
    await a.send({"t": "rsend", "room": "r:show", "kind": "like"})
    got = await frames_until(b, lambda f: f["t"] == "room" and f.get("likes"))
    msgs = [m for f in got if f["t"] == "room" for m in f.get("msgs", [])]
    assert [(m["from"], m["kind"]) for m in msgs] == [("alice", "chat"), ("alice", "gift")] or [
        (m["from"], m["kind"]) for m in msgs
    ] == [("alice", "gift"), ("alice", "chat")]
    st, _ = await call(h, "POST", "/v1/rooms/show/messages", {"body": {"text": "be nice"}})
    assert st == 202
    got = await frames_until(
        a, lambda f: f["t"] == "room" and any(m["kind"] == "admin" for m in f.get("msgs", []))
    )
    (admin,) = [m for m in got[-1]["msgs"] if m["kind"] == "admin"]
    assert (admin["from"], admin["body"]) == ("server", {"text": "be nice"})
    st, info = await call(h, "GET", "/v1/rooms/r:show")
    assert (st, info) == (200, {"room": "r:show", "online": 2})
    late = await viewer(h, "carol")
    await late.send({"t": "join", "id": 2, "room": "r:show"})
    await late.until("joined")
    ring = await late.until("room")
    assert ring["recent"] is True
    assert [m["kind"] for m in ring["msgs"]][-1] == "admin" and len(ring["msgs"]) == 3
    await b.send({"t": "leave", "id": 5, "room": "r:show"})
    assert (await b.until("ok"))["id"] == 5
    await call(h, "POST", "/v1/rooms/show/messages", {"body": {"text": "again"}})
    await late.until("room")
    with pytest.raises(TimeoutError):
        await b.until("room", timeout=0.4)
    # Errors: not in the room, bad ids, bad kinds, oversize bodies, too many rooms.
    await b.send({"t": "rsend", "id": 6, "room": "r:show", "body": {"text": "x"}})
    err(await b.until("error"), "forbidden", 6)
    await b.send({"t": "join", "id": 7, "room": "show"})
    err(await b.until("error"), "invalid", 7)
    await a.send({"t": "rsend", "id": 8, "room": "r:show", "kind": "admin", "body": {}})
    err(await a.until("error"), "invalid", 8)
    await a.send({"t": "rsend", "id": 9, "room": "r:show", "body": {"text": "x" * 2000}})
    err(await a.until("error"), "too_large", 9)
    for i in range(5):
        await b.send({"t": "join", "id": 20 + i, "room": f"r:x{i}"})
        await b.until("joined")
    await b.send({"t": "join", "id": 30, "room": "r:x9"})
    err(await b.until("error"), "forbidden", 30)
    st, _ = await call(h, "POST", "/v1/rooms/show/messages", {"kind": "like", "body": {}})
    assert st == 400
    for r in (a, b, late):
        await r.close()
    await asyncio.sleep(0.1)
    assert h.server.hub.rooms is not None and h.server.hub.rooms.rooms == {}


async def test_room_rate_limit_over_websocket(make_server: Any) -> None:
    """Past 20 chat posts a second a viewer gets `rate_limited` with the wait; the
    high lane has its own 10/s."""
    h = await make_server(rate_per_s=1000, rate_burst=1000)
    a = await viewer(h, "alice")
    await a.send({"t": "join", "id": 1, "room": "r:fast"})
    await a.until("joined")
    for i in range(20):
        await a.send({"t": "rsend", "room": "r:fast", "body": {"i": i}})
    await a.send({"t": "rsend", "id": 50, "room": "r:fast", "body": {"i": 20}})
    got = await frames_until(a, lambda f: f["t"] == "error")
    e = got[-1]
    err(e, "rate_limited", 50)
    assert 0 < e["retry_after_ms"] <= 100
    await a.send({"t": "rsend", "id": 51, "room": "r:fast", "kind": "gift", "body": {}})
    assert (await a.until("ok"))["id"] == 51
    await a.close()


# ------------------------------------------------------------------ the Python SDK


async def room_posts(c: Client, want: Any, timeout: float = 5.0) -> list[RoomEvent]:
    """The client's RoomEvents until one holds a post ``want(post)`` accepts."""
    seen: list[RoomEvent] = []

    async def loop() -> list[RoomEvent]:
        async for ev in c.events():
            if isinstance(ev, RoomEvent):
                seen.append(ev)
                if any(want(m) for m in ev.msgs):
                    return seen
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(loop(), timeout)


async def test_sdk_viewer_and_poster_get_each_others_posts(harness: Harness) -> None:
    """Two SDK clients in a room get each other's posts as RoomEvents; a late joiner's
    first event is the recent posts; likes are counted, not posted."""
    h = harness
    alice = await h.client("alice")
    bob = await h.client("bob", codec="json")
    joined = await alice.join_room("r:sdk")
    assert (joined.room, joined.online) == ("r:sdk", 1)
    assert (await bob.join_room("r:sdk")).online == 2
    assert alice.rooms == {"r:sdk"}
    await alice.room_send("r:sdk", text="hi bob")
    got = await room_posts(bob, lambda m: m.sender == "alice")
    (post,) = [m for ev in got for m in ev.msgs]
    assert (post.kind, post.body) == ("chat", {"text": "hi bob"})
    assert (got[-1].room, got[-1].recent) == ("r:sdk", False) and got[-1].ts > 0
    await bob.room_send("r:sdk", kind="gift", body={"rose": 1})
    await bob.room_send("r:sdk", kind="like")
    got = await room_posts(alice, lambda m: m.sender == "bob")
    assert [(m.sender, m.kind, m.body) for ev in got for m in ev.msgs] == [
        ("alice", "chat", {"text": "hi bob"}),
        ("bob", "gift", {"rose": 1}),
    ]
    carol = await h.client("carol")
    await carol.join_room("r:sdk")
    got = await room_posts(carol, lambda m: m.kind == "gift")
    assert got[0].recent and len(got[0].msgs) == 2
    await bob.leave_room("r:sdk")
    assert bob.rooms == set()
    await asyncio.sleep(0.05)
    assert h.server.hub.rooms is not None and h.server.hub.rooms.online("r:sdk") == 2


async def test_sdk_joins_rooms_again_after_a_dropped_connection(harness: Harness) -> None:
    """A dropped connection leaves the room on the server; the client joins it again
    when it reconnects and gets the posts made after that. A room left is not rejoined."""
    h = harness
    rooms = h.server.hub.rooms
    assert rooms is not None
    viewer_ = await h.client("alice")
    poster = await h.client("bob")
    await viewer_.join_room("r:again")
    await viewer_.join_room("r:left")
    await viewer_.leave_room("r:left")
    await poster.join_room("r:again")
    viewer_.abort_connection()
    deadline = asyncio.get_running_loop().time() + 5
    while viewer_.connects < 2 or rooms.online("r:again") < 2:
        assert asyncio.get_running_loop().time() < deadline, "not joined again"
        await asyncio.sleep(0.02)
    assert rooms.online("r:left") == 0 and viewer_.rooms == {"r:again"}
    await poster.room_send("r:again", text="welcome back")
    got = await room_posts(viewer_, lambda m: m.body == {"text": "welcome back"})
    assert got[-1].room == "r:again"


async def test_sdk_room_errors(harness: Harness) -> None:
    """Posting to a room not joined is `forbidden`, bad room ids and kinds `invalid`, a
    post over the rate `rate_limited` (raised, not retried); none of them is remembered."""
    h = harness
    c = await h.client("alice")
    with pytest.raises(RequestError) as exc:
        await c.room_send("r:nope", text="hello?")
    assert exc.value.code == "forbidden"
    with pytest.raises(RequestError) as exc:
        await c.join_room("nope")
    assert exc.value.code == "invalid" and c.rooms == set()
    await c.join_room("r:ok")
    with pytest.raises(RequestError) as exc:
        await c.room_send("r:ok", kind="admin", body={})
    assert exc.value.code == "invalid"
    await c.leave_room("r:ok")
    with pytest.raises(RequestError) as exc:
        await c.room_send("r:ok", text="gone")
    assert exc.value.code == "forbidden"
