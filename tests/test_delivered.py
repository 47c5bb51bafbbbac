"""Delivered receipts of 1:1 conversations ("sent ✓ / delivered ✓✓ / read") over real
sockets: a device's ack moves its user's delivered position, written coalesced and told
to the other member's online devices; the conversation list and sync carry it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import Harness
from tests.conftest import test_settings as settings_in
from tests.rawclient import Raw
from tidings.app import Server
from tidings.client import Client, Delivered, ReadReceipt

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores

CONV = "d:alice|bob"


async def delivered_up_to(c: Client, seq: int, timeout: float = 3.0) -> Delivered:
    """The client's Delivered events until one reaches ``seq``."""

    async def get() -> Delivered:
        async for ev in c.events():
            if isinstance(ev, Delivered) and ev.seq >= seq:
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(get(), timeout)


async def no_delivered(c: Client, wait: float = 0.6) -> None:
    """No Delivered event reaches the client for ``wait`` seconds (3 flush intervals)."""
    with pytest.raises(TimeoutError):
        await delivered_up_to(c, 0, timeout=wait)


async def raw_bob(h: Harness, device: str = "rb") -> Raw:
    raw = await Raw.ws(h.ws_url, "json")
    assert (await raw.login(await h.token("bob", device)))["t"] == "ready"
    return raw


async def test_online_recipient_acks_and_the_sender_sees_delivered(harness: Harness) -> None:
    """Bob's device acks the pushes; Alice gets `delivered` up to the last one, apart from
    "read" (Bob read nothing), in her state and in the conversation list."""
    h = harness
    alice = await h.client("alice")
    bob = await h.client("bob")
    for i in range(3):
        await alice.send(to="bob", text=f"m{i}")
    ev = await delivered_up_to(alice, 3)
    assert ev == Delivered(CONV, "bob", 3)
    view = alice.state.convs[CONV]
    assert (view.peer_delivered_seq, view.peer_read_seq) == (3, 0)
    (item,), _ = await alice.conversations()
    assert (item.peer_delivered_seq, item.peer_read_seq) == (3, 0)
    await no_delivered(bob, 0.4)  # Bob is told nothing of his own acks


async def test_offline_recipient_delivers_when_it_comes_back(harness: Harness) -> None:
    """Nothing is delivered while Bob is offline; once his device syncs (and acks) Alice's
    online device is told, her device that was away learns it on its sync, and so does a
    new device's first sync."""
    h = harness
    a1 = await h.client("alice", "a1")
    a2 = await h.client("alice", "a2")
    bob = await h.client("bob", connect=False)
    await a1.send(to="bob", text="one")
    await a1.send(to="bob", text="two")
    await a2.sync_now()
    assert a2.held[CONV] == 2
    await a2.disconnect()
    await no_delivered(a1)
    (item,), _ = await a1.conversations()
    assert item.peer_delivered_seq == 0
    await bob.connect()
    assert await delivered_up_to(a1, 2) == Delivered(CONV, "bob", 2)
    (item,), _ = await a1.conversations()
    assert (item.peer_delivered_seq, item.peer_read_seq) == (2, 0)
    await a2.connect()
    await a2.sync_now()
    assert a2.state.convs[CONV].peer_delivered_seq == 2  # from the states of its sync
    fresh = await h.client("alice", "a3")
    await fresh.sync_now()
    view = fresh.state.convs[CONV]
    assert (view.peer_delivered_seq, view.peer_read_seq) == (2, 0)


async def test_bogus_acks_are_capped_or_ignored(harness: Harness) -> None:
    """An ack past the last seq delivers up to the last seq only; acks of other users'
    conversations, of notes to self and of junk ids deliver nothing and are not errors."""
    h = harness
    alice = await h.client("alice")
    await h.user("bob")
    await h.user("carol")
    await alice.send(to="bob", text="one")
    await alice.send(to="bob", text="two")
    await alice.send(to="carol", text="hi carol")
    rb = await raw_bob(h)
    for conv, seq in (("d:alice|carol", 1), ("d:bob|bob", 5), ("x" * 500, 1), ("", 1)):
        await rb.send({"t": "ack", "conv": conv, "seq": seq})
    await rb.send({"t": "ack", "conv": CONV, "seq": 2**64 - 1})
    ev = await delivered_up_to(alice, 1)
    assert ev == Delivered(CONV, "bob", 2)
    await no_delivered(alice)
    items, _ = await alice.conversations()
    delivered = {item.conv: item.peer_delivered_seq for item in items}
    assert delivered == {CONV: 2, "d:alice|carol": 0}
    await alice.send(to="bob", text="three")
    rb2 = await raw_bob(h, "rb2")
    await rb2.send({"t": "ack", "conv": CONV, "seq": 3})
    assert await delivered_up_to(alice, 3) == Delivered(CONV, "bob", 3)
    await rb.close()
    await rb2.close()


