"""Groups over the client protocol: management, roles, mutes, permissions, membership
entries in the sequence, history from joining, member paging, receipts, coalesced reads."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Harness, ManualClock
from tests.rawclient import Raw
from tests.test_errors import err
from tidings.protocol.errors import TidingsError
from tidings.store.postgres import PostgresStore

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores


class Dev:
    """A raw device: requests with ids, pushes collected (and acked) on the side."""

    def __init__(self, raw: Raw, uid: str) -> None:
        self.raw = raw
        self.uid = uid
        self.rid = 1
        self.pushes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, h: Harness, uid: str, device: str = "d1") -> Dev:
        raw = await Raw.ws(h.ws_url, "json")
        assert (await raw.login(await h.token(uid, device)))["t"] == "ready"
        return cls(raw, uid)

    async def ask(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its answer (an error frame included)."""
        self.rid += 1
        rid = self.rid
        await self.raw.send({**frame, "id": rid})
        while True:
            got = await self.raw.recv()
            assert got is not None, "connection closed"
            if got.get("id") == rid and got["t"] not in ("push",):
                return dict(got)
            self._side(got)

    def _side(self, got: dict[str, Any]) -> None:
        if got["t"] == "push":
            self.pushes.append(got["m"])
        else:
            self.events.append(got)

    async def group(self, op: str, **kw: Any) -> dict[str, Any]:
        return await self.ask({"t": "group", "op": op, **kw})

    async def ok_group(self, op: str, **kw: Any) -> dict[str, Any]:
        ans = await self.group(op, **kw)
        assert ans["t"] == "group", ans
        return ans

    async def send(self, conv: str, text: str, cid: str) -> dict[str, Any]:
        return await self.ask({"t": "send", "conv": conv, "cid": cid, "body": {"text": text}})

    async def drain(self, quiet: float = 0.2) -> None:
        """Collect whatever arrives until the line is quiet."""
        while True:
            try:
                got = await asyncio.wait_for(self.raw.recv(), quiet)
            except TimeoutError:
                return
            if got is None:
                return
            self._side(got)

    async def wait_push(self, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
        async def loop() -> dict[str, Any]:
            while True:
                for m in self.pushes:
                    if pred(m):
                        return m
                got = await self.raw.recv()
                assert got is not None, "connection closed"
                self._side(got)

        return await asyncio.wait_for(loop(), timeout)


async def users(h: Harness, *names: str) -> None:
    for n in names:
        await h.user(n)


async def test_create_message_and_fan_out(harness: Harness) -> None:
    """A created group's entries (its create entry, then messages) reach every member's
    devices, the sender's other device too; membership entries are not unread."""
    await users(harness, "alice", "bob", "carol")
    a1 = await Dev.open(harness, "alice")
    a2 = await Dev.open(harness, "alice", "d2")
    b = await Dev.open(harness, "bob")
    c = await Dev.open(harness, "carol")
    made = await a1.ok_group("create", users=["bob", "carol"], name="Trip")
    conv = made["conv"]
    assert conv.startswith("g:") and made["seq"] == 1
    assert made["info"]["member_count"] == 3 and made["info"]["role"] == "owner"
    for d in (a2, b, c):
        m = await d.wait_push(lambda m: m["conv"] == conv and m["seq"] == 1)
        assert m["type"] == "group" and m["body"]["op"] == "create"
        assert m["body"]["users"] == ["bob", "carol"] and m["body"]["name"] == "Trip"
    sent = await a1.send(conv, "hello all", "m1")
    assert sent["t"] == "sent" and sent["seq"] == 2
    for d in (a2, b, c):
        m = await d.wait_push(lambda m: m["conv"] == conv and m["seq"] == 2)
        assert m["body"] == {"text": "hello all"} and m["from"] == "alice"
    await a1.drain()
    assert not [p for p in a1.pushes if p["seq"] == 2], "the sending device gets no push"
    listed = await b.ask({"t": "convs"})
    (item,) = [i for i in listed["convs"] if i["conv"] == conv]
    assert (item["title"], item["size"], item["unread"], item["last_seq"]) == ("Trip", 3, 1, 2)
    for d in (a1, a2, b, c):
        await d.raw.close()


async def test_non_members_and_unknown_groups(harness: Harness) -> None:
    """Non-members neither read nor post nor manage (`forbidden`); unknown groups and bad
    ids are `not_found`; nothing is stored."""
    await users(harness, "alice", "bob", "mallory")
    a = await Dev.open(harness, "alice")
    m = await Dev.open(harness, "mallory")
    conv = (await a.ok_group("create", users=["bob"]))["conv"]
    err(await m.send(conv, "let me in", "x1"), "forbidden")
    err(await m.ask({"t": "history", "conv": conv}), "forbidden")
    err(await m.ask({"t": "read", "conv": conv, "seq": 1}), "forbidden")
    err(await m.ask({"t": "members", "conv": conv}), "forbidden")
    err(await m.ask({"t": "receipts", "conv": conv, "seqs": [1]}), "forbidden")
    err(await m.ask({"t": "settings", "conv": conv, "muted": True}), "forbidden")
    err(await m.group("info", conv=conv), "forbidden")
    err(await m.group("add", conv=conv, users=["mallory"]), "forbidden")
    err(await m.group("leave", conv=conv), "forbidden")
    err(await m.send("g:nope", "?", "x2"), "not_found")
    err(await m.group("info", conv="g:nope"), "not_found")
    err(await m.group("add", conv="g:bad id!", users=["bob"]), "not_found")
    err(await m.ask({"t": "history", "conv": "g:nope"}), "not_found")
    err(await m.group("explode", conv=conv), "invalid")
    err(await a.group("add", conv=conv, users=["nobody"]), "not_found")
    err(await a.group("create", conv=conv), "conflict")  # the id is taken
    info = (await a.ok_group("info", conv=conv))["info"]
    assert info["member_count"] == 2 and info["last_seq"] == 1
    await a.raw.close()
    await m.raw.close()


async def test_roles_and_management_rights(harness: Harness) -> None:
    """Only the owner sets roles and transfers; admins manage members but not each
    other; the owner cannot leave before transferring; every change is an entry."""
    await users(harness, "owner", "adm", "mem", "mem2", "new")
    o = await Dev.open(harness, "owner")
    ad = await Dev.open(harness, "adm")
    me = await Dev.open(harness, "mem")
    conv = (await o.ok_group("create", users=["adm", "mem", "mem2"]))["conv"]
    err(await me.group("role", conv=conv, users=["adm"], role="admin"), "forbidden")
    err(await me.group("remove", conv=conv, users=["mem2"]), "forbidden")
    err(await me.group("profile", conv=conv, name="mine"), "forbidden")
    err(await me.group("mute_all", conv=conv, on=True), "forbidden")
    ans = await o.ok_group("role", conv=conv, users=["adm"], role="admin")
    assert ans["seq"] == 2
    err(await ad.group("role", conv=conv, users=["mem"], role="admin"), "forbidden")
    err(await ad.group("transfer", conv=conv, users=["adm"]), "forbidden")
    err(await ad.group("remove", conv=conv, users=["owner"]), "forbidden")
    err(await o.group("role", conv=conv, users=["owner"], role="member"), "forbidden")
    err(await ad.group("mute", conv=conv, users=["adm"], duration_ms=9), "invalid")  # self
    err(await o.group("role", conv=conv, users=["adm"], role="owner"), "invalid")
    err(await o.group("leave", conv=conv), "forbidden")
    # Members may invite (the default); an admin removes a member.
    assert (await me.ok_group("add", conv=conv, users=["new"]))["seq"] == 3
    assert (await ad.ok_group("remove", conv=conv, users=["mem2"]))["seq"] == 4
    # Role to the same role changes nothing: no entry.
    assert (await o.ok_group("role", conv=conv, users=["adm"], role="admin"))["seq"] == 0
    # Transfer: the new owner is `mem`; the old one becomes an admin and may leave.
    t = await o.ok_group("transfer", conv=conv, users=["mem"])
    assert t["info"]["owner"] == "mem" and t["info"]["role"] == "admin"
    err(await ad.group("remove", conv=conv, users=["owner"]), "forbidden")  # admin vs admin
    assert (await o.ok_group("leave", conv=conv))["seq"] == 6
    page = await me.ask({"t": "members", "conv": conv})
    roles = {x["user"]: x["role"] for x in page["members"]}
    assert roles == {"adm": "admin", "mem": "owner", "new": "member"}
    hist = await me.ask({"t": "history", "conv": conv})
    ops = [(x["seq"], x["body"]["op"]) for x in hist["msgs"]]
    assert ops == [
        (1, "create"),
        (2, "role"),
        (3, "add"),
        (4, "remove"),
        (5, "transfer"),
        (6, "leave"),
    ]
    # Invites by members can be switched off.
    await me.ok_group("profile", conv=conv, members_can_invite=False)
    nb = await Dev.open(harness, "new")
    err(await nb.group("add", conv=conv, users=["mem2"]), "forbidden")
    for d in (o, ad, me, nb):
        await d.raw.close()


async def test_mutes(make_server: Any) -> None:
    """A muted member gets `muted` (with the time left) until the mute ends or is lifted;
    mute-all silences members but not admins; everyone sees the mute entries."""
    clock = ManualClock()
    h = await make_server(clock=clock)
    await users(h, "o", "a", "m")
    o = await Dev.open(h, "o")
    a = await Dev.open(h, "a")
    m = await Dev.open(h, "m")
    conv = (await o.ok_group("create", users=["a", "m"]))["conv"]
    await o.ok_group("role", conv=conv, users=["a"], role="admin")
    mute = await a.ok_group("mute", conv=conv, users=["m"], duration_ms=60_000)
    pushed = await m.wait_push(lambda p: p["seq"] == mute["seq"])
    assert pushed["body"]["op"] == "mute" and pushed["body"]["users"] == ["m"]
    refused = await m.send(conv, "hey", "c1")
    err(refused, "muted")
    assert 55_000 <= refused["retry_after_ms"] <= 60_000
    err(await a.group("mute", conv=conv, users=["o"], duration_ms=1000), "forbidden")
    err(await a.group("mute", conv=conv, users=["m"], duration_ms=-1), "invalid")
    clock.advance(61)
    assert (await m.send(conv, "free again", "c2"))["t"] == "sent"
    await a.ok_group("mute", conv=conv, users=["m"], duration_ms=60_000)
    err(await m.send(conv, "no", "c3"), "muted")
    await a.ok_group("mute", conv=conv, users=["m"], duration_ms=0)  # lifted
    assert (await m.send(conv, "yes", "c4"))["t"] == "sent"
    everyone = await o.ok_group("mute_all", conv=conv, on=True)
    assert everyone["info"]["muted_all"] is True
    err(await m.send(conv, "quiet?", "c5"), "muted")
    assert (await a.send(conv, "admins speak", "c6"))["t"] == "sent"
    assert (await o.ok_group("mute_all", conv=conv, on=True))["seq"] == 0  # no change
    await o.ok_group("mute_all", conv=conv, on=False)
    assert (await m.send(conv, "back", "c7"))["t"] == "sent"
    for d in (o, a, m):
        await d.raw.close()


async def test_removed_member_loses_access_and_learns_it(harness: Harness) -> None:
    """A removed member's devices get the remove entry, then nothing more of the group;
    sync tells a device that was away that the group is gone; reads are refused."""
    await users(harness, "o", "x", "y")
    o = await Dev.open(harness, "o")
    x = await Dev.open(harness, "x")
    conv = (await o.ok_group("create", users=["x", "y"]))["conv"]
    first = await x.ask({"t": "sync", "since": "0", "have": {}})
    await x.drain()
    rm = await o.ok_group("remove", conv=conv, users=["x"])
    got = await x.wait_push(lambda p: p["seq"] == rm["seq"])
    assert got["body"] == {"op": "remove", "by": "o", "users": ["x"], "count": 1}
    await o.send(conv, "after", "a1")
    await x.drain(0.3)
    assert not [p for p in x.pushes if p["seq"] > rm["seq"]]
    err(await x.send(conv, "still here?", "x1"), "forbidden")
    err(await x.ask({"t": "history", "conv": conv}), "forbidden")
    again = await x.ask({"t": "sync", "since": first["wm"], "have": {conv: 1}, "cv": first["cv"]})
    assert again["left"] == [conv] and not [s for s in again["states"] if s["conv"] == conv]
    listed = await x.ask({"t": "convs"})
    assert conv not in [i["conv"] for i in listed["convs"]]
    # Added back: sees the group from the new add entry on.
    add = await o.ok_group("add", conv=conv, users=["x"])
    back = await x.ask({"t": "sync", "since": again["wm"], "have": {conv: 1}, "cv": again["cv"]})
    assert back["left"] == []
    (state,) = [s for s in back["convs"] if s["conv"] == conv]
    assert state["base"] == add["seq"] - 1
    assert [m["seq"] for m in back["msgs"] if m["conv"] == conv] == [add["seq"]]
    await o.raw.close()
    await x.raw.close()


async def test_history_from_joining(harness: Harness) -> None:
    """A new member sees entries from their add entry on (history paging stops there);
    with visible history, everything; unread starts at zero either way."""
    await users(harness, "o", "early", "late", "late2")
    o = await Dev.open(harness, "o")
    conv = (await o.ok_group("create", users=["early"]))["conv"]
    for i in range(3):
        await o.send(conv, f"old {i}", f"old{i}")
    add = await o.ok_group("add", conv=conv, users=["late"])
    await o.send(conv, "new", "new0")
    late = await Dev.open(harness, "late")
    page = await late.ask({"t": "history", "conv": conv})
    assert [m["seq"] for m in page["msgs"]] == [add["seq"], add["seq"] + 1]
    assert page["more"] is False
    synced = await late.ask({"t": "sync", "since": "0", "have": {}})
    assert [m["seq"] for m in synced["msgs"] if m["conv"] == conv] == [5, 6]
    listed = await late.ask({"t": "convs"})
    (item,) = listed["convs"]
    assert item["unread"] == 1  # "new" only
    vis = (await o.ok_group("profile", conv=conv, history_visible=True))["info"]
    assert vis["history_visible"] is True
    await o.ok_group("add", conv=conv, users=["late2"])
    l2 = await Dev.open(harness, "late2")
    page = await l2.ask({"t": "history", "conv": conv})
    assert page["msgs"][0]["seq"] == 1
    listed = await l2.ask({"t": "convs"})
    assert listed["convs"][0]["unread"] == 0
    for d in (o, late, l2):
        await d.raw.close()


async def test_size_limit_and_member_paging(make_server: Any) -> None:
    """Adds past the group's limit are `group_full` (nothing added); the member list
    pages with opaque cursors; the server's limit bounds what a group may ask."""
    h = await make_server(group_max_members=6)
    names = [f"u{i}" for i in range(8)]
    await users(h, "own", *names)
    o = await Dev.open(h, "own")
    err(await o.group("create", users=names), "group_full")
    conv = (await o.ok_group("create", users=names[:3]))["conv"]
    err(await o.group("add", conv=conv, users=names[3:6]), "group_full")
    assert (await o.ok_group("add", conv=conv, users=names[3:5]))["info"]["member_count"] == 6
    seen: list[str] = []
    cursor = ""
    while True:
        page = await o.ask({"t": "members", "conv": conv, "cursor": cursor, "limit": 4})
        seen += [m["user"] for m in page["members"]]
        cursor = page["next"]
        if not cursor:
            break
    assert seen == sorted(["own", *names[:5]])
    err(await o.ask({"t": "members", "conv": conv, "cursor": "%%%"}), "invalid")
    await o.raw.close()


async def test_idempotent_operations(harness: Harness) -> None:
    """A retried operation with the same cid answers the first result (`dup`) and writes
    nothing new; a cid used for a message is a `conflict`."""
    await users(harness, "o", "p", "q")
    o = await Dev.open(harness, "o")
    first = await o.ok_group("create", users=["p"], cid="mk-1", conv="trip")
    assert first["conv"] == "g:trip"
    again = await o.ok_group("create", users=["p"], cid="mk-1", conv="trip")
    assert again["dup"] is True and again["seq"] == first["seq"]
    add1 = await o.ok_group("add", conv="g:trip", users=["q"], cid="add-q")
    add2 = await o.ok_group("add", conv="g:trip", users=["q"], cid="add-q")
    assert (add2["dup"], add2["seq"]) == (True, add1["seq"])
    await o.send("g:trip", "msg", "used")
    err(await o.group("add", conv="g:trip", users=["q"], cid="used"), "conflict")
    info = (await o.ok_group("info", conv="g:trip"))["info"]
    assert info["last_seq"] == 3 and info["member_count"] == 3
    await o.raw.close()


async def test_profile_announcement_and_limits(harness: Harness) -> None:
    """Profile and announcement changes are entries with the changed fields; oversize
    texts are `too_large`; unknown or empty changes are `invalid`."""
    await users(harness, "o", "m")
    o = await Dev.open(harness, "o")
    m = await Dev.open(harness, "m")
    conv = (await o.ok_group("create", users=["m"], name="A"))["conv"]
    ans = await o.ok_group("profile", conv=conv, name="B", announcement="Meet at 9")
    pushed = await m.wait_push(lambda p: p["seq"] == ans["seq"])
    assert pushed["body"] == {"op": "profile", "by": "o", "name": "B", "announcement": "Meet at 9"}
    info = (await m.ok_group("info", conv=conv))["info"]
    assert (info["name"], info["announcement"], info["role"]) == ("B", "Meet at 9", "member")
    err(await o.group("profile", conv=conv, announcement="x" * 9000), "too_large")
    err(await o.group("profile", conv=conv), "invalid")
    assert (await o.ok_group("profile", conv=conv, name="B"))["seq"] == 0
    await o.raw.close()
    await m.raw.close()


async def test_receipts_and_coalesced_reads(make_server: Any) -> None:
    """Group reads answer at once and reach the reader's other devices, are written
    coalesced (one row per member however often they read), and then count as "read by
    N" with the readers listed in small groups and counts only in larger ones."""
    h = await make_server(group_read_flush_ms=3_600_000, group_receipt_list_max=3)
    await users(h, "o", "r1", "r2", "r3")
    o = await Dev.open(h, "o")
    r1 = await Dev.open(h, "r1")
    r1b = await Dev.open(h, "r1", "d2")
    conv = (await o.ok_group("create", users=["r1", "r2"]))["conv"]
    for i in range(3):
        await o.send(conv, f"m{i}", f"m{i}")  # seqs 2, 3, 4
    reads = h.server.messaging.reads
    written = h.server.store.rows_written
    ans = await r1.ask({"t": "read", "conv": conv, "seq": 3})
    assert (ans["t"], ans["seq"], ans["unread"]) == ("read", 3, 1)
    ev = [e for e in (await r1b.drain() or r1b.events) if e["t"] == "read"]
    assert ev and ev[-1]["seq"] == 3 and ev[-1]["unread"] == 1
    ans = await r1.ask({"t": "read", "conv": conv, "seq": 2})  # never backwards
    assert (ans["seq"], ans["unread"]) == (3, 1)
    ans = await r1.ask({"t": "read", "conv": conv, "seq": 4})
    assert (ans["seq"], ans["unread"]) == (4, 0)
    assert h.server.store.rows_written == written, "nothing written before the flush"
    before = await o.ask({"t": "receipts", "conv": conv, "seqs": [2, 4]})
    assert [(x["seq"], x["count"]) for x in before["receipts"]] == [(2, 0), (4, 0)]
    await reads.flush()
    # One member row and one change-log row for three reads (on PostgreSQL also the
    # user's change-version counter, which keeps each user's versions in commit order).
    extra = 1 if isinstance(h.server.store, PostgresStore) else 0
    assert h.server.store.rows_written - written == 2 + extra
    after = await o.ask({"t": "receipts", "conv": conv, "seqs": [2, 4]})
    assert after["receipts"] == [
        {"seq": 2, "count": 1, "readers": ["r1"]},
        {"seq": 4, "count": 1, "readers": ["r1"]},
    ]
    listed = await r1b.ask({"t": "convs"})
    assert listed["convs"][0]["unread"] == 0 and listed["convs"][0]["read_seq"] == 4
    await o.ok_group("add", conv=conv, users=["r3"])  # four members: counts only
    big = await o.ask({"t": "receipts", "conv": conv, "seqs": [2]})
    assert big["receipts"] == [{"seq": 2, "count": 1}]
    err(await o.ask({"t": "receipts", "conv": conv, "seqs": [99]}), "not_found")
    err(await o.ask({"t": "receipts", "conv": conv, "seqs": []}), "invalid")
    for d in (o, r1, r1b):
        await d.raw.close()


async def test_group_settings_and_delete_for_me(harness: Harness) -> None:
    """Per-user settings and delete-for-me work in groups as in 1:1 conversations."""
    await users(harness, "o", "m")
    o = await Dev.open(harness, "o")
    conv = (await o.ok_group("create", users=["m"]))["conv"]
    await o.send(conv, "one", "s1")
    st = await o.ask({"t": "settings", "conv": conv, "muted": True, "pinned": True})
    assert (st["muted"], st["pinned"]) == (True, True)
    gone = await o.ask({"t": "delete", "conv": conv, "seqs": [2]})
    assert gone["seqs"] == [2]
    page = await o.ask({"t": "history", "conv": conv})
    assert page["msgs"][-1]["deleted"] is True
    await o.raw.close()


async def test_typing_in_small_groups(harness: Harness) -> None:
    """Typing in a group reaches the other members' devices (not the typist's)."""
    await users(harness, "o", "m")
    o = await Dev.open(harness, "o")
    m = await Dev.open(harness, "m")
    conv = (await o.ok_group("create", users=["m"]))["conv"]
    await o.raw.send({"t": "typing", "conv": conv})
    got = await m.raw.until("typing")
    assert got == {"t": "typing", "conv": conv, "from": "o"}
    await o.drain()
    assert not [e for e in o.events if e["t"] == "typing"]
    await o.raw.close()
    await m.raw.close()


async def test_membership_entries_cannot_be_edited_or_recalled(harness: Harness) -> None:
    """The author of a membership entry cannot rewrite or blank it."""
    await users(harness, "o", "m", "x")
    o = await Dev.open(harness, "o")
    conv = (await o.ok_group("create", users=["m"]))["conv"]
    add = await o.ok_group("add", conv=conv, users=["x"])
    forged = {"seq": add["seq"], "body": {"op": "remove", "by": "o", "users": ["m"]}}
    err(
        await o.ask({"t": "send", "conv": conv, "cid": "e1", "type": "edit", "body": forged}),
        "forbidden",
    )
    rec = {"t": "send", "conv": conv, "cid": "r1", "type": "recall", "body": {"seq": add["seq"]}}
    err(await o.ask(rec), "forbidden")
    page = await o.ask({"t": "history", "conv": conv})
    assert page["msgs"][-1]["body"]["op"] == "add"
    assert "edit_version" not in page["msgs"][-1] and "recalled" not in page["msgs"][-1]
    await o.raw.close()


async def test_retry_of_a_stored_message_after_a_mute_answers_dup(harness: Harness) -> None:
    """A member's send that was stored, retried after they were muted, gets its first
    answer (`dup`), not `muted`."""
    await users(harness, "o", "m")
    o = await Dev.open(harness, "o")
    m = await Dev.open(harness, "m")
    conv = (await o.ok_group("create", users=["m"]))["conv"]
    first = await m.send(conv, "hello", "same-cid")
    await o.ok_group("mute", conv=conv, users=["m"], duration_ms=60_000)
    again = await m.send(conv, "hello", "same-cid")
    assert (again["t"], again["seq"], again["dup"]) == ("sent", first["seq"], True)
    err(await m.send(conv, "new one", "other-cid"), "muted")
    await o.raw.close()
    await m.raw.close()


async def test_create_without_an_id_is_idempotent_on_its_cid(harness: Harness) -> None:
    """With no group id, the id derives from (creator, cid): a retry answers `dup`."""
    await users(harness, "o", "m")
    o = await Dev.open(harness, "o")
    first = await o.ok_group("create", users=["m"], cid="make-it")
    again = await o.ok_group("create", users=["m"], cid="make-it")
    assert (again["conv"], again["seq"], again["dup"]) == (first["conv"], 1, True)
    other = await o.ok_group("create", users=["m"], cid="another")
    assert other["conv"] != first["conv"]
    await o.raw.close()


async def test_receipts_leave_out_members_added_later_even_with_visible_history(
    make_server: Any,
) -> None:
    """A member added after an entry is not one of its readers, history visible or not;
    large groups get fewer seqs per receipts request."""
    h = await make_server(group_history_visible=True)
    await users(h, "o", "r", "late")
    o = await Dev.open(h, "o")
    r = await Dev.open(h, "r")
    conv = (await o.ok_group("create", users=["r"]))["conv"]
    sent = await o.send(conv, "before", "b1")
    await r.ask({"t": "read", "conv": conv, "seq": sent["seq"]})
    await o.ok_group("add", conv=conv, users=["late"])
    await h.server.messaging.reads.flush()
    got = await o.ask({"t": "receipts", "conv": conv, "seqs": [sent["seq"]]})
    assert got["receipts"] == [{"seq": sent["seq"], "count": 1, "readers": ["r"]}]
    with pytest.raises(TidingsError) as caught:
        await h.server.groups.receipts(conv, list(range(1, 22)), size=100_000)
    assert caught.value.code == "invalid"
    await o.raw.close()
    await r.raw.close()


async def test_removed_then_readded_member_rebuilds_the_group_from_sync(make_server: Any) -> None:
    """With visible history, a new device of a member who was removed and added back
    syncs the whole group, the old removal included, and keeps it."""
    h = await make_server(group_history_visible=True)
    await users(h, "o", "b")
    o = await Dev.open(h, "o")
    conv = (await o.ok_group("create", users=["b"]))["conv"]
    await o.send(conv, "one", "c1")
    await o.ok_group("remove", conv=conv, users=["b"])
    await o.ok_group("add", conv=conv, users=["b"])
    await o.send(conv, "two", "c2")
    c = await h.client("b", "fresh", keep_messages=True)
    await c.sync_now()
    view = c.state.convs.get(conv)
    assert view is not None and view.last_seq == 5
    assert sorted(c.state.messages[conv]) == [1, 2, 3, 4, 5]
    assert c.held[conv] == 5
    await o.raw.close()


async def test_member_cache_keeps_entries_from_before_a_join_from_the_new_member() -> None:
    """An entry that waited for the member set to load goes to the members of its time,
    not to one added after it (whose add the snapshot already holds)."""
    from tidings.bus.base import MessageEvent
    from tidings.services.groups import MemberCache
    from tidings.store.base import MessageRecord

    class Store:
        async def member_snapshot(self, conv: str) -> tuple[int, list[tuple[str, int]]]:
            return 11, [("o", 0), ("m", 0), ("eve", 10)]

    cache = MemberCache(Store())  # type: ignore[arg-type]
    got: list[tuple[int, set[str]]] = []

    def rec(seq: int) -> MessageRecord:
        return MessageRecord("g:x", seq, seq, "o", "d", f"c{seq}", "text", {}, 0)

    cache.handle(MessageEvent(rec(10), ()), lambda e, users: got.append((e.record.seq, set(users))))
    cache.handle(MessageEvent(rec(12), ()), lambda e, users: got.append((e.record.seq, set(users))))
    await asyncio.sleep(0.05)
    assert got == [(10, {"o", "m"}), (12, {"o", "m", "eve"})]


async def test_member_cache_applies_entries_in_seq_order_across_publishers() -> None:
    """On a cluster a group's entries may arrive out of order (published by different
    nodes). A message that overtakes the removal before it waits for it: the removed
    member never gets the message. An entry that never comes (its node died before
    publishing) makes the set be read again after the wait, and what waited goes to the
    members of the fresh set."""
    from tidings.bus.base import MessageEvent
    from tidings.services.groups import MemberCache
    from tidings.store.base import MessageRecord

    class Store:
        snapshot: tuple[int, list[tuple[str, int]]] = (5, [("o", 0), ("m", 0), ("x", 0)])

        async def member_snapshot(self, conv: str) -> tuple[int, list[tuple[str, int]]]:
            return self.snapshot

    store = Store()
    cache = MemberCache(store, gap_wait_s=0.1)  # type: ignore[arg-type]
    got: list[tuple[int, set[str]]] = []

    def deliver(e: MessageEvent, users: set[str]) -> None:
        got.append((e.record.seq, set(users)))

    def ev(seq: int, left: tuple[str, ...] = ()) -> MessageEvent:
        rec = MessageRecord("g:x", seq, seq, "o", "d", f"c{seq}", "text", {}, 0)
        return MessageEvent(rec, (), left=left)

    cache.handle(ev(6), deliver)
    await asyncio.sleep(0.02)
    assert got == [(6, {"o", "m", "x"})]
    cache.handle(ev(8), deliver)  # overtook 7, which removes x
    assert got == [(6, {"o", "m", "x"})]
    cache.handle(ev(7, left=("x",)), deliver)
    assert got[1:] == [(7, {"o", "m", "x"}), (8, {"o", "m"})]  # x gets its removal only
    # 9 is lost for good (its node died before publishing); 10 comes.
    store.snapshot = (10, [("o", 0), ("m", 0), ("n", 9)])
    cache.handle(ev(10), deliver)
    assert len(got) == 3  # held
    await asyncio.sleep(0.3)
    assert got[3:] == [(10, {"o", "m", "n"})] and cache.reloads == 1
    cache.handle(ev(11), deliver)
    assert got[4:] == [(11, {"o", "m", "n"})]
    cache.clear()  # (a resync hint) the next entry reads the set again
    store.snapshot = (12, [("o", 0), ("m", 0), ("n", 9)])
    cache.handle(ev(12), deliver)
    await asyncio.sleep(0.05)
    assert got[5:] == [(12, {"o", "m", "n"})] and cache.loads == 3


async def test_member_cache_late_entry_skips_members_who_joined_after_it() -> None:
    """An entry published late by another node, older than a later add, does not go to
    the member that add brought in (a group without visible history)."""
    from tidings.bus.base import MessageEvent
    from tidings.services.groups import MemberCache
    from tidings.store.base import MessageRecord

    class Store:
        async def member_snapshot(self, conv: str) -> tuple[int, list[tuple[str, int]]]:
            return 5, [("a", 0), ("b", 0)]

    cache = MemberCache(Store(), gap_wait_s=0.1)  # type: ignore[arg-type]
    got: list[tuple[int, set[str]]] = []

    def deliver(e: MessageEvent, users: set[str]) -> None:
        got.append((e.record.seq, set(users)))

    def ev(seq: int, joined: tuple[str, ...] = ()) -> MessageEvent:
        rec = MessageRecord("g:y", seq, seq, "a", "d", f"c{seq}", "text", {}, 0)
        return MessageEvent(rec, (), joined=joined)

    cache.handle(ev(6, joined=("c",)), deliver)  # c joins at 6
    await asyncio.sleep(0.02)
    cache.handle(ev(7), deliver)
    cache.handle(ev(5), deliver)  # older than c's add, arriving last
    assert got == [(6, {"a", "b", "c"}), (7, {"a", "b", "c"}), (5, {"a", "b"})]


async def test_refusals_for_targets_sizes_and_muted_amends(make_server: Any) -> None:
    """The documented refusals not shown elsewhere: a target that is not a member
    (`not_found`) for remove, mute, role and transfer; a remove of more than 100 users
    (`too_large`); a transfer not naming exactly one user (`invalid`); recall and edit by
    a muted member (`muted`). None of them writes an entry."""
    clock = ManualClock()
    h = await make_server(clock=clock)
    await users(h, "o", "m", "outsider", *(f"u{i}" for i in range(101)))
    o = await Dev.open(h, "o")
    m = await Dev.open(h, "m")
    conv = (await o.ok_group("create", users=["m"]))["conv"]
    for op, extra in (
        ("remove", {}),
        ("mute", {"duration_ms": 1000}),
        ("role", {"role": "admin"}),
        ("transfer", {}),
    ):
        err(await o.group(op, conv=conv, users=["outsider"], **extra), "not_found")
    err(await o.group("remove", conv=conv, users=[f"u{i}" for i in range(101)]), "too_large")
    err(
        await o.group("mute", conv=conv, users=[f"u{i}" for i in range(101)], duration_ms=9),
        "too_large",
    )
    err(await o.group("transfer", conv=conv, users=["m", "o"]), "invalid")
    err(await o.group("transfer", conv=conv, users=[]), "invalid")
    sent = await m.send(conv, "before the mute", "c1")
    assert sent["t"] == "sent"
    await o.ok_group("mute", conv=conv, users=["m"], duration_ms=60_000)
    recall = {"t": "send", "conv": conv, "type": "recall", "body": {"seq": sent["seq"]}}
    err(await m.ask({**recall, "cid": "r1"}), "muted")
    edit = {
        "t": "send",
        "conv": conv,
        "type": "edit",
        "body": {"seq": sent["seq"], "body": {"text": "changed"}},
    }
    err(await m.ask({**edit, "cid": "e1"}), "muted")
    info = (await o.ok_group("info", conv=conv))["info"]
    assert info["last_seq"] == sent["seq"] + 1  # only the mute entry after the message
    assert info["member_count"] == 2 and info["owner"] == "o"
    for d in (o, m):
        await d.raw.close()


def test_group_push_is_encoded_once_per_codec_and_framing() -> None:
    """A group entry for many members' devices is encoded once per (codec, framing):
    every device of the same kind gets the very same bytes object; the sending device
    gets nothing."""
    from tidings.bus.base import MessageEvent
    from tidings.clock import SystemClock
    from tidings.gateway.hub import Hub
    from tidings.protocol.codec import Codec
    from tidings.store.base import MessageRecord

    class Link:
        def __init__(self, codec: str, framing: str) -> None:
            self.codec = Codec(codec)
            self.framing = framing

        def frame(self, payload: bytes) -> bytes:
            return self.framing.encode() + payload

    class Device:
        def __init__(self, uid: str, device: str, codec: str, framing: str) -> None:
            self.uid, self.device = uid, device
            self.link = Link(codec, framing)
            self.got: list[bytes] = []

        def push(self, conv: str, seq: int, data: bytes) -> None:
            self.got.append(data)

    hub = Hub(SystemClock())
    kinds = [("json", "ws"), ("msgpack", "ws"), ("msgpack", "tcp")]
    devices = [Device(f"u{i}", "d1", *kinds[i % 3]) for i in range(30)] + [
        Device("u0", "d2", "json", "ws")
    ]
    for d in devices:
        hub.by_user.setdefault(d.uid, set()).add(d)  # type: ignore[arg-type]
    rec = MessageRecord("g:team", 7, 70, "u0", "d1", "c7", "text", {"text": "hi"}, 1)
    hub._deliver(MessageEvent(rec, (), "d1"), {f"u{i}" for i in range(30)})
    sender = devices[0]
    assert sender.got == []
    got = [d for d in devices if d is not sender]
    assert all(len(d.got) == 1 for d in got)
    assert len({id(d.got[0]) for d in got}) == 3  # one bytes object per kind
    for kind in kinds:
        same = {id(d.got[0]) for d in got if (d.link.codec.name, d.link.framing) == kind}
        assert len(same) == 1
    assert hub.pushes == 30
