"""Groups through the server HTTP API: create, bulk add (idempotent), remove, any
operation, member paging, system messages, receipts, history; and the cost of a message
in a 100,000-member group (rows written) next to a 10-member one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.conftest import Harness
from tests.test_groups import Dev
from tests.test_http_api import call


async def test_group_lifecycle_over_http(harness: Harness) -> None:
    """An app backend creates a group, adds members in bulk (a retried key answers the
    first result), sends a system message, changes roles and mutes, removes a member,
    and pages members, history and receipts; members' devices see every entry."""
    h = harness
    for u in ("boss", "ann", "ben", "cid", "dee"):
        await h.user(u)
    ann = await Dev.open(h, "ann")
    st, made = await call(
        h, "POST", "/v1/groups", {"owner": "boss", "id": "team", "name": "Team", "key": "k1"}
    )
    assert st == 201 and made["info"]["conv"] == "g:team" and made["seq"] == 1
    st, again = await call(h, "POST", "/v1/groups", {"owner": "boss", "id": "team", "key": "k1"})
    assert st == 200 and again["dup"] is True and again["seq"] == 1
    st, added = await call(
        h, "POST", "/v1/groups/team/members", {"users": ["ann", "ben", "cid"], "key": "bulk-1"}
    )
    assert st == 200 and added["seq"] == 2 and added["info"]["member_count"] == 4
    st, retry = await call(
        h, "POST", "/v1/groups/g:team/members", {"users": ["ann", "ben", "cid"], "key": "bulk-1"}
    )
    assert (st, retry["dup"], retry["seq"]) == (200, True, 2)
    st, sent = await call(
        h,
        "POST",
        "/v1/messages",
        {"from": "boss", "conv": "g:team", "cid": "sys-1", "type": "system", "body": {"t": "hi"}},
    )
    assert st == 200 and sent["seq"] == 3
    pushed = await ann.wait_push(lambda m: m["seq"] == 3)
    assert (pushed["type"], pushed["dev"]) == ("system", "server")
    st, role = await call(
        h, "POST", "/v1/groups/team/ops", {"op": "role", "users": ["ann"], "role": "admin"}
    )
    assert st == 200 and role["seq"] == 4
    st, muted = await call(
        h,
        "POST",
        "/v1/groups/team/ops",
        {"op": "mute", "by": "ann", "users": ["ben"], "duration_ms": 60_000},
    )
    assert st == 200 and muted["seq"] == 5
    st, bad = await call(
        h, "POST", "/v1/groups/team/ops", {"op": "mute", "by": "ben", "users": ["cid"]}
    )
    assert st == 400 and bad["error"]["code"] == "invalid"  # no duration
    st, bad = await call(
        h,
        "POST",
        "/v1/groups/team/ops",
        {"op": "mute", "users": ["boss"], "duration_ms": 5},
    )
    assert st == 403 and bad["error"]["code"] == "forbidden"  # never the owner
    st, gone = await call(h, "DELETE", "/v1/groups/team/members/cid?key=rm-cid")
    assert st == 200 and gone["info"]["member_count"] == 3
    st, bad = await call(h, "DELETE", "/v1/groups/team/members/boss")
    assert st == 403  # the owner is never removed
    st, page1 = await call(h, "GET", "/v1/groups/team/members?limit=2")
    _, page2 = await call(h, "GET", f"/v1/groups/team/members?limit=2&cursor={page1['next']}")
    assert [m["user"] for m in page1["members"] + page2["members"]] == ["ann", "ben", "boss"]
    assert page2["next"] == ""
    st, hist = await call(h, "GET", "/v1/conversations/g:team/messages?limit=100")
    assert st == 200 and [m["seq"] for m in hist["msgs"]] == [1, 2, 3, 4, 5, 6]
    await ann.ask({"t": "read", "conv": "g:team", "seq": 3})
    await h.server.messaging.reads.flush()
    st, rc = await call(h, "GET", "/v1/groups/team/receipts?seqs=3")
    assert st == 200 and rc["receipts"] == [{"seq": 3, "count": 1, "readers": ["ann"]}]
    st, info = await call(h, "GET", "/v1/groups/team")
    assert st == 200 and info["info"]["owner"] == "boss" and info["info"]["last_seq"] == 6
    st, tr = await call(h, "POST", "/v1/groups/team/ops", {"op": "transfer", "users": ["ann"]})
    assert st == 200 and tr["info"]["owner"] == "ann"
    await ann.raw.close()


