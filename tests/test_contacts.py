"""Typing notices and the block list (first slice of conversation state)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness, next_message
from tests.rawclient import Raw
from tests.test_http_api import call
from tidings.client import RequestError, TypingNotice

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores


async def next_typing(client: Any, timeout: float = 3.0) -> TypingNotice:
    async def get() -> TypingNotice:
        async for ev in client.events():
            if isinstance(ev, TypingNotice):
                return ev
        raise AssertionError("stream ended")

    return await asyncio.wait_for(get(), timeout)


async def test_typing_reaches_the_peer_only(harness: Harness) -> None:
    """A typing notice reaches every online device of the peer, not the typist's own."""
    a1 = await harness.client("alice", "a1")
    a2 = await harness.client("alice", "a2", transport="tcp")
    b1 = await harness.client("bob", "b1", codec="json")
    b2 = await harness.client("bob", "b2", transport="tcp")
    a1.typing("d:alice|bob")
    for c in (b1, b2):
        ev = await next_typing(c)
        assert ev == TypingNotice("d:alice|bob", "alice")
    with pytest.raises(TimeoutError):
        await next_typing(a2, timeout=0.4)


async def test_typing_is_rate_limited_and_never_stored(make_server: Any) -> None:
    """Repeated notices within the interval are dropped; nothing reaches the store."""
    h: Harness = await make_server(typing_interval_ms=60_000)
    a = await h.client("alice")
    b = await h.client("bob")
    for _ in range(5):
        a.typing("d:alice|bob")
    await next_typing(b)
    with pytest.raises(TimeoutError):
        await next_typing(b, timeout=0.4)
    assert await h.server.store.conversation("d:alice|bob") is None


async def test_typing_in_a_foreign_conversation_is_forbidden(harness: Harness) -> None:
    """Typing in a conversation one is not part of answers `forbidden`; nothing is relayed."""
    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(await harness.token("mallory")))["t"] == "ready"
    b = await harness.client("bob")
    await raw.send({"t": "typing", "conv": "d:alice|bob"})
    frame = await raw.recv()
    assert frame["t"] == "error" and frame["code"] == "forbidden"
    with pytest.raises(TimeoutError):
        await next_typing(b, timeout=0.3)
    await raw.close()


async def test_block_refuses_messages_and_typing(harness: Harness) -> None:
    """After Bob blocks Alice her sends fail with `blocked` (nothing stored), her typing is
    not relayed, Bob can still write to her, and unblocking restores delivery."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    first = await a.send(to="bob", text="hi", cid="before")
    await next_message(b)
    await b.block("ALICE")
    assert await b.blocked() == ["alice"]
    with pytest.raises(RequestError) as err:
        await a.send(to="bob", text="let me in")
    assert err.value.code == "blocked" and not err.value.retryable
    again = await a.send(to="bob", text="hi", cid="before")  # a retry of an old message
    assert again.dup and again.seq == first.seq
    a.typing(first.conv)
    with pytest.raises(TimeoutError):
        await next_typing(b, timeout=0.4)
    reply = await b.send(to="alice", text="I can still write")
    assert reply.seq == 2
    await b.block("alice", on=False)
    assert await b.blocked() == []
    assert (await a.send(to="bob", text="welcome back")).seq == 3
    page = await a.history(first.conv)
    assert [m.body["text"] for m in page.msgs] == ["hi", "I can still write", "welcome back"]


async def test_block_errors(harness: Harness) -> None:
    """Blocking oneself is `invalid`; blocking an unknown user is `not_found`."""
    a = await harness.client("alice")
    with pytest.raises(RequestError) as err:
        await a.block("alice")
    assert err.value.code == "invalid"
    with pytest.raises(RequestError) as err:
        await a.block("nobody")
    assert err.value.code == "not_found"


async def test_block_list_over_http(harness: Harness) -> None:
    """The backend manages a user's block list over the server API."""
    await harness.user("alice")
    await harness.user("bob")
    status, _ = await call(harness, "PUT", "/v1/users/bob/blocks/alice")
    assert status == 204
    status, body = await call(harness, "GET", "/v1/users/bob/blocks")
    assert status == 200 and body == {"users": ["alice"]}
    a = await harness.client("alice")
    with pytest.raises(RequestError):
        await a.send(to="bob", text="x")
    status, _ = await call(harness, "DELETE", "/v1/users/bob/blocks/alice")
    assert status == 204
    assert (await a.send(to="bob", text="x")).seq == 1
    status, body = await call(harness, "PUT", "/v1/users/ghost/blocks/alice")
    assert status == 404


async def test_no_read_receipts_to_a_blocker(harness: Harness) -> None:
    """A user who blocks someone no longer gets that someone's read receipts."""
    from tests.test_read_state import next_receipt

    a = await harness.client("alice")
    b = await harness.client("bob")
    for i in range(2):
        await a.send(to="bob", text=f"{i}")
    await a.block("bob")
    await b.mark_read("d:alice|bob", 2)
    with pytest.raises(TimeoutError):
        await next_receipt(a, timeout=0.4)
