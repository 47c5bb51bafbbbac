"""Recall and edit: events in the conversation's sequence, so every device converges."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Harness, ManualClock, next_message
from tidings.client import RequestError

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores


async def test_recall_within_window(make_server: Any) -> None:
    """A recall is an entry every device gets; history shows the original as recalled;
    it does not raise unread; after the window it is `forbidden`."""
    clock = ManualClock()
    h: Harness = await make_server(clock=clock, recall_window_ms=120_000)
    a = await h.client("alice")
    b = await h.client("bob")
    first = await a.send(to="bob", text="oops")
    second = await a.send(to="bob", text="fine")
    recall = await a.recall(first.conv, first.seq)
    assert recall.seq == 3
    got = [(await next_message(b)).message for _ in range(3)]
    assert [m.type for m in got] == ["text", "text", "recall"]
    assert got[2].body == {"seq": 1}
    page = await b.history(first.conv)
    assert page.msgs[0].recalled and page.msgs[0].body == {}
    assert not page.msgs[1].recalled
    convs, badge = await b.conversations()
    assert convs[0].unread == 2 and badge == 2  # the recall entry itself is not counted
    clock.advance(121)
    with pytest.raises(RequestError) as err:
        await a.recall(second.conv, second.seq)
    assert err.value.code == "forbidden"
    with pytest.raises(RequestError) as err:
        await a.recall(first.conv, first.seq)  # already recalled (window aside)
    assert err.value.code in ("conflict", "forbidden")


async def test_only_the_sender_recalls_or_edits(harness: Harness) -> None:
    """Bob cannot recall or edit Alice's message; unknown seqs are `not_found`."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    sent = await a.send(to="bob", text="mine")
    for op in (b.recall(sent.conv, sent.seq), b.edit(sent.conv, sent.seq, "yours")):
        with pytest.raises(RequestError) as err:
            await op
        assert err.value.code == "forbidden"
    with pytest.raises(RequestError) as err:
        await a.recall(sent.conv, 99)
    assert err.value.code == "not_found"
    with pytest.raises(RequestError) as err:
        await a.send(conv=sent.conv, type="recall", body={"seq": "one"})
    assert err.value.code == "invalid"
    page = await a.history(sent.conv)
    assert [m.seq for m in page.msgs] == [1]  # the refused events burned no seq


async def test_edit_versions(harness: Harness) -> None:
    """Each edit is an entry; history shows the latest content and its edit version."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    sent = await a.send(to="bob", text="helo")
    await a.edit(sent.conv, sent.seq, "hello")
    await a.edit(sent.conv, sent.seq, "hello!")
    got = [(await next_message(b)).message for _ in range(3)]
    assert [m.type for m in got] == ["text", "edit", "edit"]
    assert got[2].body == {"seq": 1, "body": {"text": "hello!"}}
    page = await b.history(sent.conv)
    assert page.msgs[0].body == {"text": "hello!"} and page.msgs[0].edit_version == 2
    await a.recall(sent.conv, sent.seq)
    with pytest.raises(RequestError) as err:
        await a.edit(sent.conv, sent.seq, "too late")
    assert err.value.code == "conflict"
    with pytest.raises(RequestError) as err:
        await a.edit(sent.conv, 2, "edit an edit")
    assert err.value.code == "invalid"


async def test_delete_for_me(harness: Harness) -> None:
    """Deleting for me hides entries on my devices only: my other device is told, my
    history and sync show empty `deleted` entries (seqs intact), the peer keeps them."""
    import asyncio

    from tidings.client import DeletedForMe

    a1 = await harness.client("alice", "a1")
    a2 = await harness.client("alice", "a2")
    b = await harness.client("bob")
    for i in range(3):
        await b.send(to="alice", text=f"m{i}")
    await a1.delete_for_me("d:alice|bob", [2, 2, 3])

    async def next_deleted() -> DeletedForMe:
        async for ev in a2.events():
            if isinstance(ev, DeletedForMe):
                return ev
        raise AssertionError

    assert await asyncio.wait_for(next_deleted(), 3) == DeletedForMe("d:alice|bob", [2, 3])
    mine = await a1.history("d:alice|bob")
    assert [(m.seq, m.deleted, m.body) for m in mine.msgs] == [
        (1, False, {"text": "m0"}),
        (2, True, {}),
        (3, True, {}),
    ]
    theirs = await b.history("d:alice|bob")
    assert [m.body["text"] for m in theirs.msgs] == ["m0", "m1", "m2"]
    fresh = await harness.client("alice", "a3")
    got = [(await next_message(fresh)).message for _ in range(3)]
    assert [m.deleted for m in got] == [False, True, True]
    with pytest.raises(RequestError) as err:
        await a1.delete_for_me("d:alice|bob", [9])
    assert err.value.code == "not_found"
    with pytest.raises(RequestError) as err:
        await a1.delete_for_me("d:bob|carol", [1])
    assert err.value.code == "forbidden"
    with pytest.raises(RequestError) as err:
        await a1.delete_for_me("d:alice|bob", [])
    assert err.value.code == "invalid"


async def test_recall_clears_earlier_edits(harness: Harness) -> None:
    """After edit then recall, no entry of the conversation still carries the content."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    sent = await a.send(to="bob", text="public")
    await a.edit(sent.conv, sent.seq, "SECRET")
    await a.recall(sent.conv, sent.seq)
    page = await b.history(sent.conv)
    assert "SECRET" not in repr([m.body for m in page.msgs])
    assert page.msgs[1].type == "edit" and page.msgs[1].body == {"seq": 1}