async def test_http_group_errors(harness: Harness) -> None:
    """Unknown groups are 404, bad ids and ops 400, over-limit bulk adds 413, unknown
    users 404; the admin key is required."""
    h = harness
    await h.user("own")
    st, body = await call(h, "GET", "/v1/groups/none")
    assert st == 404 and body["error"]["code"] == "not_found"
    st, body = await call(h, "POST", "/v1/groups", {"owner": "own", "id": "bad id!"})
    assert st == 400
    st, body = await call(h, "POST", "/v1/groups", {"owner": "ghost"})
    assert st == 404
    st, body = await call(h, "POST", "/v1/groups", {"owner": "own", "id": "g1", "max_members": 0})
    assert st == 400
    assert (await call(h, "POST", "/v1/groups", {"owner": "own", "id": "g1"}))[0] == 201
    st, body = await call(h, "POST", "/v1/groups/g1/ops", {"op": "create"})
    assert st == 400
    st, body = await call(h, "POST", "/v1/groups/g1/members", {"users": ["x"] * 10_001})
    assert st == 413 and body["error"]["code"] == "too_large"
    st, body = await call(h, "POST", "/v1/groups/g1/members", {"users": ["nobody"]})
    assert st == 404
    st, body = await call(h, "GET", "/v1/groups/g1", key="wrong" * 8)
    assert st == 401
    st, body = await call(h, "GET", "/v1/groups/g1/receipts?seqs=a")
    assert st == 400


async def _group_of(h: Harness, gid: str, members: list[str]) -> None:
    st, _ = await call(h, "POST", "/v1/groups", {"owner": "owner", "id": gid})
    assert st == 201
    for i in range(0, len(members), 10_000):
        st, body = await call(
            h,
            "POST",
            f"/v1/groups/{gid}/members",
            {"users": members[i : i + 10_000], "key": f"{gid}-{i}"},
        )
        assert st == 200, body


async def _rows_for_one_message(h: Harness, dev: Dev, conv: str, cid: str) -> int:
    store = h.server.store
    await asyncio.sleep(0.05)  # let other writes settle
    before = store.rows_written
    assert (await dev.send(conv, "one message", cid))["t"] == "sent"
    return store.rows_written - before


async def test_message_in_100k_group_writes_what_it_writes_in_10(make_server: Any) -> None:
    """A 100,000-member group built through the bulk API: one message writes the same
    rows across all tables as in a 10-member group (stored once, read by many), and an
    online member still gets it."""
    h = await make_server(group_read_flush_ms=3_600_000)
    store = h.server.store
    n = 100_000  # the owner and n - 1 others: the default size limit exactly
    names = [f"m{i:06d}" for i in range(n - 1)]
    t0 = time.monotonic()
    await h.user("owner")
    for i in range(0, len(names), 5_000):
        await asyncio.gather(*(store.put_user(u, u, "", None, 0) for u in names[i : i + 5_000]))
    await _group_of(h, "big", names)
    await _group_of(h, "small", names[:9])
    st, info = await call(h, "GET", "/v1/groups/big")
    assert info["info"]["member_count"] == n
    st, body = await call(h, "POST", "/v1/groups/big/members", {"users": ["m000000", "owner"]})
    assert st == 200 and body["seq"] == 0  # all members already: nothing to do
    await h.user("one-too-many")
    st, body = await call(h, "POST", "/v1/groups/big/members", {"users": ["one-too-many"]})
    assert st == 409 and body["error"]["code"] == "group_full"
    owner = await Dev.open(h, "owner")
    member = await Dev.open(h, "m054321")
    small_rows = await _rows_for_one_message(h, owner, "g:small", "s1")
    big_rows = await _rows_for_one_message(h, owner, "g:big", "b1")
    assert big_rows == small_rows == 3  # the entry, the conversation, the sender's position
    got = await member.wait_push(
        lambda m: m["conv"] == "g:big" and m["from"] == "owner" and m["type"] == "text"
    )
    assert got["body"] == {"text": "one message"}
    # A read in the big group is coalesced; its flush writes that member's rows only.
    await member.ask({"t": "read", "conv": "g:big", "seq": got["seq"]})
    before = store.rows_written
    await h.server.messaging.reads.flush()
    assert store.rows_written - before == 2
    st, rc = await call(h, "GET", f"/v1/groups/big/receipts?seqs={got['seq']}")
    assert rc["receipts"] == [{"seq": got["seq"], "count": 1}]  # counts only: too big to list
    assert time.monotonic() - t0 < 300
    await owner.raw.close()
    await member.raw.close()
