"""1:1 messaging: validate and append a send, publish it after commit, history, sync."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from tidings import faults
from tidings.bus.base import Bus, DeletedNotice, MessageEvent, ReadNotice, SettingsNotice
from tidings.config import Settings
from tidings.domain.groups import check_group_conv, is_group
from tidings.domain.ids import (
    ID_TIME_SHIFT,
    direct_conversation_id,
    direct_members,
    normalize_user_id,
    validate_client_id,
)
from tidings.domain.permissions import member_pair
from tidings.protocol.codec import check_json_model
from tidings.protocol.errors import TidingsError
from tidings.protocol.frames import ConvItem, ConvState, Message, Send
from tidings.services.delivered import DeliveredCoalescer
from tidings.services.reads import ReadCoalescer
from tidings.store.base import (
    EVENT_TYPES,
    Amend,
    AppendResult,
    ConvRow,
    ConvSettings,
    ConvSummary,
    MessageRecord,
    NewMessage,
    ReadState,
    Store,
    amend_target,
    tombstone,
)

CLIENT_TYPES = frozenset({"text", "image", "file", "voice", "video", "location", "custom"})
FLAG_SILENT = 1
FLAG_NOT_COUNTED = 2
MAX_FLAGS = 0xFFFF
MAX_MENTIONS = 100
MAX_ID = 2**63
SYNC_CONVS_MAX = 1000  # conversations listed in one sync answer
SYNC_RECHECK_MAX = 64  # conversations looked at again from below a sync watermark
SYNC_DELETIONS_MAX = 5000  # deleted seqs in one sync answer
CONV_LIST_MAX = 200  # conversations in one conversation-list answer
MAX_DRAFT_BYTES = 4096
MAX_DELETE = 100  # seqs in one delete-for-me
REPLY_BUDGET_BYTES = 1 << 20  # sync and history answers stay near this size (bodies)
_pack = msgspec.msgpack.Encoder().encode


def to_wire(rec: MessageRecord) -> Message:
    return Message(
        conv=rec.conv,
        seq=rec.seq,
        mid=str(rec.mid),
        sender=rec.sender,
        dev=rec.dev,
        cid=rec.cid,
        type=rec.type,
        body=rec.body,
        ts=rec.ts,
        flags=rec.flags,
        mentions=list(rec.mentions),
        reply_to=None if rec.reply_to is None else str(rec.reply_to),
        edit_version=rec.edit_version,
        recalled=rec.recalled,
        deleted=rec.deleted,
        n=rec.n,
    )


def conv_item(uid: str, r: ConvSummary, deleted: list[int] | None = None) -> ConvItem:
    """A conversation's state for ``uid``, as the conversation list and sync show it."""
    return ConvItem(
        conv=r.conv,
        last_seq=r.last_seq,
        last_ts=r.last_ts,
        unread=r.unread,
        read_seq=r.read_seq,
        peer_read_seq=r.peer_read_seq,
        peer_delivered_seq=r.peer_delivered_seq,
        peer=peer_of(uid, r.conv),
        title=r.title,
        size=r.size,
        last=None if r.last is None else to_wire(r.last),
        muted=r.settings.muted,
        pinned=r.settings.pinned,
        draft=r.settings.draft,
        hidden=r.settings.hidden,
        n=0 if r.last is None else r.last.n,
        deleted=deleted or [],
    )


def peer_of(uid: str, conv: str) -> str | None:
    """The other member of a 1:1 conversation (None for notes to self or other kinds)."""
    pair = direct_members(conv)
    if pair is None or pair[0] == pair[1]:
        return None
    return pair[1] if pair[0] == uid else pair[0]


def parse_id(value: str, what: str) -> int:
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20):
        raise TidingsError("invalid", f"{what} must be a decimal string")
    n = int(value)
    if n >= 2**63:
        raise TidingsError("invalid", f"{what} out of range")
    return n


def _within(page: list[MessageRecord], budget: int) -> tuple[list[MessageRecord], int]:
    """The longest prefix of ``page`` whose bodies fit ``budget`` (at least one if any fit)."""
    used = 0
    for i, m in enumerate(page):
        if used + m.size > budget and i > 0:
            return page[:i], used
        if used + m.size > budget:
            return [], 0
        used += m.size
    return page, used


