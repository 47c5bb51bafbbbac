"""Event-system consistency, in the style of Zulip's test_events: random sequences of
actions over real sockets through the SDK, and after every step each online device's
state — built from its initial sync plus the events it received since — must equal what
a fresh sync of that user shows (conversation list, unread counts, badge, entries, read
positions, settings).

Two users (alice with a phone and a desktop, bob with a phone: three devices) and a
third user, carol, who only "speaks" through the server HTTP API, so that there are
several conversations to order, pin, mute and hide, and entries that do not move a read
position. Groups of the three are created, joined, left, managed (roles, mutes,
removals) and talked in by the devices and the backend. One server and one event loop
(in a thread) serve every example; each example uses fresh user names.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests import conftest
from tests.rawclient import Raw
from tidings.app import Server
from tidings.client import Client
from tidings.client.state import LocalState
from tidings.protocol.frames import ConvItem, Message

T = TypeVar("T")
EXAMPLES = 150  # examples of up to STEPS actions each; every step checks every online device
STEPS = 30
SETTLE_S = 5.0  # how long devices get to converge after a step before it is a failure


class Loop:
    """An event loop in a thread running the server and every client."""

    def __init__(self, data_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._start(str(data_dir)))

    async def _start(self, data_dir: str) -> Server:
        # No heartbeats during a run: a pong showing a newer change version makes a device
        # sync, which would mend a wrongly applied event before the check could see it.
        settings = conftest.test_settings(
            data_dir,
            rate_per_s=10_000,
            rate_burst=10_000,
            heartbeat_ms=600_000,
            idle_timeout_ms=1_800_000,
        )
        server = Server(settings)
        await server.start()
        return server

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def snapshot(state: LocalState) -> dict[str, Any]:
    """What a user sees: the list (order, badge) and every conversation's state and
    entries (comparable across devices: the echo of an own send is the stored entry)."""
    convs = {}
    for v in state.conversation_list(include_hidden=True):
        convs[v.conv] = {
            "last_seq": v.last_seq,
            "last": v.last,
            "unread": v.unread,
            "read_seq": v.read_seq,
            "peer_read_seq": v.peer_read_seq,
            "muted": v.muted,
            "pinned": v.pinned,
            "hidden": v.hidden,
            "draft": v.draft,
            "entries": dict(sorted(state.messages.get(v.conv, {}).items())),
        }
    return {
        "order": [v.conv for v in state.conversation_list()],
        "badge": state.badge,
        "convs": convs,
    }


async def fresh_sync(url: str, token: str) -> dict[str, Any]:
    """What the server tells a device that knows nothing: a sync from scratch and the
    conversation list, read off the wire as sent (no SDK logic in between), in the shape
    of ``snapshot``."""
    raw = await Raw.ws(url, codec="msgpack")
    try:
        assert (await raw.login(token))["t"] == "ready"
        since, have, cv, rid = "0", {}, 0, 1
        states: dict[str, ConvItem] = {}
        entries: dict[str, dict[int, Message]] = {}
        while True:
            rid += 1
            await raw.send({"t": "sync", "id": rid, "since": since, "have": have, "cv": cv})
            ans = await raw.until("synced")
            for m in ans["msgs"]:
                msg = msgspec.convert(m, Message)
                entries.setdefault(msg.conv, {})[msg.seq] = msg
                have[msg.conv] = max(have.get(msg.conv, 0), msg.seq)
            for item in ans["states"]:
                states[item["conv"]] = msgspec.convert(item, ConvItem)
            since, cv = ans["wm"], ans["cv"]
            if ans["complete"]:
                break
        await raw.send({"t": "convs", "id": rid + 1, "limit": 200})
        listed = await raw.until("convs")
    finally:
        await raw.close()
    convs = {}
    for conv, s in states.items():
        convs[conv] = {
            "last_seq": s.last_seq,
            "last": s.last,
            "unread": s.unread,
            "read_seq": s.read_seq,
            "peer_read_seq": s.peer_read_seq,
            "muted": s.muted,
            "pinned": s.pinned,
            "hidden": s.hidden,
            "draft": s.draft,
            "entries": dict(sorted(entries.get(conv, {}).items())),
        }
    return {"order": [c["conv"] for c in listed["convs"]], "badge": listed["badge"], "convs": convs}


def diff(got: dict[str, Any], want: dict[str, Any]) -> str:
    lines = []
    for key in ("order", "badge"):
        if got[key] != want[key]:
            lines.append(f"{key}: device {got[key]!r} != fresh {want[key]!r}")
    for conv in sorted(set(got["convs"]) | set(want["convs"])):
        g, w = got["convs"].get(conv), want["convs"].get(conv)
        if g is None or w is None:
            lines.append(f"{conv}: device has {g is not None}, fresh has {w is not None}")
            continue
        for field in w:
            if g[field] != w[field]:
                lines.append(f"{conv}.{field}: device {g[field]!r}\n    != fresh {w[field]!r}")
    return "\n".join(lines)


_run_ids = itertools.count()
checks: dict[str, int] = {}  # how often each action took effect, and states were compared


def did(action: str) -> None:
    checks[action] = checks.get(action, 0) + 1


class Conversations(RuleBasedStateMachine):
    loop: Loop  # set by the test

    def __init__(self) -> None:
        super().__init__()
        n = next(_run_ids)
        self.alice, self.bob, self.carol = f"alice{n}", f"bob{n}", f"carol{n}"
        self.ab = f"d:{self.alice}|{self.bob}"
        self.devices: dict[str, Client] = {}
        self.owner = {"a_phone": self.alice, "a_desk": self.alice, "b_phone": self.bob}
        self.online: set[str] = set()
        self.probes: dict[str, str] = {}  # uid -> token of a device that knows nothing
        self.sent: dict[str, list[tuple[str, int]]] = {}  # conv -> (sender, seq) of messages
        self.recalled: set[tuple[str, int]] = set()
        self.cid = itertools.count()
        # group -> member -> (role, muted, floor), as the server has it after each change
        self.groups: dict[str, dict[str, tuple[str, bool, int]]] = {}

    # ------------------------------------------------------------------ plumbing

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return self.loop.run(coro, timeout)

    async def _client(self, uid: str, device: str) -> Client:
        srv = self.loop.server
        platform = {"a_phone": "ios", "a_desk": "desktop", "b_phone": "android"}.get(device, "web")
        token = (await srv.accounts.issue_token(uid, device, platform)).token
        port = srv.http_port if device != "a_desk" else srv.tcp_port
        url = f"ws://127.0.0.1:{port}/v1/ws" if device != "a_desk" else f"tcp://127.0.0.1:{port}"
        codec = "json" if device == "b_phone" else "msgpack"
        c = Client(url, token, codec=codec, heartbeat_s=600, dead_after_s=1800, keep_messages=True)
        await c.connect()
        return c

    async def _setup(self) -> None:
        for uid in (self.alice, self.bob, self.carol):
            await self.loop.server.accounts.put_user(uid)
        for dev, uid in self.owner.items():
            self.devices[dev] = await self._client(uid, dev)
            self.online.add(dev)
        for c in self.devices.values():
            await c.sync_now()
        for uid in (self.alice, self.bob):
            issued = await self.loop.server.accounts.issue_token(uid, "probe", "web")
            self.probes[uid] = issued.token

    async def _teardown(self) -> None:
        for c in self.devices.values():
            await c.close()

    @initialize()
    def start(self) -> None:
        self.run(self._setup())

    def teardown(self) -> None:
        if self.devices:
            self.run(self._teardown())

    async def _backend(self, path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
        """A POST of the app backend to the server HTTP API (admin key)."""
        srv = self.loop.server
        url = f"http://127.0.0.1:{srv.http_port}{path}"
        headers = {"Authorization": f"Bearer {srv.admin_key}"}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=body, headers=headers) as resp,
        ):
            assert resp.status == status, await resp.text()
            out: dict[str, Any] = await resp.json()
            return out

    def _user_convs(self, uid: str) -> list[str]:
        other = self.bob if uid == self.alice else self.alice
        return [
            f"d:{min(uid, other)}|{max(uid, other)}",
            f"d:{min(uid, self.carol)}|{max(uid, self.carol)}",
            *(g for g, members in sorted(self.groups.items()) if uid in members),
        ]

    def _known(self, conv: str, uid: str | None = None) -> list[tuple[str, int]]:
        """Entries of ``conv`` (those ``uid`` can see, when given: a group's from the
        member's floor on)."""
        floor = self.groups.get(conv, {}).get(uid or "", ("", False, 0))[2]
        return [(s, q) for s, q in self.sent.get(conv, []) if q > floor]

    def _muted(self, uid: str, conv: str) -> bool:
        member = self.groups.get(conv, {}).get(uid)
        return member is not None and member[1]

    def _device(self, data: st.DataObject, online: bool = True) -> str:
        pool = sorted(self.online if online else set(self.owner) - self.online)
        return str(data.draw(st.sampled_from(pool), label="device"))

    # ------------------------------------------------------------------ actions

    @precondition(lambda self: bool(self.online))
    @rule(data=st.data(), silent=st.booleans(), carol_conv=st.booleans())
    def send(self, data: st.DataObject, silent: bool, carol_conv: bool) -> None:
        dev = self._device(data)
        uid = self.owner[dev]
        to = self.carol if carol_conv else (self.bob if uid == self.alice else self.alice)
        text = f"{dev} says {next(self.cid)}"
        sent = self.run(self.devices[dev].send(to=to, text=text, flags=1 if silent else 0))
        self.sent.setdefault(sent.conv, []).append((uid, sent.seq))
        did("send")

    @rule(to_alice=st.booleans(), system=st.booleans(), into_group=st.booleans())
    def carol_sends(self, to_alice: bool, system: bool, into_group: bool) -> None:
        """The backend sends on carol's behalf (server HTTP API), to alice or bob or to a
        group carol is in: counted, but it moves nobody's read position."""
        to = self.alice if to_alice else self.bob
        body: dict[str, Any] = {
            "from": self.carol,
            "to": to,
            "cid": f"carol-{next(self.cid)}",
            "type": "system" if system else "text",
            "body": {"text": "from the backend"},
        }
        groups = sorted(g for g, members in self.groups.items() if self.carol in members)
        if into_group and groups:
            body["conv"] = groups[0]
            del body["to"]
        out = self.run(self._backend("/v1/messages", body, 200))
        self.sent.setdefault(out["conv"], []).append((self.carol, out["seq"]))
        did("carol_sends")

    def _readable(self) -> list[tuple[str, str]]:
        """(online device, conversation with entries its user can see)."""
        return [
            (dev, conv)
            for dev in sorted(self.online)
            for conv in self._user_convs(self.owner[dev])
            if self._known(conv, self.owner[dev])
        ]

    @precondition(lambda self: bool(self._readable()))
    @rule(data=st.data())
    def mark_read(self, data: st.DataObject) -> None:
        dev, conv = data.draw(st.sampled_from(self._readable()), label="conversation")
        last = max(s for _, s in self._known(conv, self.owner[dev]))
        seq = data.draw(st.integers(1, last + 2), label="seq")  # past the end is capped
        self.run(self.devices[dev].mark_read(conv, seq))
        did("mark_read")

    def _amendable(self, dev: str) -> list[tuple[str, int]]:
        """The messages the owner of ``dev`` sent and has not recalled."""
        uid = self.owner[dev]
        return [
            (conv, seq)
            for conv in self._user_convs(uid)
            if not self._muted(uid, conv)
            for sender, seq in self._known(conv, uid)
            if sender == uid and (conv, seq) not in self.recalled
        ]

    def _can_amend(self) -> bool:
        return any(self._amendable(dev) for dev in self.online)

    def _amend(self, data: st.DataObject, action: str) -> None:
        """Recall or edit a message the acting device's user sent (and has not recalled)."""
        devices = sorted(dev for dev in self.online if self._amendable(dev))
        dev = str(data.draw(st.sampled_from(devices), label="device"))
        conv, seq = data.draw(st.sampled_from(self._amendable(dev)), label="own message")
        c = self.devices[dev]
        if action == "recall":
            sent = self.run(c.recall(conv, seq))
            self.recalled.add((conv, seq))
        else:
            sent = self.run(c.edit(conv, seq, text=f"edited {next(self.cid)}"))
        self.sent.setdefault(sent.conv, []).append(("event", sent.seq))
        did(action)

    @precondition(lambda self: self._can_amend())
    @rule(data=st.data())
    def recall(self, data: st.DataObject) -> None:
        self._amend(data, "recall")

    @precondition(lambda self: self._can_amend())
    @rule(data=st.data())
    def edit(self, data: st.DataObject) -> None:
        self._amend(data, "edit")

    @precondition(lambda self: bool(self.online))
    @rule(data=st.data())
    def delete_for_me(self, data: st.DataObject) -> None:
        dev = self._device(data)
        conv = data.draw(st.sampled_from(self._user_convs(self.owner[dev])), label="conv")
        seqs = [s for _, s in self._known(conv, self.owner[dev])]
        if not seqs:
            return
        chosen = data.draw(st.lists(st.sampled_from(seqs), min_size=1, max_size=3), label="seqs")
        self.run(self.devices[dev].delete_for_me(conv, chosen))
        did("delete_for_me")

    @precondition(lambda self: bool(self.online))
    @rule(
        data=st.data(),
        muted=st.none() | st.booleans(),
        pinned=st.none() | st.booleans(),
        hidden=st.none() | st.booleans(),
        draft=st.none() | st.sampled_from(["", "half a thought", "再见"]),
    )
    def change_settings(
        self,
        data: st.DataObject,
        muted: bool | None,
        pinned: bool | None,
        hidden: bool | None,
        draft: str | None,
    ) -> None:
        dev = self._device(data)
        convs = [c for c in self._user_convs(self.owner[dev]) if self._known(c, self.owner[dev])]
        if not convs:
            return
        conv = data.draw(st.sampled_from(convs), label="conv")
        self.run(
            self.devices[dev].settings(conv, muted=muted, pinned=pinned, hidden=hidden, draft=draft)
        )
        did("settings")

    # ------------------------------------------------------------------ groups

    def _refresh(self, conv: str) -> None:
        """The group's members, roles and mutes as the server now has them."""
        store = self.loop.server.store
        rows = self.run(store.members_page(conv, "", 100))
        now = self.loop.server.clock.now_ms()
        self.groups[conv] = {
            r.uid: (("member", "admin", "owner")[r.role], r.muted_until > now, r.joined_seq)
            for r in rows
        }

    def _group_event(self, conv: str, done: Any) -> None:
        if done.seq:
            self.sent.setdefault(conv, []).append(("event", done.seq))
        self._refresh(conv)

    def _actors(self, roles: tuple[str, ...]) -> list[tuple[str, str]]:
        """(online device, group) pairs where the device's user has one of ``roles``."""
        return [
            (dev, g)
            for dev in sorted(self.online)
            for g, members in sorted(self.groups.items())
            if members.get(self.owner[dev], ("", False, 0))[0] in roles
        ]

    def _targets(self, conv: str, actor: str) -> list[str]:
        """Members the actor outranks (whom it may remove, mute or re-role)."""
        rank = {"member": 0, "admin": 1, "owner": 2}
        members = self.groups[conv]
        mine = rank[members[actor][0]]
        return sorted(u for u, (role, _, _) in members.items() if u != actor and rank[role] < mine)

    @precondition(lambda self: bool(self.online) and len(self.groups) < 3)
    @rule(data=st.data())
    def group_create(self, data: st.DataObject) -> None:
        dev = self._device(data)
        uid = self.owner[dev]
        others = [u for u in (self.alice, self.bob, self.carol) if u != uid]
        chosen = data.draw(
            st.lists(st.sampled_from(others), min_size=1, unique=True), label="members"
        )
        # Ids in creation order (a random id would change the order draws are made in).
        gid = f"{self.alice}-{len(self.groups)}"
        done = self.run(self.devices[dev].create_group(chosen, name=gid, conv=gid))
        self._group_event(done.conv, done)
        did("group_create")

    @precondition(lambda self: len(self.groups) < 3)
    @rule(data=st.data())
    def backend_creates_group(self, data: st.DataObject) -> None:
        """The app backend creates a group owned by carol with alice and/or bob in it
        (server HTTP API): they are plain members there."""
        chosen = data.draw(
            st.lists(st.sampled_from([self.alice, self.bob]), min_size=1, unique=True),
            label="members",
        )
        gid = f"{self.alice}-{len(self.groups)}"
        body = {"owner": self.carol, "id": gid, "members": chosen, "name": "backend"}
        made = self.run(self._backend("/v1/groups", body, 201))
        conv = made["info"]["conv"]
        self.sent.setdefault(conv, []).append(("event", made["seq"]))
        self._refresh(conv)
        did("backend_group")

    def _can_add(self) -> bool:
        return any(len(self.groups[g]) < 3 for _, g in self._actors(("member", "admin", "owner")))

    @precondition(lambda self: self._can_add())
    @rule(data=st.data())
    def group_add(self, data: st.DataObject) -> None:
        pairs = [
            p for p in self._actors(("member", "admin", "owner")) if len(self.groups[p[1]]) < 3
        ]
        dev, conv = data.draw(st.sampled_from(pairs), label="actor")
        outside = [u for u in (self.alice, self.bob, self.carol) if u not in self.groups[conv]]
        user = data.draw(st.sampled_from(outside), label="user")
        self._group_event(conv, self.run(self.devices[dev].add_members(conv, [user])))
        did("group_add")

    @precondition(lambda self: any(len(m) < 3 for m in self.groups.values()))
    @rule(data=st.data())
    def backend_adds(self, data: st.DataObject) -> None:
        """The app backend adds a user (server HTTP API, bulk route, idempotency key)."""
        conv = data.draw(st.sampled_from([g for g, m in sorted(self.groups.items()) if len(m) < 3]))
        outside = [u for u in (self.alice, self.bob, self.carol) if u not in self.groups[conv]]
        user = data.draw(st.sampled_from(outside), label="user")
        body = {"users": [user], "key": f"add-{next(self.cid)}"}
        out = self.run(self._backend(f"/v1/groups/{conv}/members", body, 200))
        self.sent.setdefault(conv, []).append(("event", out["seq"]))
        self._refresh(conv)
        did("backend_add")

    def _removable(self) -> list[tuple[str, str]]:
        return [
            (g, u)
            for g, members in sorted(self.groups.items())
            for u, (role, _, _) in sorted(members.items())
            if role != "owner"
        ]

    @precondition(lambda self: bool(self._removable()))
    @rule(data=st.data())
    def backend_removes(self, data: st.DataObject) -> None:
        """The app backend removes a member (server HTTP API, with the owner's rights)."""
        conv, user = data.draw(st.sampled_from(self._removable()), label="removal")
        body = {"op": "remove", "users": [user], "key": f"rm-{next(self.cid)}"}
        out = self.run(self._backend(f"/v1/groups/{conv}/ops", body, 200))
        self.sent.setdefault(conv, []).append(("event", out["seq"]))
        self._refresh(conv)
        did("backend_remove")

    def _managing(self) -> list[tuple[str, str, str]]:
        return [
            (dev, g, t)
            for dev, g in self._actors(("admin", "owner"))
            for t in self._targets(g, self.owner[dev])
        ]

    @precondition(lambda self: bool(self._managing()))
    @rule(data=st.data())
    def group_remove(self, data: st.DataObject) -> None:
        dev, conv, user = data.draw(st.sampled_from(self._managing()), label="removal")
        self._group_event(conv, self.run(self.devices[dev].remove_members(conv, [user])))
        did("group_remove")

    @precondition(lambda self: bool(self._managing()))
    @rule(data=st.data(), mute=st.booleans())
    def group_mute(self, data: st.DataObject, mute: bool) -> None:
        dev, conv, user = data.draw(st.sampled_from(self._managing()), label="mute")
        c = self.devices[dev]
        self._group_event(conv, self.run(c.mute_members(conv, [user], 3_600_000 if mute else 0)))
        did("group_mute")

    def _owning(self) -> list[tuple[str, str, str]]:
        return [
            (dev, g, t)
            for dev, g in self._actors(("owner",))
            for t in self._targets(g, self.owner[dev])
        ]

    def _set_role(self, data: st.DataObject, role: str) -> None:
        dev, conv, user = data.draw(st.sampled_from(self._owning()), label="role")
        self._group_event(conv, self.run(self.devices[dev].set_role(conv, [user], role)))
        did("group_role")

    @precondition(lambda self: bool(self._owning()))
    @rule(data=st.data())
    def group_promote(self, data: st.DataObject) -> None:
        self._set_role(data, "admin")

    @precondition(lambda self: bool(self._owning()))
    @rule(data=st.data())
    def group_demote(self, data: st.DataObject) -> None:
        self._set_role(data, "member")

    @precondition(lambda self: bool(self._actors(("member", "admin"))))
    @rule(data=st.data())
    def group_leave(self, data: st.DataObject) -> None:
        dev, conv = data.draw(st.sampled_from(self._actors(("member", "admin"))), label="leave")
        self._group_event(conv, self.run(self.devices[dev].leave_group(conv)))
        did("group_leave")

    def _speakers(self) -> list[tuple[str, str]]:
        return [
            (dev, g)
            for dev, g in self._actors(("member", "admin", "owner"))
            if not self._muted(self.owner[dev], g)
        ]

    @precondition(lambda self: bool(self._speakers()))
    @rule(data=st.data(), silent=st.booleans())
    def group_send(self, data: st.DataObject, silent: bool) -> None:
        dev, conv = data.draw(st.sampled_from(self._speakers()), label="speaker")
        text = f"{dev} tells the group {next(self.cid)}"
        c = self.devices[dev]
        sent = self.run(c.send(conv=conv, text=text, flags=1 if silent else 0))
        self.sent.setdefault(conv, []).append((self.owner[dev], sent.seq))
        did("group_send")

    @precondition(lambda self: len(self.online) > 1)
    @rule(data=st.data())
    def go_offline(self, data: st.DataObject) -> None:
        dev = self._device(data)
        self.run(self.devices[dev].disconnect())
        self.online.discard(dev)
        did("offline")

    @precondition(lambda self: len(self.online) < 3)
    @rule(data=st.data())
    def come_online(self, data: st.DataObject) -> None:
        dev = self._device(data, online=False)
        c = self.devices[dev]
        self.run(c.connect())
        self.online.add(dev)
        did("online")

    # ------------------------------------------------------------------ the check

    async def _converged(self) -> None:
        # Group read positions are written coalesced: write them before looking.
        await self.loop.server.messaging.reads.flush()
        fresh: dict[str, dict[str, Any]] = {}
        url = f"ws://127.0.0.1:{self.loop.server.http_port}/v1/ws"
        for uid, token in self.probes.items():
            fresh[uid] = await fresh_sync(url, token)
        deadline = asyncio.get_running_loop().time() + SETTLE_S
        for dev in sorted(self.online):
            c = self.devices[dev]
            want = fresh[self.owner[dev]]
            while True:
                got = snapshot(c.state)
                if got == want:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{dev} diverged from a fresh sync:\n{diff(got, want)}")
                await asyncio.sleep(0.02)

    @invariant()
    def every_online_device_matches_a_fresh_sync(self) -> None:
        if self.devices:
            self.run(self._converged(), timeout=60)
            did("compared")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Loop]:
    loop = Loop(tmp_path / "data")
    try:
        yield loop
    finally:
        loop.stop()


def test_devices_converge_with_a_fresh_sync(served: Loop) -> None:
    Conversations.loop = served
    checks.clear()
    run_state_machine_as_test(
        Conversations,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            # CI runs one fixed sequence of examples, so how often each action happens
            # is the same on every run (Hypothesis turns whole rules off per example,
            # which made the rarer actions' counts swing between runs);
            # TIDINGS_STATE_RANDOM=1 explores new sequences.
            derandomize=not os.environ.get("TIDINGS_STATE_RANDOM"),
        ),
    )
    print("actions that took effect:", checks)
    # The run means something only if every kind of action happened, many times over.
    actions = ("send", "carol_sends", "mark_read", "recall", "edit", "delete_for_me")
    actions += ("group_create", "group_add", "group_remove", "group_mute", "group_role")
    actions += ("group_leave", "group_send", "backend_group", "backend_add", "backend_remove")
    for action in (*actions, "settings", "offline", "online"):
        assert checks.get(action, 0) >= 20, (action, checks)
    assert checks["compared"] >= EXAMPLES * STEPS // 2, checks
