"""Sync of conversation state over real sockets: a brand-new device with ``tail``, a device
that missed deletions while away, and the SDK's LocalState replica."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness
from tests.rawclient import Raw
from tidings.client.state import LocalState
from tidings.protocol.frames import Message
from tidings.services import messaging

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores


async def test_new_device_gets_the_list_and_the_latest_page(harness: Harness) -> None:
    """With ``tail``, a device that knows nothing gets every conversation's state and only
    its newest entries; older ones come from history on demand."""
    a = await harness.client("alice")
    await harness.user("carol")
    await harness.user("bob")
    for i in range(12):
        await a.send(to="bob", text=f"to bob {i}")
    for i in range(3):
        await a.send(to="carol", text=f"to carol {i}")
    b = await harness.client("bob", "b_new")
    for i in range(2):
        await b.send(to="alice", text=f"back {i}")  # bob's own sends read the chat
    for i in range(4):
        await a.send(to="bob", text=f"more {i}")
    fresh = await harness.client(
        "alice", "a_new", connect=False, tail=5, keep_messages=True, sync_limit=4
    )
    await fresh.connect()
    await fresh.sync_now()
    st = fresh.state
    assert [v.conv for v in st.conversation_list()] == ["d:alice|bob", "d:alice|carol"]
    ab, ac = st.convs["d:alice|bob"], st.convs["d:alice|carol"]
    assert sorted(st.messages["d:alice|bob"]) == [14, 15, 16, 17, 18]
    assert sorted(st.messages["d:alice|carol"]) == [1, 2, 3]  # fewer than tail: all
    assert fresh.held == {"d:alice|bob": 18, "d:alice|carol": 3}
    assert (ab.last_seq, ab.read_seq, ab.peer_read_seq, ab.unread) == (18, 18, 14, 0)
    assert (ac.last_seq, ac.peer, ac.unread) == (3, "carol", 0)
    assert fresh.sync_answers >= 2  # 8 entries, 4 per answer
    page = await fresh.history("d:alice|bob", before=14, limit=50)
    assert [m.seq for m in page.msgs] == list(range(1, 14)) and not page.more
    assert sorted(st.messages["d:alice|bob"]) == list(range(1, 19))
    # Bob's view: unread counts his side (the 4 after his reply), and the badge.
    bob_new = await harness.client("bob", "b_other", connect=False, tail=2)
    await bob_new.connect()
    await bob_new.sync_now()
    view = bob_new.state.convs["d:alice|bob"]
    assert (view.unread, view.read_seq, view.peer_read_seq) == (4, 14, 18)
    assert bob_new.state.badge == 4 and bob_new.held == {"d:alice|bob": 18}


async def test_the_wire_states_base_and_tail(harness: Harness) -> None:
    """``tail`` on the wire: the conv state's ``base``, only the newest entries, states for
    the conversations the answer completes; a bad ``tail`` is refused."""
    a = await harness.client("alice")
    await harness.user("bob")
    for i in range(6):
        await a.send(to="bob", text=f"m{i}")
    raw = await Raw.ws(harness.ws_url, codec="json")
    assert (await raw.login(await harness.token("bob", "raw")))["t"] == "ready"
    await raw.send({"t": "sync", "id": 2, "tail": 2})
    ans = await raw.until("synced")
    assert ans["convs"] == [{"conv": "d:alice|bob", "last_seq": 6, "peer": "alice", "base": 4}]
    assert [m["seq"] for m in ans["msgs"]] == [5, 6] and ans["complete"]
    assert [m["n"] for m in ans["msgs"]] == [5, 6]
    (state,) = ans["states"]
    assert (state["conv"], state["unread"], state["n"], state["last"]["seq"]) == (
        "d:alice|bob",
        6,
        6,
        6,
    )
    # Holding everything: nothing to send, no base, and no state (nothing changed).
    await raw.send({"t": "sync", "id": 3, "tail": 2, "have": {"d:alice|bob": 6}})
    again = await raw.until("synced")
    assert again["convs"] == [{"conv": "d:alice|bob", "last_seq": 6, "peer": "alice"}]
    assert again["msgs"] == [] and again["states"] == []
    await raw.send({"t": "sync", "id": 4, "tail": -1})
    err = await raw.until("error")
    assert (err["id"], err["code"]) == (4, "invalid")
    await raw.close()


async def test_an_away_device_learns_deletions_and_edits(harness: Harness) -> None:
    """Deletions made while a device was offline reach it through sync (``deleted`` in the
    state), as do edits of entries it holds; a recall or edit entry is not deleted on its
    own, and reads as deleted with the entry it changed."""
    a = await harness.client("alice")
    b1 = await harness.client("bob", "b1", keep_messages=True)
    b2 = await harness.client("bob", "b2", keep_messages=True)
    for i in range(4):
        await a.send(to="bob", text=f"m{i}")
    await b2.sync_now()
    await b2.disconnect()
    edit = await a.edit("d:alice|bob", 2, text="m1, fixed")
    assert (edit.seq, edit.edit_version, edit.n) == (5, 1, 4)
    assert await b1.delete_for_me("d:alice|bob", [1, 5, 2]) == [1, 2]  # 5 is the edit
    await b2.connect()
    await b2.sync_now()
    held = b2.state.messages["d:alice|bob"]
    assert [s for s, m in sorted(held.items()) if m.deleted] == [1, 2, 5]
    assert held[2].body == {} and held[2].edit_version == 0  # a tombstone
    assert held[3].body == {"text": "m2"}
    assert b2.state.convs["d:alice|bob"].deleted == {1, 2, 5}
    page = await b2.history("d:alice|bob")
    assert [m.seq for m in page.msgs if m.deleted] == [1, 2, 5]
    # Alice keeps everything, with the edit applied.
    mine = await a.history("d:alice|bob")
    assert mine.msgs[1].body == {"text": "m1, fixed"} and mine.msgs[1].edit_version == 1
    assert not any(m.deleted for m in mine.msgs)


async def test_local_state_follows_live_events(harness: Harness) -> None:
    """The SDK's replica: unread from running totals, reads from other devices, receipts,
    settings with versions, the badge leaving muted conversations out."""
    a = await harness.client("alice", keep_messages=True)
    b1 = await harness.client("bob", "b1", keep_messages=True)
    b2 = await harness.client("bob", "b2", keep_messages=True)
    for i in range(3):
        await a.send(to="bob", text=f"m{i}")
    await a.send(to="bob", text="shh", flags=1)

    async def settled(check: object) -> None:
        import asyncio

        for _ in range(200):
            if callable(check) and check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("state did not settle")

    v1, v2 = b1.state.view("d:alice|bob"), b2.state.view("d:alice|bob")
    await settled(lambda: v1.last_seq == 4 and v2.last_seq == 4)
    assert (v1.unread, v2.unread, b1.state.badge) == (3, 3, 3)
    await b1.mark_read("d:alice|bob", 2)
    await settled(lambda: v2.unread == 1)
    va = a.state.view("d:alice|bob")
    await settled(lambda: va.peer_read_seq == 2)
    await b2.settings("d:alice|bob", muted=True, draft="later")
    await settled(lambda: v1.muted and v1.draft == "later")
    assert b1.state.badge == 0 and v1.unread == 1 and v1.settings_v > 0
    # An older settings change never wins over a newer one.
    b1.state.apply_settings("d:alice|bob", False, False, False, "", v1.settings_v - 1)
    assert v1.muted and v1.draft == "later"


async def test_many_deletions_come_in_several_answers(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More deletions than one answer carries: the answer is partial, its ``cv`` stops at
    the last one sent, and the device's sync loop fetches the rest."""
    monkeypatch.setattr(messaging, "SYNC_DELETIONS_MAX", 2)
    a = await harness.client("alice")
    await harness.user("bob")
    for i in range(6):
        await a.send(to="bob", text=f"m{i}")
    b1 = await harness.client("bob", "b1")
    assert await b1.delete_for_me("d:alice|bob", [1, 2, 3]) == [1, 2, 3]
    assert await b1.delete_for_me("d:alice|bob", [5, 6]) == [5, 6]
    b2 = await harness.client("bob", "b2", connect=False, keep_messages=True)
    b2.held["d:alice|bob"] = 6  # as if it held everything from before the deletions
    b2.since = str((await a.history("d:alice|bob")).msgs[-1].mid)
    await b2.connect()
    await b2.sync_now()
    assert b2.state.convs["d:alice|bob"].deleted == {1, 2, 3, 5, 6}
    assert b2.sync_answers >= 3
    raw = await Raw.ws(harness.ws_url, codec="json")
    assert (await raw.login(await harness.token("bob", "raw")))["t"] == "ready"
    await raw.send({"t": "sync", "id": 2, "since": b2.since, "have": {"d:alice|bob": 6}})
    first = await raw.until("synced")
    assert not first["complete"] and first["states"][0]["deleted"] == [1, 2]
    await raw.close()


