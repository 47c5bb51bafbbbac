"""The `Store` contract: every implementation must pass these (see store/base.py).

A test module subclasses `StoreContract` and provides an ``open_store`` fixture that
returns an async factory: ``await open_store()`` gives an opened store on the same
backing data each time (so a close + reopen is a restart).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from tidings.domain.ids import direct_conversation_id
from tidings.protocol.errors import TidingsError
from tidings.store.base import Amend, AuthState, DeliveredMove, NewMessage, Store

Opener = Callable[[], Awaitable[Store]]
_pack = msgspec.msgpack.encode


def new_msg(sender: str, peer: str, cid: str, text: str = "hi", **kw: Any) -> NewMessage:
    body = {"text": text}
    return NewMessage(
        conv=direct_conversation_id(sender, peer),
        sender=sender,
        dev="d1",
        cid=cid,
        type="text",
        body=body,
        body_bytes=_pack(body),
        members=(sender, peer),
        **kw,
    )


async def with_users(store: Store, *uids: str) -> None:
    for u in uids:
        await store.put_user(u, u, "", None, 1)


class _ClockBehind:
    """A wall clock one minute behind the real one (an NTP step or a VM restore)."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock

    def now_ms(self) -> int:
        return int(self._clock.now_ms()) - 60_000

    def monotonic(self) -> float:
        return float(self._clock.monotonic())