class SyncResult(msgspec.Struct, frozen=True):
    convs: list[ConvState]
    msgs: list[MessageRecord]
    complete: bool
    wm: int
    states: list[ConvSummary] = []  # this user's state of conversations it changed
    cv: int = 0  # the user change-log version these states cover
    deletions: dict[str, list[int]] = {}  # seqs deleted for this user after the device's cv
    left: list[str] = []  # groups the user is no longer a member of (changed since cv)


def check_conv(uid: str, conv: str) -> None:
    """A conversation id ``uid`` may name: a 1:1 conversation of theirs, or a group (whose
    membership the store checks with the request)."""
    if is_group(conv):
        check_group_conv(conv)
    else:
        member_pair(uid, conv)


class Messaging:
    def __init__(self, store: Store, bus: Bus, settings: Settings) -> None:
        self.store = store
        self.bus = bus
        self.settings = settings
        self.reads = ReadCoalescer(store, settings.group_read_flush_ms / 1000)
        self.delivered = DeliveredCoalescer(store, bus, settings.delivered_flush_ms / 1000)

    # ------------------------------------------------------------------ send

    def prepare(self, uid: str, device: str, f: Send) -> NewMessage:
        """Validate a send from (uid, device); raise TidingsError with the reason."""
        validate_client_id(f.cid)
        if f.type in EVENT_TYPES:
            return self._amendment(uid, device, f)
        if f.type not in CLIENT_TYPES:
            if f.type == "system":
                raise TidingsError("forbidden", "system messages come from the server API")
            raise TidingsError("invalid", f"unknown message type {f.type[:32]!r}")
        conv, members = self.target(uid, f.to, f.conv)
        return self.build(
            uid,
            device,
            conv,
            members,
            f.cid,
            f.type,
            f.body,
            f.flags,
            f.mentions,
            f.reply_to,
        )

    def build(
        self,
        uid: str,
        device: str,
        conv: str,
        members: tuple[str, ...],
        cid: str,
        mtype: str,
        body: dict[str, Any],
        flags: int = 0,
        mentions: list[str] | None = None,
        reply_to: str | None = None,
    ) -> NewMessage:
        if not 0 <= flags <= MAX_FLAGS:
            raise TidingsError("invalid", "flags out of range")
        if not check_json_model(body):  # also bounds nesting depth, whatever the codec
            raise TidingsError("invalid", "body must hold only JSON values")
        try:
            body_bytes = _pack(body)
        except (OverflowError, TypeError, ValueError):
            raise TidingsError("invalid", "body holds a value MessagePack cannot carry") from None
        if len(body_bytes) > self.settings.max_body_bytes:
            raise TidingsError("too_large", f"body over {self.settings.max_body_bytes} bytes")
        if mtype == "text":
            text = body.get("text")
            if not isinstance(text, str) or not text:
                raise TidingsError("invalid", "a text message needs a non-empty body.text")
            if len(text.encode()) > self.settings.max_text_bytes:
                raise TidingsError("too_large", f"text over {self.settings.max_text_bytes} bytes")
        mention_ids: tuple[str, ...] = ()
        if mentions:
            if len(mentions) > MAX_MENTIONS:
                raise TidingsError("too_large", f"more than {MAX_MENTIONS} mentions")
            mention_ids = tuple(normalize_user_id(m) for m in mentions)
        return NewMessage(
            conv=conv,
            sender=uid,
            dev=device,
            cid=cid,
            type=mtype,
            body=body,
            body_bytes=body_bytes,
            members=members,
            blocker=peer_of(uid, conv),
            counted=not flags & (FLAG_SILENT | FLAG_NOT_COUNTED),
            flags=flags,
            mentions=mention_ids,
            reply_to=None if reply_to is None else parse_id(reply_to, "reply_to"),
        )

    def _amendment(self, uid: str, device: str, f: Send) -> NewMessage:
        """A recall (body ``{"seq": N}``) or edit (``{"seq": N, "body": {...}}``) of the
        sender's own entry N: an event entry, not counted toward unread."""
        target = f.body.get("seq")
        if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target < MAX_ID:
            raise TidingsError("invalid", f"a {f.type} needs body.seq, the entry to change")
        conv, members = self.target(uid, f.to, f.conv)
        if f.type == "recall":
            amend = Amend(target, "recall", window_ms=self.settings.recall_window_ms)
            body: dict[str, Any] = {"seq": target}
        else:
            new_body = f.body.get("body")
            if not isinstance(new_body, dict):
                raise TidingsError("invalid", "an edit needs body.body, the new content")
            checked = self.build(
                uid,
                device,
                conv,
                members,
                f.cid,
                "text" if "text" in new_body else "custom",
                new_body,
            )
            amend = Amend(target, "edit", new_body=new_body, new_body_bytes=checked.body_bytes)
            body = {"seq": target, "body": new_body}
        msg = self.build(uid, device, conv, members, f.cid, "custom", body, f.flags)
        return msgspec.structs.replace(msg, type=f.type, counted=False, amend=amend, reads=False)

    def target(self, uid: str, to: str | None, conv: str | None) -> tuple[str, tuple[str, ...]]:
        if (to is None) == (conv is None):
            raise TidingsError("invalid", "give exactly one of `to` and `conv`")
        if to is not None:
            peer = normalize_user_id(to)
        else:
            assert conv is not None
            if is_group(conv):
                check_group_conv(conv)
                return conv, ()  # the writer checks membership and mutes with the append
            raw_pair = direct_members(conv)
            if raw_pair is None:
                raise TidingsError("not_found", "no such conversation")
            pair = (normalize_user_id(raw_pair[0]), normalize_user_id(raw_pair[1]))
            if uid not in pair:
                raise TidingsError("forbidden", "not a member of this conversation")
            peer = pair[1] if pair[0] == uid else pair[0]
        members = (uid,) if peer == uid else (uid, peer)
        return direct_conversation_id(uid, peer), members

    def submit(self, msg: NewMessage, *, from_device: bool = True) -> asyncio.Future[AppendResult]:
        """Append durably; once committed (and not a retry) publish to the members' devices
        (all of them but the sending device; all of them for server-API sends)."""
        fut = self.store.append_message(msg)
        fut.add_done_callback(self._committed(msg, msg.dev if from_device else None))
        return fut

    def _committed(self, msg: NewMessage, exclude: str | None) -> Any:
        def done(fut: asyncio.Future[AppendResult]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            res = fut.result()
            if not res.dup:
                faults.hit("after_commit")
                users = self._members_of(res.record.conv, msg.members)
                self.bus.publish(MessageEvent(res.record, users, exclude_device=exclude))

        return done

    @staticmethod
    def _members_of(conv: str, hint: tuple[str, ...]) -> tuple[str, ...]:
        pair = direct_members(conv)
        if pair is None:
            return hint
        return (pair[0],) if pair[0] == pair[1] else pair

    async def send(self, uid: str, device: str, f: Send) -> AppendResult:
        return await self.submit(self.prepare(uid, device, f))

    # ------------------------------------------------------------------ read state

    async def mark_read(self, uid: str, device: str, conv: str, seq: int) -> ReadState:
        """Advance the read position; tell the user's other devices and the other member."""
        if not 1 <= seq < MAX_ID:
            raise TidingsError("invalid", "seq must be 1..2^63-1")
        check_conv(uid, conv)
        if is_group(conv):
            return await self._mark_group_read(uid, device, conv, seq)
        state = await self.store.mark_read(uid, conv, seq)
        if state.changed:
            peer = peer_of(uid, conv)
            # A user who blocks the reader gets no read receipts from them.
            if peer is None or await self.store.is_blocked(peer, uid):
                users: tuple[str, ...] = (uid,)
            else:
                users = (uid, peer)
            notice = ReadNotice(
                conv, uid, device, state.read_seq, state.unread, users, state.read_n
            )
            self.bus.publish(notice)
        return state

    async def _mark_group_read(self, uid: str, device: str, conv: str, seq: int) -> ReadState:
        """A group read is answered at once and written coalesced (``self.reads``); the
        user's other devices hear of it at once, nobody else does (receipts are counted
        on request)."""
        state = await self.store.peek_read(uid, conv, seq)
        counted = state.unread + state.read_n
        pending = self.reads.pending(uid, conv)
        if pending is not None and pending[0] >= state.read_seq:
            return ReadState(conv, uid, pending[0], counted - pending[1], False, 0, pending[1])
        if state.changed:
            self.reads.note(uid, conv, state.read_seq, state.read_n)
            self.bus.publish(
                ReadNotice(conv, uid, device, state.read_seq, state.unread, (uid,), state.read_n)
            )
        return state

    async def update_settings(
        self,
        uid: str,
        device: str,
        conv: str,
        muted: bool | None = None,
        pinned: bool | None = None,
        hidden: bool | None = None,
        draft: str | None = None,
    ) -> ConvSettings:
        """Change the user's own settings of a conversation; the user's other devices are
        told at once, and every device sees them in the conversation list."""
        check_conv(uid, conv)
        if draft is not None and len(draft.encode()) > MAX_DRAFT_BYTES:
            raise TidingsError("too_large", f"draft over {MAX_DRAFT_BYTES} bytes")
        settings = await self.store.update_settings(uid, conv, muted, pinned, hidden, draft)
        self.bus.publish(SettingsNotice(conv, uid, device, settings))
        return settings

    async def delete_for_me(self, uid: str, device: str, conv: str, seqs: list[int]) -> list[int]:
        """Hide entries for this user's devices only; the other devices are told."""
        if not 1 <= len(seqs) <= MAX_DELETE:
            raise TidingsError("invalid", f"give 1 to {MAX_DELETE} seqs")
        if any(not 1 <= s < MAX_ID for s in seqs):
            raise TidingsError("invalid", "seqs must be 1..2^63-1")
        check_conv(uid, conv)
        done = await self.store.delete_for(uid, conv, seqs)
        if done:
            self.bus.publish(DeletedNotice(conv, uid, device, tuple(done)))
        return done

    async def _mark_deleted(self, uid: str, rows: list[MessageRecord]) -> list[MessageRecord]:
        """Show the reader's own deletions as empty `deleted` entries (seqs stay intact)."""
        if not rows:
            return rows
        # A recall or edit entry reads as deleted with the entry it changed.
        spans: dict[str, tuple[int, int]] = {}
        for r in rows:
            lo, hi = spans.get(r.conv, (r.seq, r.seq))
            target = amend_target(r) or r.seq
            spans[r.conv] = (min(lo, r.seq, target), max(hi, r.seq))
        gone = await self.store.deleted_in(uid, spans)
        if not gone:
            return rows
        out = []
        for r in rows:
            dead = gone.get(r.conv, ())
            if r.seq in dead or amend_target(r) in dead:
                r = tombstone(r)
            out.append(r)
        return out

    async def conversation_list(self, uid: str, limit: int) -> tuple[list[ConvSummary], int]:
        if not 1 <= limit < MAX_ID:
            raise TidingsError("invalid", "limit must be >= 1")
        return await self.store.conversation_list(uid, min(limit, CONV_LIST_MAX))

    # ------------------------------------------------------------------ reads

    async def check_read(self, uid: str, conv: str) -> int:
        """Raise unless ``uid`` may read ``conv``; the seq after which it may (the floor
        of a group member who joined without earlier history)."""
        if not is_group(conv):
            member_pair(uid, conv)
            return 0
        check_group_conv(conv)
        me = await self.store.membership(conv, uid)
        if me is None:
            if await self.store.conversation(conv) is None:
                raise TidingsError("not_found", "no such conversation")
            raise TidingsError("forbidden", "not a member of this conversation")
        return me.joined_seq

    async def history(
        self, uid: str, conv: str, before: int, limit: int, as_reader: bool = True
    ) -> tuple[list[MessageRecord], bool]:
        """A page of ``conv`` for ``uid``; with ``as_reader`` the user's own deletions show
        as deleted entries (the server API reads without them)."""
        if not 0 <= before < MAX_ID or not 1 <= limit < MAX_ID:
            raise TidingsError("invalid", "before must be 0..2^63-1 and limit >= 1")
        floor = await self.check_read(uid, conv) if as_reader else 0
        limit = min(limit, self.settings.history_page_max)
        rows = await self.store.history(conv, before, limit, floor)
        # Keep the reply within the byte budget: drop the oldest, the client pages on.
        total, keep = 0, len(rows)
        for i in range(len(rows) - 1, -1, -1):
            total += rows[i].size
            if total > REPLY_BUDGET_BYTES and i < len(rows) - 1:
                keep = len(rows) - 1 - i
                break
        rows = rows[len(rows) - keep :]
        more = bool(rows) and rows[0].seq > floor + 1
        return (await self._mark_deleted(uid, rows) if as_reader else rows), more

    async def _recent_below(self, uid: str, since: int) -> list[ConvRow]:
        """With several writers (PostgreSQL), an append may commit after one with a larger
        message id: the conversations whose last id lies just below the device's
        watermark are looked at again (the device holds them, or it gets what it lacks)."""
        slack = self.store.sync_slack_ms
        if not slack or not since:
            return []
        low = max(0, since - (slack << ID_TIME_SHIFT))
        rows = await self.store.changed_conversations(uid, low, SYNC_RECHECK_MAX)
        return [r for r in rows if r.last_mid <= since]

    async def sync(
        self,
        uid: str,
        since_raw: str,
        have: dict[str, int],
        limit: int,
        cv: int = 0,
        tail: int = 0,
    ) -> SyncResult:
        """What changed since the device's sync point, given the seqs it states it holds.
        With ``tail`` > 0, a conversation the device is more than ``tail`` entries behind
        in gets only its newest ``tail`` entries (its ``base`` says where they start)."""
        since = parse_id(since_raw, "since")
        if not 0 <= limit < MAX_ID:
            raise TidingsError("invalid", "limit must be >= 0")
        if not 0 <= tail < MAX_ID:
            raise TidingsError("invalid", "tail must be 0..2^63-1")
        if not 0 <= cv < MAX_ID:
            raise TidingsError("invalid", "cv must be 0..2^63-1")
        if any(not 0 <= held < MAX_ID for held in have.values()):
            raise TidingsError("invalid", "`have` seqs must be 0..2^63-1")
        budget = min(limit, self.settings.sync_page_max)
        rows = await self.store.changed_conversations(uid, since, SYNC_CONVS_MAX + 1)
        listed = await self._recent_below(uid, since) + rows[:SYNC_CONVS_MAX]
        # Which entries to send: per conversation from what the device holds (or from
        # its tail) to the last seq, within the entry budget, oldest change first.
        starts: dict[str, int] = {}
        spans: list[tuple[str, int, int]] = []
        for row in listed:
            held = max(have.get(row.conv, 0), row.floor)
            if tail and held < row.last_seq - tail:
                held = row.last_seq - tail
            starts[row.conv] = held
            if held < row.last_seq and budget > 0:
                upto = min(row.last_seq, held + budget)
                spans.append((row.conv, held, upto))
                budget -= upto - held
        fetched = await self.store.messages_in(spans)
        msgs, _ = _within(fetched, REPLY_BUDGET_BYTES)
        got: dict[str, int] = {}
        for m in msgs:
            got[m.conv] = m.seq
        convs: list[ConvState] = []
        done: list[str] = []  # conversations the device holds completely after this answer
        # `wm` advances over the prefix of conversations the device holds completely once
        # it applies this answer: the next sync point.
        wm, prefix_held = since, True
        for row in listed:
            held = have.get(row.conv, 0)
            start = starts[row.conv]
            base = start if start > held else 0
            convs.append(ConvState(row.conv, row.last_seq, peer_of(uid, row.conv), base))
            covered = max(start, got.get(row.conv, 0)) >= row.last_seq
            if covered and held < row.last_seq:
                done.append(row.conv)
            if covered and prefix_held:
                wm = max(wm, row.last_mid)
            else:
                prefix_held = False
        complete = prefix_held and len(rows) <= SYNC_CONVS_MAX
        # User-scoped changes since the device's change version (read positions on other
        # devices, the other member's reads, settings, deletions), and the conversations
        # this answer completes: the current state of each.
        changed, new_cv = await self.store.user_changes_since(uid, cv, SYNC_CONVS_MAX)
        if len(changed) >= SYNC_CONVS_MAX:
            complete = False
        # Deletions are deltas, not state: every one up to new_cv goes out, with the state
        # of its conversation (too many for one answer: new_cv stops at the last sent).
        deletions, upto = await self.store.deletions_since(uid, cv, new_cv, SYNC_DELETIONS_MAX)
        if upto < new_cv:
            new_cv = upto
            complete = False
        wanted = list(dict.fromkeys([*changed, *done, *deletions]))
        states = await self.store.conversation_states(uid, wanted)
        # Groups the user left since cv (perhaps to rejoin): the device drops what it held.
        left = await self.store.left_since(uid, cv, new_cv)
        return SyncResult(
            convs,
            await self._mark_deleted(uid, msgs),
            complete,
            wm,
            states,
            new_cv,
            deletions,
            left,
        )
