"""Unread counts, read receipts and the conversation list over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness, next_message
from tests.rawclient import Raw
from tidings.client import ReadReceipt, RequestError

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores


async def next_receipt(client: Any, timeout: float = 3.0) -> ReadReceipt:
    async def get() -> ReadReceipt:
        async for ev in client.events():
            if isinstance(ev, ReadReceipt):
                return ev
        raise AssertionError("stream ended")

    return await asyncio.wait_for(get(), timeout)


async def test_unread_read_receipts_and_other_devices(harness: Harness) -> None:
    """Bob's unread counts what he has not read; reading on one device updates his other
    device (with the unread left) and shows Alice "read up to N" (without it)."""
    a = await harness.client("alice")
    b1 = await harness.client("bob", "b1")
    b2 = await harness.client("bob", "b2", transport="tcp")
    for i in range(3):
        await a.send(to="bob", text=f"m{i}")
    convs, badge = await b1.conversations()
    assert badge == 3
    (item,) = convs
    assert (item.conv, item.unread, item.read_seq, item.peer) == ("d:alice|bob", 3, 0, "alice")
    assert item.last is not None and item.last.body == {"text": "m2"}
    answer = await b1.mark_read("d:alice|bob", 2)
    assert (answer.seq, answer.unread) == (2, 1)
    own = await next_receipt(b2)
    assert own == ReadReceipt("d:alice|bob", "bob", 2, 1)
    receipt = await next_receipt(a)
    assert receipt == ReadReceipt("d:alice|bob", "bob", 2, None)
    alice_view, alice_badge = await a.conversations()
    assert alice_view[0].peer_read_seq == 2 and alice_view[0].unread == 0 and alice_badge == 0
    assert (await b1.mark_read("d:alice|bob", 1)).seq == 2  # never backwards
    with pytest.raises(TimeoutError):
        await next_receipt(a, timeout=0.3)  # no change, no receipt


async def test_sending_reads_and_silent_messages_do_not_count(harness: Harness) -> None:
    """A reply marks the conversation read for its sender; silent messages never count."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    await a.send(to="bob", text="loud")
    await a.send(to="bob", text="quiet", flags=1)
    await a.send(to="bob", text="uncounted", flags=2)
    convs, badge = await b.conversations()
    assert convs[0].unread == 1 and badge == 1
    for _ in range(3):
        await next_message(b)
    await b.send(to="alice", text="reply")
    convs, badge = await b.conversations()
    assert (convs[0].unread, convs[0].read_seq, badge) == (0, 4, 0)
    convs, _ = await a.conversations()
    assert convs[0].peer_read_seq == 4 and convs[0].unread == 1


async def test_conversation_list_newest_first(harness: Harness) -> None:
    """The list is ordered by last activity and the badge covers every conversation."""
    me = await harness.client("me")
    for peer in ("p1", "p2", "p3"):
        c = await harness.client(peer)
        await c.send(to="me", text=f"from {peer}")
        await asyncio.sleep(0.005)
    p1 = harness.clients[1]
    await p1.send(to="me", text="again")
    convs, badge = await me.conversations(limit=2)
    assert [c.peer for c in convs] == ["p1", "p3"] and badge == 4


async def test_read_errors(harness: Harness) -> None:
    """Reading someone else's conversation is `forbidden`; seq 0 is `invalid`."""
    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(await harness.token("mallory")))["t"] == "ready"
    await raw.send({"t": "read", "id": 1, "conv": "d:alice|bob", "seq": 3})
    frame = await raw.recv()
    assert (frame["t"], frame["code"], frame["id"]) == ("error", "forbidden", 1)
    await raw.send({"t": "read", "id": 2, "conv": "d:mallory|x", "seq": 0})
    frame = await raw.recv()
    assert (frame["code"], frame["id"]) == ("invalid", 2)
    await raw.send({"t": "read", "id": 3, "conv": "g:1", "seq": 1})
    frame = await raw.recv()
    assert (frame["code"], frame["id"]) == ("not_found", 3)
    a = await harness.client("alice")
    with pytest.raises(RequestError) as err:
        await a.conversations(limit=0)
    assert err.value.code == "invalid"
    await raw.close()


async def test_settings_reach_other_devices_and_shape_the_list(harness: Harness) -> None:
    """Mute, pin, hide and draft: the other device is told; the list orders pinned first,
    leaves muted conversations out of the badge, and hides until the next message."""
    from tidings.client import SettingsChanged

    me1 = await harness.client("me", "phone")
    me2 = await harness.client("me", "desktop", transport="tcp")
    p1 = await harness.client("p1")
    p2 = await harness.client("p2")
    await p1.send(to="me", text="one")
    await asyncio.sleep(0.005)
    await p2.send(to="me", text="two")
    st = await me1.settings("d:me|p1", pinned=True, draft="typing a rep")
    assert st.pinned and st.draft == "typing a rep" and not st.muted

    async def next_settings() -> SettingsChanged:
        async for ev in me2.events():
            if isinstance(ev, SettingsChanged):
                return ev
        raise AssertionError

    ev = await asyncio.wait_for(next_settings(), 3)
    assert ev == SettingsChanged("d:me|p1", False, True, False, "typing a rep")
    await me2.settings("d:me|p2", muted=True)
    convs, badge = await me1.conversations()
    assert [c.peer for c in convs] == ["p1", "p2"] and badge == 1
    assert convs[0].pinned and convs[0].draft == "typing a rep" and convs[1].muted
    await me1.settings("d:me|p2", hidden=True)
    convs, _ = await me2.conversations()
    assert [c.peer for c in convs] == ["p1"]
    await p2.send(to="me", text="ping again")
    convs, _ = await me2.conversations()
    assert [c.peer for c in convs] == ["p1", "p2"]
    with pytest.raises(RequestError) as err:
        await me1.settings("d:p1|p2", muted=True)
    assert err.value.code == "forbidden"
    with pytest.raises(RequestError) as err:
        await me1.settings("d:me|p1", draft="x" * 5000)
    assert err.value.code == "too_large"


async def test_offline_device_syncs_user_state(harness: Harness) -> None:
    """A device that was away learns, from sync, its user's reads and settings made on
    other devices and the other member's reads, then nothing more on the next sync."""
    from tidings.client import StatesSynced

    a = await harness.client("alice")
    b1 = await harness.client("bob", "b1")
    await b1.send(to="alice", text="for alice")
    for i in range(3):
        await a.send(to="bob", text=f"m{i}")
    b2 = await harness.client("bob", "b2")
    await b2.sync_now()
    await b2.close()
    await b1.mark_read("d:alice|bob", 3)  # bob read alice's first two on his phone
    await b1.settings("d:alice|bob", muted=True)
    await b1.send(to="alice", text="more")  # seq 5: moves bob's read position to 5
    await a.mark_read("d:alice|bob", 5)  # alice reads it: "read up to 5" for bob
    b2 = await harness.client("bob", "b2")

    async def states() -> StatesSynced:
        async for ev in b2.events():
            if isinstance(ev, StatesSynced):
                return ev
        raise AssertionError

    ev = await asyncio.wait_for(states(), 3)
    (item,) = ev.convs
    assert (item.read_seq, item.unread, item.muted, item.peer_read_seq) == (5, 0, True, 5)
    before = b2.cv
    assert before > 0
    await b2.sync_now()
    assert b2.cv == before