class StoreContract:
    async def test_seqs_are_gapless_and_in_commit_order(self, open_store: Opener) -> None:
        """Concurrent appends to one conversation get seqs 1..N, each exactly once."""
        store = await open_store()
        await with_users(store, "a", "b")
        results = await asyncio.gather(
            *(
                store.append_message(new_msg("a" if i % 2 else "b", "b" if i % 2 else "a", f"c{i}"))
                for i in range(300)
            )
        )
        assert sorted(r.record.seq for r in results) == list(range(1, 301))
        rows = await store.messages_after("d:a|b", 0, 1000)
        assert [r.seq for r in rows] == list(range(1, 301))
        mids = [r.mid for r in rows]
        assert mids == sorted(mids) and len(set(mids)) == 300
        await store.close()

    async def test_duplicate_client_id_returns_original(self, open_store: Opener) -> None:
        """The same (sender, cid) answers the original record with dup=True, even in one batch."""
        store = await open_store()
        await with_users(store, "a", "b")
        first, second = await asyncio.gather(
            store.append_message(new_msg("a", "b", "same")),
            store.append_message(new_msg("a", "b", "same")),
        )
        assert first.record.mid == second.record.mid and {first.dup, second.dup} == {False, True}
        again = await store.append_message(new_msg("a", "b", "same"))
        assert again.dup and again.record.seq == 1
        other_sender = await store.append_message(new_msg("b", "a", "same"))
        assert not other_sender.dup and other_sender.record.seq == 2
        await store.close()

    async def test_same_client_id_other_content_conflicts(self, open_store: Opener) -> None:
        """A reused cid with different content is a conflict, and burns no seq."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        await store.append_message(new_msg("a", "b", "k"))
        with pytest.raises(TidingsError) as err:
            await store.append_message(new_msg("a", "b", "k", text="changed"))
        assert err.value.code == "conflict"
        with pytest.raises(TidingsError):
            await store.append_message(new_msg("a", "c", "k"))
        nxt = await store.append_message(new_msg("a", "b", "k2"))
        assert nxt.record.seq == 2
        await store.close()

    async def test_bad_row_fails_alone(self, open_store: Opener) -> None:
        """In one batch, a message to an unknown user fails alone; the others commit gaplessly."""
        store = await open_store()
        await with_users(store, "a", "b")
        futs = [store.append_message(new_msg("a", "b", f"ok{i}")) for i in range(5)]
        futs.insert(2, store.append_message(new_msg("a", "ghost", "bad")))
        results = await asyncio.gather(*futs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], TidingsError)
        assert errors[0].code == "not_found"
        good = [r.record.seq for r in results if not isinstance(r, BaseException)]
        assert good == [1, 2, 3, 4, 5]
        assert await store.conversation(direct_conversation_id("a", "ghost")) is None
        await store.close()

    async def test_durable_across_restart(self, open_store: Opener) -> None:
        """Acked messages survive a restart; dedupe and seqs continue from where they were."""
        store = await open_store()
        await with_users(store, "a", "b")
        for i in range(10):
            await store.append_message(new_msg("a", "b", f"m{i}"))
        await store.close()
        store = await open_store()
        again = await store.append_message(new_msg("a", "b", "m3"))
        assert again.dup and again.record.seq == 4
        nxt = await store.append_message(new_msg("b", "a", "new"))
        assert nxt.record.seq == 11
        await store.close()

    async def test_ids_after_restart_exceed_stored_ids(self, open_store: Opener) -> None:
        """After a restart new message ids are above every stored one (clock steps back)."""
        store = await open_store()
        await with_users(store, "a", "b")
        last = (await store.append_message(new_msg("a", "b", "before"))).record.mid
        await store.close()
        store = await open_store()
        store.clock = _ClockBehind(store.clock)  # type: ignore[attr-defined]
        nxt = (await store.append_message(new_msg("a", "b", "after"))).record.mid
        assert nxt > last
        await store.close()

    async def test_history_pages(self, open_store: Opener) -> None:
        """history() pages backwards in ascending order; messages_after() pages forwards."""
        store = await open_store()
        await with_users(store, "a", "b")
        for i in range(12):
            await store.append_message(new_msg("a", "b", f"h{i}", text=f"t{i}"))
        newest = await store.history("d:a|b", 0, 5)
        assert [m.seq for m in newest] == [8, 9, 10, 11, 12]
        older = await store.history("d:a|b", 8, 5)
        assert [m.seq for m in older] == [3, 4, 5, 6, 7]
        assert older[0].body == {"text": "t2"} and older[0].sender == "a"
        after = await store.messages_after("d:a|b", 10, 50)
        assert [m.seq for m in after] == [11, 12]
        assert await store.history("d:nobody|x", 0, 5) == []
        await store.close()

    async def test_changes_and_watermark(self, open_store: Opener) -> None:
        """changed_conversations() lists only conversations past the sync point."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        assert await store.watermark("a") == 0
        r1 = await store.append_message(new_msg("a", "b", "1"))
        r2 = await store.append_message(new_msg("a", "c", "2"))
        assert await store.watermark("a") == r2.record.mid
        assert await store.watermark("b") == r1.record.mid
        assert (await store.login_state("j", "a", "d"))[1] == r2.record.mid
        changed = await store.changed_conversations("a", r1.record.mid, 100)
        assert [c.conv for c in changed] == ["d:a|c"]
        everything = await store.changed_conversations("a", 0, 100)
        assert {c.conv: c.last_seq for c in everything} == {"d:a|b": 1, "d:a|c": 1}
        assert [c.conv for c in await store.changed_conversations("a", 0, 1)] == ["d:a|b"]
        assert await store.is_member("d:a|b", "b") and not await store.is_member("d:a|b", "c")
        await store.close()

    async def test_users_and_revocation(self, open_store: Opener) -> None:
        """put_user is idempotent; revocations are stored."""
        store = await open_store()
        user, created = await store.put_user("u", "U", "name", "hash", 5)
        assert created and user.display == "U"
        user2, created2 = await store.put_user("u", "U", "renamed", None, 6)
        assert not created2 and user2.name == "renamed" and user2.password_hash == "hash"
        assert await store.users_exist(["u", "v"]) == {"u"}
        with pytest.raises(TidingsError) as taken:
            await store.create_user("u", "U", "intruder", "other-hash", 8)
        assert taken.value.code == "conflict"
        assert (await store.get_user("u")) == user2
        created3 = await store.create_user("w", "W", "", "h", 9)
        assert created3.uid == "w" and (await store.get_user("w")) == created3
        await store.upsert_device("u", "d", "ios", 7)
        state = await store.auth_state("j1", "u", "d")
        assert not state.token_revoked and state.device_revoked_before_ms == 0
        await store.revoke_token("j1", "u", "d", 2**50)
        await store.revoke_device("u", "d", 1234)
        state = await store.auth_state("j1", "u", "d")
        assert state.token_revoked and state.device_revoked_before_ms == 1234
        state, wm = await store.login_state("j1", "u", "d")  # the same, with the watermark
        assert state.token_revoked and state.device_revoked_before_ms == 1234 and wm == 0
        assert (await store.login_state("j2", "u", "other"))[0] == AuthState(False, 0)
        await store.close()
        store = await open_store()
        assert (await store.auth_state("j1", "u", "d")).token_revoked
        await store.close()

    async def test_unread_is_derived(self, open_store: Opener) -> None:
        """Unread = countable entries past the read position; sending advances the sender's
        position; silent / not-counted entries never count; reads never go backwards."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        for i in range(3):
            await store.append_message(new_msg("a", "b", f"m{i}"))
        quiet = msgspec.structs.replace(new_msg("a", "b", "q"), counted=False)
        await store.append_message(quiet)
        convs, badge = await store.conversation_list("b", 10)
        assert badge == 3 and convs[0].unread == 3 and convs[0].read_seq == 0
        assert convs[0].last is not None and convs[0].last.cid == "q"
        mine, my_badge = await store.conversation_list("a", 10)
        assert my_badge == 0 and mine[0].read_seq == 4 and mine[0].peer_read_seq == 0
        r = await store.mark_read("b", "d:a|b", 2)
        assert (r.read_seq, r.unread, r.changed) == (2, 1, True) and r.version > 0
        back = await store.mark_read("b", "d:a|b", 1)
        assert (back.read_seq, back.unread, back.changed) == (2, 1, False)
        far = await store.mark_read("b", "d:a|b", 10**9)
        assert (far.read_seq, far.unread) == (4, 0)
        mine, _ = await store.conversation_list("a", 10)
        assert mine[0].peer_read_seq == 4
        await store.append_message(new_msg("b", "a", "reply"))
        convs, badge = await store.conversation_list("b", 10)
        assert (convs[0].read_seq, convs[0].unread, badge) == (5, 0, 0)
        with pytest.raises(TidingsError) as err:
            await store.mark_read("c", "d:a|b", 1)
        assert err.value.code == "forbidden"
        await store.close()

    async def test_delivered_positions(self, open_store: Opener) -> None:
        """Delivered positions move forward only, are capped at the last seq, never trail
        the read position, are logged for the other member, survive a restart, and say
        whom to tell (nobody when that member blocks the holder); groups, notes to self
        and non-members are skipped."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        for i in range(3):
            await store.append_message(new_msg("a", "b", f"m{i}"))
        v0 = await store.user_version("a")
        moved = await store.write_delivered([("d:a|b", "b", 2)])
        assert moved == [DeliveredMove("d:a|b", "b", 2, "a")]
        assert await store.user_version("a") > v0
        changed, _ = await store.user_changes_since("a", v0, 10)
        assert changed == ["d:a|b"]
        assert await store.write_delivered([("d:a|b", "b", 2), ("d:a|b", "b", 1)]) == []
        skipped = [("d:a|b", "c", 3), ("d:a|a", "a", 1), ("g:x", "a", 1), ("junk", "a", 1)]
        assert await store.write_delivered(skipped) == []
        (far,) = await store.write_delivered([("d:a|b", "b", 2**64)])
        assert far.seq == 3  # capped at the last seq
        (mine,), _ = await store.conversation_list("a", 10)
        assert (mine.peer_read_seq, mine.peer_delivered_seq) == (0, 3)
        (theirs,), _ = await store.conversation_list("b", 10)
        assert (theirs.peer_read_seq, theirs.peer_delivered_seq) == (3, 3)  # a sent them
        await store.append_message(new_msg("a", "b", "m3"))
        await store.mark_read("b", "d:a|b", 4)
        assert await store.write_delivered([("d:a|b", "b", 4)]) == []  # read already
        (mine,) = await store.conversation_states("a", ["d:a|b"])
        assert (mine.peer_read_seq, mine.peer_delivered_seq) == (4, 4)
        await store.append_message(new_msg("a", "b", "m4"))
        await store.set_block("a", "b", True, 1)
        assert await store.write_delivered([("d:a|b", "b", 5)]) == [
            DeliveredMove("d:a|b", "b", 5, None)
        ]
        await store.close()
        store = await open_store()
        (mine,), _ = await store.conversation_list("a", 10)
        assert mine.peer_delivered_seq == 5
        await store.close()

    async def test_conversation_list_order(self, open_store: Opener) -> None:
        """Newest activity first; the badge sums every conversation, not just the page."""
        store = await open_store()
        await with_users(store, "a", "b", "c", "d")
        await store.append_message(new_msg("b", "a", "1"))
        await asyncio.sleep(0.005)
        await store.append_message(new_msg("c", "a", "2"))
        await asyncio.sleep(0.005)
        await store.append_message(new_msg("d", "a", "3"))
        await asyncio.sleep(0.005)
        await store.append_message(new_msg("b", "a", "4"))
        convs, badge = await store.conversation_list("a", 2)
        assert [c.conv for c in convs] == ["d:a|b", "d:a|d"] and badge == 4
        await store.close()

    async def test_settings(self, open_store: Opener) -> None:
        """Pinned first; muted left out of the badge; hidden until the next message; drafts."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        await store.append_message(new_msg("b", "a", "1"))
        await asyncio.sleep(0.005)
        await store.append_message(new_msg("c", "a", "2"))
        convs, badge = await store.conversation_list("a", 10)
        assert [c.conv for c in convs] == ["d:a|c", "d:a|b"] and badge == 2
        s = await store.update_settings("a", "d:a|b", None, True, None, "half-written")
        assert s.pinned and not s.muted and s.draft == "half-written"
        await store.update_settings("a", "d:a|c", True, None, None, None)
        convs, badge = await store.conversation_list("a", 10)
        assert [c.conv for c in convs] == ["d:a|b", "d:a|c"] and badge == 1
        assert convs[0].settings.draft == "half-written" and convs[1].settings.muted
        hidden = await store.update_settings("a", "d:a|b", None, None, True, None)
        assert hidden.hidden and hidden.pinned
        convs, _ = await store.conversation_list("a", 10)
        assert [c.conv for c in convs] == ["d:a|c"]
        await store.append_message(new_msg("b", "a", "3"))  # a new message unhides
        convs, _ = await store.conversation_list("a", 10)
        assert [c.conv for c in convs] == ["d:a|b", "d:a|c"]
        with pytest.raises(TidingsError) as err:
            await store.update_settings("c", "d:a|b", True, None, None, None)
        assert err.value.code == "forbidden"
        await store.close()

    async def test_running_totals_spans_and_deletions(self, open_store: Opener) -> None:
        """Entries carry the running counted total (``n``); reads give the total at the
        position; ``messages_in`` reads several spans at once; deletions are logged per
        seq with a change version, and recall/edit entries are never deleted alone."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        r1 = (await store.append_message(new_msg("a", "b", "m1"))).record
        quiet = msgspec.structs.replace(new_msg("a", "b", "q"), counted=False)
        r2 = (await store.append_message(quiet)).record
        r3 = (await store.append_message(new_msg("a", "b", "m3"))).record
        assert (r1.n, r2.n, r3.n) == (1, 1, 2)
        await store.append_message(new_msg("a", "c", "other"))
        read = await store.mark_read("b", "d:a|b", 2)
        assert (read.read_n, read.unread) == (1, 1)
        got = await store.messages_in([("d:a|c", 0, 1), ("d:a|b", 1, 3)])
        assert [(m.conv, m.seq, m.n) for m in got] == [
            ("d:a|c", 1, 1),
            ("d:a|b", 2, 1),
            ("d:a|b", 3, 2),
        ]
        body = {"seq": 3, "body": {"text": "m3!"}}
        edit = msgspec.structs.replace(
            new_msg("a", "b", "e1"),
            type="edit",
            body=body,
            body_bytes=_pack(body),
            counted=False,
            reads=False,
            amend=Amend(3, "edit", new_body=body["body"], new_body_bytes=_pack(body["body"])),
        )
        e = (await store.append_message(edit)).record
        assert (e.seq, e.edit_version, e.n) == (4, 1, 2)
        (target,) = await store.messages_in([("d:a|b", 2, 3)])
        assert target.body == {"text": "m3!"} and target.edit_version == 1
        before = await store.user_version("b")
        assert await store.delete_for("b", "d:a|b", [1, 4, 3]) == [1, 3]  # 4 is an edit
        now = await store.user_version("b")
        assert await store.deletions_since("b", before, now, 10) == ({"d:a|b": [1, 3]}, now)
        assert await store.deletions_since("b", 0, before, 10) == ({}, before)
        part, upto = await store.deletions_since("b", before, now, 1)
        assert part == {"d:a|b": [1]} and before < upto < now  # the rest come next time
        assert await store.deleted_in("b", {"d:a|b": (1, 4), "d:a|c": (1, 1)}) == {"d:a|b": {1, 3}}
        assert await store.deleted_in("a", {"d:a|b": (1, 4)}) == {}  # b's, not a's
        assert await store.sync_point("b") == (
            await store.watermark("b"),
            await store.user_version("b"),
        )
        assert await store.sync_point("nobody") == (0, 0)
        convs, _ = await store.conversation_list("b", 10)
        last = next(c for c in convs if c.conv == "d:a|b").last
        assert last is not None and last.seq == 4 and last.deleted  # its target is deleted
        await store.close()

    async def test_block_list(self, open_store: Opener) -> None:
        """Blocks are per direction, idempotent, refuse new sends but answer old retries."""
        store = await open_store()
        await with_users(store, "a", "b", "c")
        old = await store.append_message(new_msg("a", "b", "old"))
        await store.set_block("b", "a", True, 1)
        await store.set_block("b", "a", True, 2)
        await store.set_block("b", "c", True, 3)
        assert await store.blocked_by("b") == ["a", "c"]
        assert await store.is_blocked("b", "a") and not await store.is_blocked("a", "b")
        refused = msgspec.structs.replace(new_msg("a", "b", "new"), blocker="b")
        with pytest.raises(TidingsError) as err:
            await store.append_message(refused)
        assert err.value.code == "blocked"
        retry = msgspec.structs.replace(new_msg("a", "b", "old"), blocker="b")
        again = await store.append_message(retry)
        assert again.dup and again.record.seq == old.record.seq
        reply = msgspec.structs.replace(new_msg("b", "a", "reply"), blocker="a")
        assert (await store.append_message(reply)).record.seq == 2
        await store.set_block("b", "a", False, 4)
        assert await store.blocked_by("b") == ["c"]
        ok = msgspec.structs.replace(new_msg("a", "b", "new"), blocker="b")
        assert (await store.append_message(ok)).record.seq == 3
        await store.close()

    async def test_worker_leases_are_unique(self, open_store: Opener) -> None:
        """Two holders never share a worker id; a holder renews its own."""
        store = await open_store()
        w1 = await store.lease_worker_id("h1", 1000, 60_000)
        w2 = await store.lease_worker_id("h2", 1000, 60_000)
        assert w1 != w2
        assert await store.lease_worker_id("h1", 2000, 60_000) == w1
        w3 = await store.lease_worker_id("h3", 100_000, 60_000)  # h1/h2 expired by now
        assert w3 in (w1, w2)
        await store.close()
