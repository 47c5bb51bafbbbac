"""End-to-end 1:1 messaging through the SDK over every transport and codec."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness, next_message
from tidings.client import MessageEvent

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores

TRANSPORTS = [("ws", "json"), ("ws", "msgpack"), ("tcp", "msgpack")]


@pytest.mark.parametrize(("transport", "codec"), TRANSPORTS)
async def test_send_is_acked_and_pushed(harness: Harness, transport: str, codec: str) -> None:
    """A send is acked with conv, seq and a decimal-string mid, and pushed to the peer."""
    a = await harness.client("alice", transport=transport, codec=codec)
    b = await harness.client("bob", transport=transport, codec=codec)
    sent = await a.send(to="bob", text="hello")
    assert sent.conv == "d:alice|bob" and sent.seq == 1 and sent.mid.isdigit()
    ev = await next_message(b)
    assert ev.message.body == {"text": "hello"}
    assert ev.message.sender == "alice" and ev.message.seq == 1 and ev.message.mid == sent.mid


async def test_every_device_gets_every_message(harness: Harness) -> None:
    """Both of Bob's devices and Alice's other device get the push; the sender's does not."""
    a1 = await harness.client("alice", "a1")
    a2 = await harness.client("alice", "a2", transport="tcp")
    b1 = await harness.client("bob", "b1", codec="json")
    b2 = await harness.client("bob", "b2", transport="tcp")
    sent = await a1.send(to="bob", text="to all")
    for c in (a2, b1, b2):
        ev = await next_message(c)
        assert ev.message.mid == sent.mid and not ev.echo
    echo = await next_message(a1)
    assert echo.echo and echo.message.seq == sent.seq


async def test_seqs_are_gapless_per_conversation(harness: Harness) -> None:
    """Concurrent sends in one conversation get seqs 1..N with no gap or repeat."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    results = await asyncio.gather(
        *(a.send(to="bob", text=f"m{i}") for i in range(100)),
        *(b.send(to="alice", text=f"r{i}") for i in range(100)),
    )
    assert sorted(r.seq for r in results) == list(range(1, 201))
    page = await a.history("d:alice|bob", limit=100)
    assert [m.seq for m in page.msgs] == list(range(101, 201)) and page.more


async def test_retry_with_same_cid_returns_original(harness: Harness) -> None:
    """A resend with the same client id answers the original ack marked dup; no new message."""
    a = await harness.client("alice")
    await harness.user("bob")
    first = await a.send(to="bob", text="once", cid="c-1")
    again = await a.send(to="bob", text="once", cid="c-1")
    assert (again.seq, again.mid, again.dup) == (first.seq, first.mid, True)
    page = await a.history(first.conv)
    assert len(page.msgs) == 1


async def test_history_pages_backwards(harness: Harness) -> None:
    """History pages backwards from any seq until `more` is false."""
    a = await harness.client("alice")
    await harness.user("bob")
    for i in range(25):
        await a.send(to="bob", text=f"n{i}")
    seen: list[int] = []
    before = 0
    while True:
        page = await a.history("d:alice|bob", before=before, limit=10)
        seen = [m.seq for m in page.msgs] + seen
        if not page.more:
            break
        before = page.msgs[0].seq
    assert seen == list(range(1, 26))
    mid_page = await a.history("d:alice|bob", before=13, limit=5)
    assert [m.seq for m in mid_page.msgs] == [8, 9, 10, 11, 12]


async def test_offline_device_syncs_exactly_what_it_missed(harness: Harness) -> None:
    """A device that was offline gets exactly the missed messages, in order, on reconnect."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    await a.send(to="bob", text="before")
    assert (await next_message(b)).message.seq == 1
    await b.close()
    for i in range(30):
        await a.send(to="bob", text=f"while away {i}")
    b2 = await harness.client("bob", sync_limit=7)  # a fresh device pages through sync
    got = [(await next_message(b2)).message.seq for _ in range(31)]
    assert got == list(range(1, 32))
    assert b2.held == {"d:alice|bob": 31}


async def test_self_conversation(harness: Harness) -> None:
    """A user can message themself (notes); their other devices get it."""
    a1 = await harness.client("alice", "a1")
    a2 = await harness.client("alice", "a2")
    sent = await a1.send(to="alice", text="note")
    assert sent.conv == "d:alice|alice"
    ev = await next_message(a2)
    assert ev.message.body["text"] == "note"


async def test_conv_field_addresses_direct_conversation(harness: Harness) -> None:
    """Sending with `conv` instead of `to` reaches the same conversation."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    first = await a.send(to="bob", text="x")
    second = await b.send(conv=first.conv, text="y")
    assert second.conv == first.conv and second.seq == 2
    kinds = [(await next_message(b)), (await next_message(b))]
    assert [k.message.seq for k in kinds] == [1, 2] and kinds[1].echo


async def test_user_ids_are_normalised(harness: Harness) -> None:
    """User ids are compared after NFKC + casefold; the app's spelling is kept as display."""
    await harness.server.accounts.put_user("Ｂｏｂ")
    a = await harness.client("alice")
    sent = await a.send(to="BOB", text="hi")
    assert sent.conv == "d:alice|bob"
    user = await harness.server.accounts.get_user("bob")
    assert user.display == "Ｂｏｂ"