async def test_reset_while_a_sync_is_in_flight(harness: Harness) -> None:
    """Forgetting everything while an answer is on its way: that answer (asked with what
    was forgotten) is dropped, and the fresh sync brings every conversation back."""
    a = await harness.client("alice")
    await harness.user("bob")
    await harness.user("carol")
    await a.send(to="bob", text="hi bob")
    await a.send(to="carol", text="hi carol")
    b = await harness.client("alice", "a2", keep_messages=True)
    await b.sync_now()
    await a.send(to="carol", text="again")
    b.request_sync()
    await asyncio.sleep(0)
    await b.reset()
    assert set(b.state.convs) == {"d:alice|bob", "d:alice|carol"}
    assert b.held == {"d:alice|bob": 1, "d:alice|carol": 2}
    assert sorted(b.state.messages["d:alice|carol"]) == [1, 2]


def test_local_state_rules_for_stale_copies() -> None:
    """A copy of an edit fetched before a recall loses its content once the recall is
    known; a tombstone from the server keeps later copies of that entry hidden."""
    st = LocalState("alice", keep_messages=True)

    def entry(seq: int, type: str, body: dict[str, Any], **kw: Any) -> Message:
        return Message(
            "d:alice|bob", seq, str(seq), "alice", "d1", f"c{seq}", type, body, 1000 + seq, **kw
        )

    st.apply_message(entry(1, "text", {"text": "v0"}, n=1))
    st.apply_message(entry(2, "edit", {"seq": 1, "body": {"text": "v1"}}, edit_version=1))
    assert st.messages["d:alice|bob"][1].body == {"text": "v1"}
    st.apply_message(entry(3, "recall", {"seq": 1}))
    assert st.messages["d:alice|bob"][1].recalled
    assert st.messages["d:alice|bob"][2].body == {"seq": 1}
    # A history page read before the recall arrives late with the edit's content.
    st.apply_message(entry(2, "edit", {"seq": 1, "body": {"text": "v1"}}, edit_version=1))
    assert st.messages["d:alice|bob"][2].body == {"seq": 1}
    assert st.convs["d:alice|bob"].last_seq == 3
    st.apply_message(entry(4, "text", {}, deleted=True, n=2))  # the server's tombstone
    st.apply_message(entry(4, "text", {"text": "stale"}, n=2))  # an older copy
    assert st.messages["d:alice|bob"][4].deleted and st.messages["d:alice|bob"][4].body == {}
    assert st.convs["d:alice|bob"].last is not None and st.convs["d:alice|bob"].last.deleted


