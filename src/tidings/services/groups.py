"""Groups: management (each change an entry in the group's sequence), member lists,
"read by N" receipts, and the member sets a node keeps for fan-out."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from tidings.bus.base import Bus, MessageEvent
from tidings.clock import Clock
from tidings.config import Settings
from tidings.domain.groups import (
    MAX_ADD,
    MAX_ANNOUNCEMENT_BYTES,
    MAX_AVATAR_BYTES,
    MAX_INTRO_BYTES,
    MAX_NAME_BYTES,
    MAX_REMOVE,
    OPS,
    PROFILE_FIELDS,
    check_group_conv,
    check_text,
    group_id,
    parse_role,
    role_name,
)
from tidings.domain.ids import normalize_user_id, validate_client_id
from tidings.protocol import frames as f
from tidings.protocol.errors import TidingsError
from tidings.store.base import GroupChange, GroupInfo, GroupResult, MemberRecord, ReadCount, Store

log = logging.getLogger(__name__)
MAX_MUTE_MS = 366 * 24 * 3600 * 1000
MEMBERS_PAGE_MAX = 500
RECEIPTS_MAX = 100  # seqs in one receipts request ...
RECEIPT_ROWS_MAX = 2_000_000  # ... and at most this many member rows counted (100k: 20 seqs)
_TEXT_LIMITS = {
    "name": MAX_NAME_BYTES,
    "avatar": MAX_AVATAR_BYTES,
    "intro": MAX_INTRO_BYTES,
    "announcement": MAX_ANNOUNCEMENT_BYTES,
}


class GroupOp(msgspec.Struct, frozen=True):
    """A group operation as the client protocol and the server API both give it."""

    op: str
    conv: str | None = None
    users: list[str] = []
    role: str | None = None
    duration_ms: int | None = None
    on: bool | None = None
    fields: dict[str, Any] = {}  # profile fields given (name, avatar, intro, ...)
    cid: str | None = None
    max_members: int | None = None  # create only (the server API)


def profile_of(request: Any) -> dict[str, Any]:
    """The profile fields a request (protocol frame or API body) gives, absent ones left out."""
    values = {k: getattr(request, k, None) for k in PROFILE_FIELDS}
    return {k: v for k, v in values.items() if v is not None}


def info_out(info: GroupInfo, me: MemberRecord | None = None) -> f.GroupInfo:
    return f.GroupInfo(
        conv=info.conv,
        owner=info.owner,
        name=info.name,
        member_count=info.member_count,
        max_members=info.max_members,
        last_seq=info.last_seq,
        created_ms=info.created_ms,
        avatar=info.avatar,
        intro=info.intro,
        announcement=info.announcement,
        muted_all=info.muted_all,
        members_can_invite=info.members_can_invite,
        history_visible=info.history_visible,
        role=None if me is None else role_name(me.role),
        muted_until=0 if me is None else me.muted_until,
    )


def _cursor(uid: str) -> str:
    return base64.urlsafe_b64encode(uid.encode()).decode().rstrip("=")


def _after(cursor: str) -> str:
    if not cursor:
        return ""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise TidingsError("invalid", "bad cursor") from None


class Groups:
    def __init__(self, store: Store, bus: Bus, clock: Clock, settings: Settings) -> None:
        self.store = store
        self.bus = bus
        self.clock = clock
        self.settings = settings

    # ------------------------------------------------------------------ changes

    def _fields(self, req: GroupOp) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in req.fields.items():
            if value is None:
                continue
            if key in _TEXT_LIMITS:
                out[key] = check_text(value, key, _TEXT_LIMITS[key])
            elif key in ("members_can_invite", "history_visible"):
                if not isinstance(value, bool):
                    raise TidingsError("invalid", f"{key} must be a boolean")
                out[key] = value
            else:
                raise TidingsError("invalid", f"unknown group field {key[:32]!r}")
        return out

    def _users(self, req: GroupOp, most: int) -> tuple[str, ...]:
        if len(req.users) > most:
            raise TidingsError("too_large", f"at most {most} users in one {req.op}")
        return tuple(dict.fromkeys(normalize_user_id(u) for u in req.users))

    def build(self, actor: str, device: str, req: GroupOp, privileged: bool) -> GroupChange:
        """Validate a request into the change the store applies (raises TidingsError)."""
        if req.op not in OPS:
            raise TidingsError("invalid", f"unknown group operation {req.op[:32]!r}")
        if req.cid is not None:
            validate_client_id(req.cid)
        cid = req.cid or "g-" + secrets.token_hex(12)
        if req.op == "create":
            if req.conv is None and req.cid is not None:
                # No id given: one derived from the idempotency key, so that a retry
                # names the same group (and answers `dup`).
                digest = hashlib.sha256(f"{actor}\0{req.cid}".encode()).digest()
                conv = group_id(base64.urlsafe_b64encode(digest[:15]).decode())
            else:
                conv = group_id(req.conv)
        else:
            if req.conv is None:
                raise TidingsError("invalid", "`conv` names the group")
            conv = req.conv
            check_group_conv(conv)
        change = GroupChange(conv, req.op, actor, device, cid, privileged=privileged)
        s = self.settings
        if req.op == "create":
            fields = self._fields(req)
            limit = s.group_max_members if req.max_members is None else req.max_members
            if not 1 <= limit <= s.group_max_members:
                raise TidingsError("invalid", f"max_members must be 1..{s.group_max_members}")
            visible = fields.pop("history_visible", s.group_history_visible)
            return msgspec.structs.replace(
                change,
                users=self._users(req, MAX_ADD),
                fields=fields,
                max_members=limit,
                history_visible=visible,
            )
        if req.op in ("add", "remove", "role", "mute", "transfer"):
            users = self._users(req, MAX_ADD if req.op == "add" else MAX_REMOVE)
            if not users:
                raise TidingsError("invalid", f"{req.op} needs `users`")
            if req.op == "transfer" and len(users) != 1:
                raise TidingsError("invalid", "transfer names exactly one user")
            change = msgspec.structs.replace(change, users=users)
        if req.op == "role":
            return msgspec.structs.replace(change, role=parse_role(req.role))
        if req.op == "mute":
            ms = req.duration_ms
            if ms is None or not 0 <= ms <= MAX_MUTE_MS:
                raise TidingsError("invalid", f"mute needs duration_ms 0..{MAX_MUTE_MS}")
            return msgspec.structs.replace(change, until_ms=self.clock.now_ms() + ms if ms else 0)
        if req.op == "mute_all":
            if req.on is None:
                raise TidingsError("invalid", "mute_all needs `on`")
            return msgspec.structs.replace(change, fields={"on": req.on})
        if req.op == "profile":
            fields = self._fields(req)
            if not fields:
                raise TidingsError("invalid", "profile needs at least one field")
            return msgspec.structs.replace(change, fields=fields)
        return change

    async def change(self, change: GroupChange) -> GroupResult:
        """Apply a change; once committed (and not a retry) its entry goes to every member
        device online (the acting one too: the answer does not carry the entry), those
        who joined by it included, those who left by it last of all."""
        res = await self.store.apply_group(change)
        if res.record is not None and not res.dup:
            self.bus.publish(MessageEvent(res.record, (), None, res.joined, res.left))
        return res

    async def operate(self, actor: str, device: str, req: GroupOp) -> GroupResult:
        return await self.change(self.build(actor, device, req, privileged=False))

    # ------------------------------------------------------------------ reads

    async def member(self, uid: str, conv: str) -> MemberRecord:
        """The member record of ``uid`` or the documented error: `not_found` for no such
        group, `forbidden` for a non-member."""
        check_group_conv(conv)
        me = await self.store.membership(conv, uid)
        if me is None:
            if await self.store.group_info(conv) is None:
                raise TidingsError("not_found", "no such group")
            raise TidingsError("forbidden", "not a member of this group")
        return me

    async def info(self, conv: str) -> GroupInfo:
        check_group_conv(conv)
        info = await self.store.group_info(conv)
        if info is None:
            raise TidingsError("not_found", "no such group")
        return info

    async def members(self, conv: str, cursor: str, limit: int) -> tuple[list[MemberRecord], str]:
        if not 1 <= limit <= 2**31:
            raise TidingsError("invalid", "limit must be >= 1")
        limit = min(limit, MEMBERS_PAGE_MAX)
        rows = await self.store.members_page(conv, _after(cursor), limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (_cursor(rows[-1].uid) if more and rows else "")

    async def receipts(self, conv: str, seqs: list[int], size: int = 0) -> list[ReadCount]:
        """ "Read by N" for up to RECEIPTS_MAX entries; a group of ``size`` members gets
        fewer per request (each count walks the readers in the index)."""
        most = max(1, min(RECEIPTS_MAX, RECEIPT_ROWS_MAX // max(size, 1)))
        if not 1 <= len(seqs) <= most:
            raise TidingsError("invalid", f"give 1 to {most} seqs")
        if any(not 1 <= s < 2**63 for s in seqs):
            raise TidingsError("invalid", "seqs must be 1..2^63-1")
        return await self.store.read_counts(conv, seqs, self.settings.group_receipt_list_max)


Deliver = Callable[[MessageEvent, set[str]], None]


class _Members:
    """One group's member set as this node knows it."""

    __slots__ = ("added", "held", "ids", "last", "snapshot_seq", "timer")

    def __init__(self, snapshot_seq: int, ids: set[str], added: dict[str, int]) -> None:
        self.snapshot_seq = snapshot_seq  # the store's last seq when the set was read
        self.ids = ids
        self.added = added  # the seq before each member's add entry, if after 0 (kept:
        # an entry older than a member's add may still arrive, published late elsewhere)
        self.last = snapshot_seq  # the last entry applied
        self.held: dict[int, MessageEvent] = {}  # entries that came early, by seq
        self.timer: asyncio.TimerHandle | None = None


