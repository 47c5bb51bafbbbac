"""Per-platform login policy: a newer session kicks older ones with a `kicked` frame."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness
from tests.rawclient import Raw
from tidings.client import Disconnected
from tidings.protocol import close


async def login(h: Harness, uid: str, device: str, platform: str) -> Raw:
    raw = await Raw.ws(h.ws_url)
    await h.server.accounts.put_user(uid)
    token = (await h.server.accounts.issue_token(uid, device, platform)).token
    assert (await raw.login(token))["t"] == "ready"
    return raw


async def still_open(raw: Raw) -> bool:
    await raw.send({"t": "ping", "id": 99})
    frame = await raw.recv()
    return frame is not None and frame.get("t") == "pong"


async def test_one_per_platform(make_server: Any) -> None:
    """A second desktop kicks the first (kicked frame, then 4004); the phone stays."""
    h: Harness = await make_server(login_policy="one_per_platform")
    desk1 = await login(h, "alice", "desk-1", "desktop")
    phone = await login(h, "alice", "phone-1", "ios")
    desk2 = await login(h, "alice", "desk-2", "desktop")
    frame = await desk1.recv()
    assert frame == {
        "t": "kicked",
        "device": "desk-2",
        "platform": "desktop",
        "reason": "signed in on another desktop device",
    }
    assert await desk1.closed() == close.KICKED
    assert await still_open(phone) and await still_open(desk2)


async def test_one_total(make_server: Any) -> None:
    """Under one_total any new device kicks every other device of the user."""
    h: Harness = await make_server(login_policy="one_total")
    phone = await login(h, "alice", "phone-1", "ios")
    web = await login(h, "alice", "tab-1", "web")
    assert (await phone.recv())["t"] == "kicked"
    assert await phone.closed() == close.KICKED
    assert await still_open(web)
    other_user = await login(h, "bob", "b", "ios")
    assert await still_open(other_user) and await still_open(web)


async def test_unlimited_by_default(harness: Harness) -> None:
    """The default policy lets every device stay online."""
    a = await login(harness, "alice", "d1", "desktop")
    b = await login(harness, "alice", "d2", "desktop")
    assert await still_open(a) and await still_open(b)


async def test_sdk_does_not_fight_back(make_server: Any) -> None:
    """A kicked SDK client reports a final disconnect and does not reconnect."""
    h: Harness = await make_server(login_policy="one_total")
    c = await h.client("alice", "old")
    await h.client("alice", "new")

    async def final() -> Disconnected:
        async for ev in c.events():
            if isinstance(ev, Disconnected):
                return ev
        raise AssertionError

    ev = await asyncio.wait_for(final(), 3)
    assert ev.final and ev.code == close.KICKED
    await asyncio.sleep(0.3)
    assert not c.ready.is_set()


def test_unknown_policy_is_refused() -> None:
    """A misspelt login policy is a configuration error, not a silent default."""
    from tidings.config import Settings

    with pytest.raises(ValueError):
        Settings(login_policy="one_per_platfrom")


async def test_a_late_announcement_of_an_older_login_kicks_nobody_newer(make_server: Any) -> None:
    """On a cluster the announcement of a login can arrive after a later login on another
    node: it must not kick that newer session (the newest login wins, whatever the
    order the announcements travel in); a newer announcement still kicks."""
    from tidings.bus.base import SessionStarted

    h: Harness = await make_server(login_policy="one_total")
    newer = await login(h, "dora", "desk", "desktop")
    session = next(iter(h.server.hub.by_user["dora"]))
    h.server.hub.handle(
        SessionStarted("dora", "phone", "ios", "older-session", session.ready_ms - 1_000)
    )
    assert await still_open(newer)
    h.server.hub.handle(
        SessionStarted("dora", "phone", "ios", "newest-session", session.ready_ms + 1_000)
    )
    frame = await newer.recv()
    assert frame is not None and frame["t"] == "kicked"
    assert await newer.closed() == close.KICKED