async def test_amend_rules(harness: Harness) -> None:
    """System messages cannot be edited; a text edit needs text; edits do not mark the
    chat read; a refused recall into a new conversation leaves nothing behind."""
    a = await harness.client("alice")
    b = await harness.client("bob")
    msg = harness.server.messaging.build(
        "alice", "server", "d:alice|bob", ("alice", "bob"), "sys-1", "system", {"text": "Paid $5"}
    )
    await harness.server.messaging.submit(msg, from_device=False)
    with pytest.raises(RequestError) as err:
        await a.edit("d:alice|bob", 1, "Paid $5000")
    assert err.value.code == "forbidden"
    mine = await a.send(to="bob", text="hello")
    with pytest.raises(RequestError) as err:
        await a.edit(mine.conv, mine.seq, body={"x": 1})
    assert err.value.code == "invalid"
    for i in range(3):
        await b.send(to="alice", text=f"b{i}")
    await a.edit(mine.conv, mine.seq, "hello!")
    convs, _ = await a.conversations()
    assert convs[0].unread == 3  # an edit is not a reply
    with pytest.raises(RequestError) as err:
        await a.recall("d:alice|carol", 1)
    assert err.value.code in ("not_found", "forbidden")
    assert await harness.server.store.conversation("d:alice|carol") is None
    last = (await a.history(mine.conv)).msgs[-1].seq
    with pytest.raises(RequestError) as err:
        await a.recall(mine.conv, last + 1)
    assert err.value.code == "not_found"


async def test_failed_amend_rolls_back(harness: Harness, monkeypatch: Any) -> None:
    """A storage error in the middle of an edit undoes it; the conversation goes on."""
    import sqlite3

    a = await harness.client("alice")
    await harness.user("bob")
    sent = await a.send(to="bob", text="one")

    def broken(*_: Any) -> Any:
        raise sqlite3.OperationalError("simulated")

    from tests.rawclient import Raw

    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(await harness.token("alice", "raw")))["t"] == "ready"
    monkeypatch.setattr(harness.server.store, "_amend", broken)
    await raw.send(
        {
            "t": "send",
            "id": 5,
            "cid": "e1",
            "conv": sent.conv,
            "type": "edit",
            "body": {"seq": 1, "body": {"text": "x"}},
        }
    )
    frame = await raw.until("error")
    assert frame["code"] == "internal" and frame["id"] == 5
    monkeypatch.undo()
    await raw.close()
    nxt = await a.send(to="bob", text="two")
    assert nxt.seq == 2
    page = await a.history(sent.conv)
    assert [m.seq for m in page.msgs] == [1, 2] and page.msgs[0].body == {"text": "one"}


async def test_deletions_in_the_list_and_not_in_the_server_api(harness: Harness) -> None:
    """The conversation list's last entry honours delete-for-me; the server API's
    history shows every entry as stored."""
    from tests.test_http_api import call

    a = await harness.client("alice")
    b = await harness.client("bob")
    await b.send(to="alice", text="delete me")
    await a.delete_for_me("d:alice|bob", [1])
    convs, _ = await a.conversations()
    assert convs[0].last is not None and convs[0].last.deleted and convs[0].last.body == {}
    status, page = await call(harness, "GET", "/v1/conversations/d:alice|bob/messages")
    assert status == 200 and page["msgs"][0]["body"] == {"text": "delete me"}