class MemberCache:
    """The member sets of groups this node fans out to: each loaded once from the store,
    then kept current by the group's own entries, applied in seq order. Entries arriving
    while a set loads wait for it. On a cluster, entries of one group published by
    different nodes may arrive out of order: an entry that comes before its predecessor
    is held (up to ``gap_wait_s``) until the gap fills; if it does not (the entry was
    lost: its node died before publishing, or the bus was away), the set is read again
    from the store and the held entries applied to that. Bounded: the least recently
    used sets are dropped past ``max_members`` member ids in all."""

    def __init__(self, store: Store, max_members: int = 2_000_000, gap_wait_s: float = 0.2) -> None:
        self.store = store
        self.max_members = max_members
        self.gap_wait_s = gap_wait_s
        self._sets: OrderedDict[str, _Members] = OrderedDict()
        self._waiting: dict[str, list[MessageEvent]] = {}
        self._held = 0
        self._loading: set[asyncio.Task[None]] = set()
        self.loads = 0  # statistics
        self.reloads = 0  # statistics: sets read again after a gap that did not fill

    def members(self, conv: str) -> set[str] | None:
        got = self._sets.get(conv)
        return None if got is None else got.ids

    def clear(self) -> None:
        """Forget every set (they may have missed a change): each is read again when
        its next entry comes. Loads in flight finish into the new state."""
        for got in self._sets.values():
            if got.timer is not None:
                got.timer.cancel()
        self._sets.clear()
        self._held = 0

    def handle(self, event: MessageEvent, deliver: Deliver) -> None:
        conv = event.record.conv
        waiting = self._waiting.get(conv)
        if waiting is not None:
            waiting.append(event)
            return
        got = self._sets.get(conv)
        if got is None:
            self._start_load(conv, [event], deliver)
            return
        self._sets.move_to_end(conv)
        self._ordered(conv, got, event, deliver)

    def _start_load(self, conv: str, events: list[MessageEvent], deliver: Deliver) -> None:
        self._waiting[conv] = events
        task = asyncio.ensure_future(self._load(conv, deliver))
        self._loading.add(task)
        task.add_done_callback(self._loading.discard)

    def _ordered(self, conv: str, got: _Members, event: MessageEvent, deliver: Deliver) -> None:
        seq = event.record.seq
        if seq <= got.last:
            if seq <= got.snapshot_seq:
                # An entry older than the snapshot: the members then, not those added
                # after it (they must not get what came before they joined).
                ids = got.ids
                then = {u for u in ids if got.added.get(u, 0) < seq} if got.added else ids
                deliver(event, then.union(event.left) if event.left else then)
            return  # (else applied already)
        if seq > got.last + 1:  # an earlier entry is still on its way
            got.held[seq] = event
            if got.timer is None:
                loop = asyncio.get_running_loop()
                got.timer = loop.call_later(self.gap_wait_s, self._gap_timeout, conv, deliver)
            return
        self._apply(got, event, deliver)
        while got.last + 1 in got.held:
            self._apply(got, got.held.pop(got.last + 1), deliver)
        if not got.held and got.timer is not None:
            got.timer.cancel()
            got.timer = None

    def _gap_timeout(self, conv: str, deliver: Deliver) -> None:
        got = self._sets.get(conv)
        if got is None or not got.held:
            return
        got.timer = None
        self.reloads += 1
        del self._sets[conv]
        self._held -= len(got.ids)
        self._start_load(conv, [got.held[k] for k in sorted(got.held)], deliver)

    def _apply(self, got: _Members, event: MessageEvent, deliver: Deliver) -> None:
        """Apply the next entry in seq order."""
        seq = got.last = event.record.seq
        ids = got.ids
        if event.joined:
            before = len(ids)
            ids.update(event.joined)
            self._held += len(ids) - before
            # Entries older than this one may still come (published late by another
            # node): they must not go to whoever joins here.
            for uid in event.joined:
                got.added[uid] = seq - 1
        deliver(event, ids.union(event.left) if event.left else ids)
        if event.left:
            before = len(ids)
            ids.difference_update(event.left)
            self._held -= before - len(ids)

    async def _load(self, conv: str, deliver: Deliver) -> None:
        try:
            seq, uids = await self.store.member_snapshot(conv)
        except Exception:
            log.exception("loading the members of %s failed; its pending pushes are dropped", conv)
            self._waiting.pop(conv, None)  # devices find the entries on their next sync
            return
        self.loads += 1
        got = _Members(seq, {u for u, _ in uids}, {u: a for u, a in uids if a > 0})
        self._sets[conv] = got
        self._held += len(uids)
        for event in self._waiting.pop(conv, []):
            self._ordered(conv, got, event, deliver)
        while self._held > self.max_members and len(self._sets) > 1:
            _, dropped = self._sets.popitem(last=False)
            if dropped.timer is not None:
                dropped.timer.cancel()
            self._held -= len(dropped.ids)
