"""Presence: online / offline / last seen for 1:1 contacts, batched, with a privacy switch."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness
from tidings.client import PresenceChanged, RequestError


async def next_presence(client: Any, timeout: float = 3.0) -> PresenceChanged:
    async def get() -> PresenceChanged:
        async for ev in client.events():
            if isinstance(ev, PresenceChanged):
                return ev
        raise AssertionError("stream ended")

    return await asyncio.wait_for(get(), timeout)


async def test_contacts_see_online_and_offline(make_server: Any) -> None:
    """A contact going online and offline is pushed (offline with last seen); strangers
    are not told, and a second device of an online user changes nothing."""
    h: Harness = await make_server(presence_batch_ms=100)
    a = await h.client("alice")
    stranger = await h.client("stranger")
    b = await h.client("bob")
    await b.send(to="alice", text="hi")  # now they are contacts
    await b.close()
    ev = await next_presence(a)
    assert [(p.user, p.online) for p in ev.users] == [("bob", False)]
    assert ev.users[0].last_seen > 0
    b2 = await h.client("bob", "b2")
    ev = await next_presence(a)
    assert [(p.user, p.online, p.last_seen) for p in ev.users] == [("bob", True, 0)]
    await h.client("bob", "b3")
    with pytest.raises(TimeoutError):
        await next_presence(a, timeout=0.4)
    with pytest.raises(TimeoutError):
        await next_presence(stranger, timeout=0.2)
    assert [(p.user, p.online) for p in await a.presence(["BOB", "stranger"])] == [("bob", True)]
    await b2.close()


async def test_privacy_switch(make_server: Any) -> None:
    """A user who hides presence shows as offline without last seen, and is not pushed."""
    h: Harness = await make_server(presence_batch_ms=100)
    a = await h.client("alice")
    b = await h.client("bob")
    await b.send(to="alice", text="hi")
    await b.show_presence(False)
    (item,) = await a.presence(["bob"])
    assert (item.online, item.last_seen) == (False, 0)
    await b.close()
    with pytest.raises(TimeoutError):
        await next_presence(a, timeout=0.4)
    with pytest.raises(RequestError) as err:
        await a.presence([f"u{i}" for i in range(101)])
    assert err.value.code == "too_large"