async def test_gap_is_filled_by_sync(harness: Harness) -> None:
    """A push that arrives after a gap is held back until sync fills the gap, then all in order."""
    a = await harness.client("alice")
    b = await harness.client("bob", gap_grace_s=0.05)
    await a.send(to="bob", text="1")
    assert (await next_message(b)).message.seq == 1
    # Simulate a lost push: hide bob's sessions from the hub for one message.
    hub = harness.server.hub
    hidden = hub.by_user.pop("bob")
    await a.send(to="bob", text="2")
    hub.by_user["bob"] = hidden
    await a.send(to="bob", text="3")
    got = [await next_message(b) for _ in range(2)]
    assert [e.message.seq for e in got] == [2, 3]
    assert all(isinstance(e, MessageEvent) for e in got)


async def test_watermark_in_pong_reveals_missed_message(harness: Harness) -> None:
    """A missed push with no later message is found through the pong's watermark."""
    a = await harness.client("alice")
    b = await harness.client("bob", heartbeat_s=0.2)
    await a.send(to="bob", text="1")
    await next_message(b)
    hub = harness.server.hub
    hidden = hub.by_user.pop("bob")
    sent = await a.send(to="bob", text="lost push")
    hub.by_user["bob"] = hidden
    ev = await next_message(b, timeout=5)
    assert ev.message.mid == sent.mid


async def test_mentions_and_reply_to_round_trip(harness: Harness) -> None:
    """Mentions (normalised) and reply_to travel with the message to every device."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    first = await a.send(to="bob", text="question")
    await next_message(b)
    sent = await b.send(to="alice", text="answer", mentions=["ALICE"], reply_to=first.mid)
    ev = await next_message(a)
    while ev.message.seq != sent.seq:
        ev = await next_message(a)
    assert ev.message.mentions == ["alice"] and ev.message.reply_to == first.mid
    page = await a.history(sent.conv)
    assert page.msgs[-1].reply_to == first.mid


async def test_server_api_sends_reach_every_device(harness: Harness) -> None:
    """A message from the server API reaches all devices, even one whose id is `server`."""
    alice_server_dev = await harness.client("alice", "server")
    await harness.user("bob")
    msg = harness.server.messaging.build(
        "alice", "server", "d:alice|bob", ("alice", "bob"), "api-1", "system", {"text": "hi"}
    )
    await harness.server.messaging.submit(msg, from_device=False)
    ev = await next_message(alice_server_dev)
    assert ev.message.type == "system" and not ev.echo


async def test_large_sync_is_paged_by_bytes(make_server: Any) -> None:
    """Sync answers stay near 1 MiB of bodies; the device pages to completion."""
    h: Harness = await make_server(rate_per_s=1000, rate_burst=1000)
    a = await h.client("alice")
    big = "x" * 8000
    await h.user("bob")
    for i in range(300):  # ~2.4 MB of text
        await a.send(to="bob", text=f"{i} {big}")
    rows = await h.server.messaging.sync("bob", "0", {}, 500)
    assert not rows.complete and 0 < len(rows.msgs) < 300
    assert sum(m.size for m in rows.msgs) <= (1 << 20)
    b = await h.client("bob")
    got = [(await next_message(b)).message.seq for _ in range(300)]
    assert got == list(range(1, 301))


async def test_ids_must_be_ascii_digits(harness: Harness) -> None:
    """Non-ASCII digits in id fields are `invalid`, not a crash or a misread."""
    from tests.rawclient import Raw

    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(await harness.token("alice")))["t"] == "ready"
    await harness.user("bob")
    await raw.send(
        {"t": "send", "id": 2, "cid": "r", "to": "bob", "body": {"text": "x"}, "reply_to": "²"}
    )
    frame = await raw.recv()
    assert frame["t"] == "error" and frame["code"] == "invalid" and frame["id"] == 2
    await raw.send({"t": "sync", "id": 3, "since": "١٢"})
    frame = await raw.recv()
    assert frame["t"] == "error" and frame["code"] == "invalid" and frame["id"] == 3
    await raw.close()


async def test_user_ids_of_any_script(harness: Harness) -> None:
    """User ids in scripts with combining marks are accepted and round-trip."""
    a = await harness.client("हिंदी")
    await harness.user("日本語")
    sent = await a.send(to="日本語", text="नमस्ते")
    assert sent.conv in ("d:हिंदी|日本語", "d:日本語|हिंदी")


async def test_hello_advertises_limits(harness: Harness) -> None:
    """The server hello carries version, limits, heartbeat and timeouts."""
    from tests.rawclient import Raw

    raw = await Raw.ws(harness.ws_url)
    hello = raw.hello
    s = harness.server.settings
    assert hello["t"] == "hello" and hello["v"] == 1
    assert hello["limits"]["max_frame_bytes"] == s.max_frame_bytes
    assert hello["limits"]["max_unacked"] == s.max_unacked
    assert hello["heartbeat_ms"] == s.heartbeat_ms
    await raw.close()


async def test_sync_pages_many_conversations(harness: Harness, monkeypatch: Any) -> None:
    """With more changed conversations than one answer lists, the sync point advances over
    the completed prefix and a fresh device still ends with every message."""
    from tidings.services import messaging

    monkeypatch.setattr(messaging, "SYNC_CONVS_MAX", 20)
    await harness.user("bob")
    for i in range(70):
        await harness.user(f"s{i}")
        await harness.server.messaging.submit(
            harness.server.messaging.build(
                f"s{i}", "d1", f"d:bob|s{i}", ("bob", f"s{i}"), f"c{i}", "text", {"text": f"hi {i}"}
            )
        )
    first = await harness.server.messaging.sync("bob", "0", {}, 500)
    assert len(first.convs) == 20 and not first.complete and first.wm > 0
    b = await harness.client("bob", sync_limit=15)
    got = {(await next_message(b)).message.conv for _ in range(70)}
    assert got == {f"d:bob|s{i}" for i in range(70)}
    await b.sync_now()
    assert int(b.since) == await harness.server.store.watermark("bob")