async def test_reading_and_sending_imply_delivered(harness: Harness) -> None:
    """A read moves the delivered position with it (no `delivered` event is needed: the
    read receipt says more), an ack below it then moves nothing, and a reply from Bob's
    device is delivered to Bob."""
    h = harness
    alice = await h.client("alice")
    await h.user("bob")
    for i in range(3):
        await alice.send(to="bob", text=f"m{i}")
    rb = await raw_bob(h)  # reads without acking
    await rb.send({"t": "read", "id": 2, "conv": CONV, "seq": 2})
    assert (await rb.until("read"))["seq"] == 2

    async def receipt() -> ReadReceipt:
        async for ev in alice.events():
            if isinstance(ev, ReadReceipt):
                return ev
        raise AssertionError("event stream ended")

    assert (await asyncio.wait_for(receipt(), 3)).seq == 2
    view = alice.state.convs[CONV]
    assert (view.peer_read_seq, view.peer_delivered_seq) == (2, 2)
    (item,), _ = await alice.conversations()
    assert (item.peer_read_seq, item.peer_delivered_seq) == (2, 2)
    await rb.send({"t": "ack", "conv": CONV, "seq": 2})
    await no_delivered(alice)
    await rb.send({"t": "send", "id": 3, "cid": "r1", "to": "alice", "body": {"text": "ok"}})
    assert (await rb.until("sent"))["seq"] == 4
    (item,), _ = await alice.conversations()
    assert (item.peer_read_seq, item.peer_delivered_seq) == (4, 4)
    await rb.close()


async def test_group_acks_deliver_nothing(harness: Harness) -> None:
    """Groups have receipts instead: their acks are not even noted, and no `delivered`
    event or position comes of them."""
    h = harness
    alice = await h.client("alice")
    bob = await h.client("bob")
    done = await alice.create_group(["bob"], "trip")
    for i in range(2):
        await alice.send(conv=done.conv, text=f"g{i}")
    deadline = asyncio.get_running_loop().time() + 3
    while bob.held.get(done.conv, 0) < done.seq + 2:
        assert asyncio.get_running_loop().time() < deadline, "bob did not get the entries"
        await asyncio.sleep(0.02)
    await no_delivered(alice)
    assert h.server.messaging.delivered.noted == 0
    (item,), _ = await alice.conversations()
    assert (item.conv, item.peer_delivered_seq) == (done.conv, 0)


async def test_delivered_positions_survive_a_restart(tmp_path: Path) -> None:
    """What is pending is written at shutdown, and stored positions outlive the process."""
    settings = settings_in(str(tmp_path / "data"), delivered_flush_ms=60_000)
    server = Server(settings)
    await server.start()
    h = Harness(server)
    try:
        alice = await h.client("alice")
        await h.client("bob")
        await alice.send(to="bob", text="one")
        await alice.send(to="bob", text="two")
        deadline = asyncio.get_running_loop().time() + 3
        while server.messaging.delivered.noted < 2:
            assert asyncio.get_running_loop().time() < deadline, "bob did not ack"
            await asyncio.sleep(0.02)
        await no_delivered(alice, 0.2)  # not flushed yet: the interval is a minute
    finally:
        await h.close()
        await server.drain()
    server = Server(settings)
    await server.start()
    h = Harness(server)
    try:
        alice = await h.client("alice")
        (item,), _ = await alice.conversations()
        assert (item.conv, item.peer_delivered_seq, item.peer_read_seq) == (CONV, 2, 0)
    finally:
        await h.close()
        await server.drain()