def test_hidden_at_the_servers_position() -> None:
    """A device lagging behind when another device hides the conversation keeps it hidden
    when the entries it lacked arrive; only a newer entry shows it again."""
    st = LocalState("alice")

    def entry(seq: int) -> Message:
        return Message("d:alice|bob", seq, str(seq), "bob", "b1", f"c{seq}", "text", {}, seq)

    for seq in range(1, 9):
        st.apply_message(entry(seq))
    st.apply_settings("d:alice|bob", False, False, True, "", version=5, hidden_at=10)
    for seq in (9, 10):
        st.apply_message(entry(seq))
        assert st.convs["d:alice|bob"].hidden and st.conversation_list() == []
    st.apply_message(entry(11))
    assert not st.convs["d:alice|bob"].hidden
    assert [v.conv for v in st.conversation_list()] == ["d:alice|bob"]


async def test_settings_frames_say_where_it_was_hidden(harness: Harness) -> None:
    a = await harness.client("alice")
    await harness.user("bob")
    for i in range(3):
        await a.send(to="bob", text=f"m{i}")
    answer = await a.settings("d:alice|bob", hidden=True)
    assert answer.hidden and answer.hidden_at == 3
    assert (await a.settings("d:alice|bob", muted=True)).hidden_at == 3
    shown = await a.settings("d:alice|bob", hidden=False)
    assert not shown.hidden and shown.hidden_at == 0


async def test_more_conversations_than_one_frame_can_state(make_server: Any) -> None:
    """A device holding more conversations than a sync frame can list asks first which
    changed (limit 0: a list, no entries) and then states only those."""
    h = await make_server(max_frame_bytes=3000)
    a = await h.client("alice")
    peers = [await h.user(f"peer{i:03d}") for i in range(150)]
    for p in peers:
        await a.send(to=p, text="hello")
    d = await h.client("alice", "d2", keep_messages=True)
    await d.sync_now()
    assert len(d.held) == 150
    await d.disconnect()
    for p in peers[:5]:
        await a.send(to=p, text="while you were away")
    before = d.sync_answers
    await d.connect()
    await d.sync_now()
    assert all(d.held[f"d:alice|{p}"] == 2 for p in peers[:5])
    assert all(d.held[f"d:alice|{p}"] == 1 for p in peers[5:])
    assert d.sync_answers - before >= 2  # the list, then the entries
    raw = await Raw.ws(h.ws_url, codec="json")
    assert (await raw.login(await h.token("alice", "raw")))["t"] == "ready"
    await raw.send({"t": "sync", "id": 2, "limit": 0})
    listed = await raw.until("synced")
    assert len(listed["convs"]) == 150 and listed["msgs"] == [] and not listed["complete"]
    assert listed["wm"] == "0"
    await raw.close()


async def test_new_device_with_many_conversations_and_a_small_frame(make_server: Any) -> None:
    """Many rounds of list-then-entries: every conversation ends up listed with its state
    and its latest page, however small the frame."""
    h = await make_server(max_frame_bytes=3000, rate_per_s=100_000, rate_burst=100_000)
    a = await h.client("alice")
    peers = [await h.user(f"peer{i:03d}") for i in range(200)]
    await asyncio.gather(*[a.send(to=p, text=f"{j}") for p in peers for j in range(4)])
    d = await h.client("alice", "new", tail=2, keep_messages=True, sync_limit=40)
    await d.sync_now()
    assert len(d.state.convs) == 200 and d.sync_answers > 10
    for p in peers:
        conv = f"d:alice|{p}"
        assert d.held[conv] == 4 and sorted(d.state.messages[conv]) == [3, 4]
        assert d.state.convs[conv].read_seq == 4 and d.state.convs[conv].unread == 0
