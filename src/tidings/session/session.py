"""A device session: the same code under every transport.

States: ``hello`` (waiting for the client's hello, under the auth timeout), ``auth``
(token being checked), ``ready``, ``closed``. Sends are validated on the loop and handed
to the store's writer; the ``sent`` answer is written from the commit's callback, with no
task per message. Pushes stay in a per-conversation window until the device acks them
(cumulatively); the hub's sweeper retransmits the window with backoff and closes the
session when the retransmits run out.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from tidings.domain.groups import is_group, role_name
from tidings.domain.ids import MAX_USER_ID_BYTES, direct_members
from tidings.domain.rooms import check_room
from tidings.protocol import PROTOCOL_VERSION, close
from tidings.protocol.codec import FrameError
from tidings.protocol.errors import TidingsError
from tidings.protocol.frames import (
    Ack,
    Block,
    BlockList,
    Blocks,
    Close,
    ConvList,
    Convs,
    Delete,
    Deleted,
    Error,
    Group,
    GroupDone,
    Hello,
    History,
    Join,
    Joined,
    Leave,
    Limits,
    MemberItem,
    MemberList,
    Members,
    Ok,
    Page,
    Ping,
    Pong,
    PresenceEvent,
    PresenceQuery,
    Privacy,
    Read,
    ReadEvent,
    Ready,
    ReceiptItem,
    ReceiptList,
    Receipts,
    Resync,
    RoomSend,
    Send,
    Sent,
    ServerFrame,
    ServerHello,
    SettingsEvent,
    Sync,
    Synced,
    Typing,
)
from tidings.protocol.frames import Settings as SettingsFrame
from tidings.services.accounts import Claims
from tidings.services.groups import GroupOp, info_out, profile_of
from tidings.services.messaging import MAX_MENTIONS, conv_item, to_wire
from tidings.session.context import Link, ServerContext
from tidings.store.base import AppendResult, AuthState

log = logging.getLogger(__name__)

CAPS = [
    "ack",
    "sync",
    "history",
    "retransmit",
    "typing",
    "block",
    "read",
    "convs",
    "settings",
    "presence",
    "groups",
    "receipts",
    "rooms",
    "delivered",
]
ACK_COST = 0.05  # acks are nearly free against the rate limit (pings cost a read: 1)
MAX_READS_INFLIGHT = 8
MAX_ACKED_CONVS = 1024  # conversations whose last ack a session remembers (then it forgets)
NOT_NOTED = 1 << 64  # above every seq an ack can carry: the conversation's acks are ignored
MAX_DIRECT_ID_CHARS = 3 + 2 * MAX_USER_ID_BYTES  # "d:" + two user ids + "|"


class Session:
    def __init__(self, link: Link, ctx: ServerContext) -> None:
        self.link = link
        self.ctx = ctx
        s = ctx.settings
        self._s = s
        now = ctx.clock.monotonic()
        self.state = "hello"
        self.uid = ""
        self.device = ""
        self.platform = ""
        self.jti = ""
        self.issued_ms = 0
        self.ready_ms = 0  # when `ready` went out, UTC ms (login policies: newest wins)
        self.expires_ms = 0
        self.session_id = secrets.token_hex(8)
        self.auth_deadline = now + s.auth_timeout_ms / 1000
        self.last_rx = now
        self._tokens = float(s.rate_burst)
        self._last_refill = now
        self._refused = 0
        self.inflight = 0
        self.reads = 0
        self.unacked: dict[str, deque[tuple[int, bytes]]] = {}
        self.unacked_count = 0
        self._acked: dict[str, int] = {}  # conv -> highest ack noted as delivered
        self.rtx_attempts = 0
        self.rtx_due = 0.0
        self.retransmits = 0  # statistics
        self._typing_at: dict[str, float] = {}
        self.rooms: set[str] = set()  # live rooms this session is in

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        self.ctx.registry.track(self)
        link = self.link
        key = (link.codec.name, link.framing)
        data = self.ctx.hello_frames.get(key)
        if data is None:
            data = self.ctx.hello_frames[key] = link.frame(link.codec.encode(self._hello()))
        link.write(data)

    def _hello(self) -> ServerHello:
        s = self._s
        return ServerHello(
            v=PROTOCOL_VERSION,
            server=self.ctx.server_name,
            caps=CAPS,
            limits=Limits(
                max_frame_bytes=s.max_frame_bytes,
                max_body_bytes=s.max_body_bytes,
                max_text_bytes=s.max_text_bytes,
                rate_per_s=s.rate_per_s,
                rate_burst=s.rate_burst,
                max_inflight=s.max_inflight,
                history_page_max=s.history_page_max,
                sync_page_max=s.sync_page_max,
                max_unacked=s.max_unacked,
                max_requests_inflight=MAX_READS_INFLIGHT,
                max_mentions=MAX_MENTIONS,
            ),
            heartbeat_ms=s.heartbeat_ms,
            idle_timeout_ms=s.idle_timeout_ms,
            auth_timeout_ms=s.auth_timeout_ms,
        )

    def close(self, code: int, reason: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.ctx.registry.unregister(self)
        self.ctx.gate.forget(self)
        self.link.close(code, reason)

    def on_lost(self) -> None:
        """The transport is gone (peer closed, reset, or we closed it)."""
        if self.state != "closed":
            self.state = "closed"
            self.ctx.registry.unregister(self)
            self.ctx.gate.forget(self)

    # ------------------------------------------------------------------ inbound

    def on_frame(self, payload: bytes) -> None:
        try:
            self._on_frame(payload)
        except TidingsError as exc:  # a validation deep in a handler
            self._error(0, exc)
        except Exception:
            log.exception("frame handling failed")
            self._error(0, TidingsError("internal", "request failed"))

    def _on_frame(self, payload: bytes) -> None:
        if self.state == "closed":
            return
        now = self.ctx.clock.monotonic()
        self.last_rx = now
        try:
            frame = self.link.codec.decode_client(payload)
        except FrameError as exc:
            if not self._take(now, 1.0, exc.request_id):
                return
            self._error(exc.request_id, TidingsError(exc.code, exc.message))
            return
        kind = type(frame)
        if kind is Ack:
            if self._take(now, ACK_COST, 0) and self.state == "ready":
                self._on_ack(frame)  # type: ignore[arg-type]
            return
        rid = getattr(frame, "id", 0)
        if not self._take(now, 1.0, rid):
            return
        if kind is Close:
            self.close(close.NORMAL, "client closed")
            return
        if self.state != "ready":
            if kind is Hello and self.state == "hello":
                self._on_hello(frame)  # type: ignore[arg-type]
            elif kind is Hello:
                self._error(rid, TidingsError("invalid", "hello already received"))
            elif self.state == "auth":
                self._error(rid, TidingsError("unauthenticated", "wait for `ready` first"))
            else:
                self._error(rid, TidingsError("unauthenticated", "send hello with a token first"))
            return
        if kind is Send:
            self._on_send(frame)  # type: ignore[arg-type]
        elif kind in _ROOM_FRAMES:
            try:
                _ROOM_FRAMES[kind](self, frame)
            except TidingsError as exc:
                self._error(rid, exc)
        elif kind is Typing:
            self._on_typing(frame, now)  # type: ignore[arg-type]
        elif kind is Hello:
            self._error(rid, TidingsError("invalid", "already authenticated"))
        else:
            handler = _REQUESTS.get(kind)
            if handler is not None:  # requests answered after a store read or write
                self._spawn(rid, handler(self, frame))

    def _take(self, now: float, cost: float, rid: int) -> bool:
        """Token-bucket rate limit; a client that keeps flooding is disconnected."""
        s = self._s
        tokens = self._tokens + (now - self._last_refill) * s.rate_per_s
        self._last_refill = now
        if tokens > s.rate_burst:
            tokens = s.rate_burst
        if tokens >= cost:
            self._tokens = tokens - cost
            self._refused = 0
            return True
        self._tokens = tokens
        self._refused += 1
        if self._refused > max(s.rate_burst, 20):
            self.close(close.FLOOD, "rate limit exceeded repeatedly")
            return False
        wait_ms = int((cost - tokens) / s.rate_per_s * 1000) + 1
        self._error(rid, TidingsError("rate_limited", "slow down", retry_after_ms=wait_ms))
        return False

    # ------------------------------------------------------------------ hello

    def _on_hello(self, f: Hello) -> None:
        if f.v != PROTOCOL_VERSION:
            self._error(
                f.id,
                TidingsError("unsupported_version", f"this server speaks v{PROTOCOL_VERSION}"),
            )
            self.close(close.UNSUPPORTED_VERSION, "unsupported protocol version")
            return
        self.state = "auth"
        try:
            claims = self.ctx.accounts.unexpired(f.token)
        except TidingsError as exc:
            self._auth_failed(f.id, exc)
            return
        # The token's state and the user's watermark: one store read, answered through a
        # callback (no task: this is every login's path).
        started = self.ctx.clock.monotonic()
        try:
            fut = self.ctx.store.login_state(claims.jti, claims.uid, claims.device)
            fut.add_done_callback(lambda fut: self._auth_read(f.id, claims, started, fut))
        except Exception:  # the store could not even start the read
            log.exception("login read failed")
            self._auth_failed(f.id, TidingsError("unavailable", "try again later"))

    def _auth_read(
        self,
        rid: int,
        claims: Claims,
        started: float,
        fut: asyncio.Future[tuple[AuthState, int]],
    ) -> None:
        """The login read's callback. An error raised here would only reach the loop's
        handler, so any failure ends the login (an error, then 1013 or 4002) instead."""
        if fut.cancelled():
            return
        exc = fut.exception()  # retrieved even if nobody waits any more (no warning)
        if self.state != "auth":  # closed while the read ran
            return
        try:
            if exc is not None:
                raise exc
            state, wm = fut.result()
            self.ctx.accounts.check_state(claims, state)
            self._admit(rid, claims, started, wm)
        except TidingsError as err:
            self._auth_failed(rid, err)
        except Exception:
            log.exception("login failed")
            self._auth_failed(rid, TidingsError("internal", "login failed"))

    def _admit(self, rid: int, claims: Claims, started: float, wm: int) -> None:
        """The token is good: `ready`, then the session is registered."""
        self.uid = claims.uid
        self.device = claims.device
        self.platform = claims.platform
        self.jti = claims.jti
        self.issued_ms = claims.issued_ms
        self.expires_ms = claims.expires_ms
        # Ready goes out before any push; whatever commits after the watermark was read
        # is either pushed (we are registered from here on) or found by the device's sync.
        self._reply(Ready(rid, self.uid, self.device, str(wm), self.session_id))
        if self.state == "closed":  # the reply overflowed its send buffer
            return
        self.state = "ready"
        self.ready_ms = self.ctx.clock.now_ms()
        registry = self.ctx.registry
        registry.register(self)
        # A revocation stored while the token was being checked was published before this
        # session was registered: look once more, now that later ones will reach us. A
        # single node saw every revocation itself and asks the store only after one (on a
        # cluster, always: see _recheck).
        if registry.revoked_since(claims.uid, started):
            self._spawn(rid, self._recheck(claims, wm), on_error=self._auth_failed)
        else:
            registry.announce(self)

    async def _recheck(self, claims: Claims, wm: int) -> None:
        """The second look at the token after ``ready``. On a cluster this node's route
        for the user reaches the shared registry a moment after `ready`; once it is in,
        one read gives the token's state and the user's watermark: a newer one than
        `ready`'s means a message committed elsewhere in that moment may not have been
        pushed here, and the device is told to sync."""
        again: AuthState | None = None
        if await self.ctx.registry.routed():
            if self.state != "ready":
                return
            again, later = await self.ctx.store.login_state(claims.jti, claims.uid, claims.device)
            if later > wm and self.state == "ready":
                self._reply(Resync())
        else:
            again = await self.ctx.store.auth_state(claims.jti, claims.uid, claims.device)
        if again.token_revoked or claims.issued_ms < again.device_revoked_before_ms:
            self.close(close.TOKEN_REVOKED, "token revoked")
            return
        if self.state == "ready":
            self.ctx.registry.announce(self)

    def _auth_failed(self, rid: int, err: TidingsError) -> None:
        self._error(rid, err)
        if err.code in ("unavailable", "internal"):
            self.close(close.TRY_AGAIN_LATER, err.message)
        else:
            self.close(close.AUTH_FAILED, err.code)

    # ------------------------------------------------------------------ send

    def _on_send(self, f: Send) -> None:
        if self.inflight >= self._s.max_inflight:
            self._error(
                f.id, TidingsError("rate_limited", "too many sends in flight", retry_after_ms=50)
            )
            return
        try:
            msg = self.ctx.messaging.prepare(self.uid, self.device, f)
        except TidingsError as exc:
            self._error(f.id, exc)
            return
        self.inflight += 1
        fut = self.ctx.messaging.submit(msg)
        rid = f.id
        fut.add_done_callback(lambda fut: self._sent(rid, fut))
        self.ctx.gate.after_submit(self)

    def _sent(self, rid: int, fut: asyncio.Future[AppendResult]) -> None:
        self.inflight -= 1
        if self.state == "closed":
            return
        exc = fut.exception()
        if exc is not None:
            self._error(
                rid,
                exc if isinstance(exc, TidingsError) else TidingsError("internal", "send failed"),
            )
            return
        res = fut.result()
        rec = res.record
        self._reply(
            Sent(
                rid,
                rec.cid,
                rec.conv,
                rec.seq,
                str(rec.mid),
                rec.ts,
                res.dup,
                rec.n,
                rec.edit_version,
            )
        )

    # ------------------------------------------------------------------ push / ack

    def push(self, conv: str, seq: int, framed: bytes) -> None:
        """Write a pre-framed push and keep it until acked."""
        if self.state != "ready":
            return
        q = self.unacked.get(conv)
        if q is None:
            q = self.unacked[conv] = deque()
        q.append((seq, framed))
        self.unacked_count += 1
        if self.unacked_count == 1:
            self.ctx.registry.watch(self)
        if self.unacked_count > self._s.max_unacked:
            self.close(close.SLOW_CONSUMER, "too many unacknowledged pushes")
            return
        if not self.rtx_due:
            self.rtx_due = self.ctx.clock.monotonic() + self._s.retransmit_ms / 1000
        self.link.write(framed)

    def _on_ack(self, f: Ack) -> None:
        if f.seq > self._acked.get(f.conv, 0):
            self._note_delivered(f.conv, f.seq)
        q = self.unacked.get(f.conv)
        if not q:
            return
        removed = 0
        while q and q[0][0] <= f.seq:
            q.popleft()
            removed += 1
        if not removed:
            return
        if not q:
            del self.unacked[f.conv]
        self.unacked_count -= removed
        self.rtx_attempts = 0
        self.rtx_due = (
            self.ctx.clock.monotonic() + self._s.retransmit_ms / 1000 if self.unacked_count else 0.0
        )

    def _note_delivered(self, conv: str, seq: int) -> None:
        """The device holds ``conv`` up to ``seq``: noted for the delivered receipts of
        1:1 conversations (an ack after a sync counts too). O(1) and no store access: a
        repeated ack costs the caller's dict lookup, and conversations without receipts
        (groups, notes to self, ids not naming this user) are remembered as never noted."""
        acked = self._acked
        if conv not in acked:
            if len(conv) > MAX_DIRECT_ID_CHARS:
                return  # not a 1:1 id; not remembered either (junk must not fill memory)
            if len(acked) >= MAX_ACKED_CONVS:
                acked.clear()
            pair = direct_members(conv)
            if pair is None or pair[0] == pair[1] or self.uid not in pair:
                acked[conv] = NOT_NOTED
                return
        acked[conv] = seq
        self.ctx.messaging.delivered.note(conv, self.uid, seq)

    def tick(self, now: float) -> None:
        """Timers, driven by the hub's sweeper: auth, idle, retransmit, token expiry."""
        s = self._s
        if self.state in ("hello", "auth"):
            if now >= self.auth_deadline:
                self._error(0, TidingsError("unauthenticated", "authentication timed out"))
                self.close(close.AUTH_TIMEOUT, "authentication timeout")
            return
        if self.state != "ready":
            return
        if now - self.last_rx > s.idle_timeout_ms / 1000:
            self.close(close.IDLE_TIMEOUT, "idle timeout")
            return
        if self.expires_ms and self.ctx.clock.now_ms() >= self.expires_ms:
            self._error(0, TidingsError("token_expired", "the token has expired"))
            self.close(close.AUTH_FAILED, "token_expired")
            return
        if self.unacked_count and now >= self.rtx_due:
            if self.rtx_attempts >= s.max_retransmits:
                self.close(close.ACK_TIMEOUT, "pushes not acknowledged; sync on reconnect")
                return
            self.rtx_attempts += 1
            self.rtx_due = now + s.retransmit_ms / 1000 * (2**self.rtx_attempts)
            for q in list(self.unacked.values()):
                for _, framed in q:
                    self.retransmits += 1
                    self.link.write(framed)
                    if self.state != "ready":
                        return

    # ------------------------------------------------------------------ contacts

    def _on_typing(self, f: Typing, now: float) -> None:
        """Relay at most one notice per conversation per typing interval; extra ones are
        dropped silently (they carry no information the peer lacks)."""
        last = self._typing_at.get(f.conv)
        if last is not None and now - last < self._s.typing_interval_ms / 1000:
            return
        if len(self._typing_at) > 1000:
            self._typing_at.clear()
        self._typing_at[f.conv] = now
        self._spawn(0, self.ctx.contacts.typing(self.uid, f.conv))

    async def _on_block(self, f: Block) -> None:
        await self.ctx.contacts.set_block(self.uid, f.user, f.on)
        self._reply(Ok(f.id))

    async def _on_blocks(self, f: Blocks) -> None:
        self._reply(BlockList(f.id, await self.ctx.contacts.blocked(self.uid)))

    # ------------------------------------------------------------------ read state

    async def _on_read(self, f: Read) -> None:
        state = await self.ctx.messaging.mark_read(self.uid, self.device, f.conv, f.seq)
        self._reply(ReadEvent(f.conv, self.uid, state.read_seq, f.id, state.unread, state.read_n))

    async def _on_presence(self, f: PresenceQuery) -> None:
        self._reply(PresenceEvent(await self.ctx.presence.query(self.uid, f.users), f.id))

    async def _on_privacy(self, f: Privacy) -> None:
        await self.ctx.presence.set_hidden(self.uid, not f.presence)
        self._reply(Ok(f.id))

    async def _on_delete(self, f: Delete) -> None:
        done = await self.ctx.messaging.delete_for_me(self.uid, self.device, f.conv, f.seqs)
        self._reply(Deleted(f.conv, done, f.id))

    async def _on_settings(self, f: SettingsFrame) -> None:
        st = await self.ctx.messaging.update_settings(
            self.uid, self.device, f.conv, f.muted, f.pinned, f.hidden, f.draft
        )
        self._reply(
            SettingsEvent(
                f.conv, st.muted, st.pinned, st.hidden, st.draft, f.id, st.version, st.hidden_seq
            )
        )

    async def _on_convs(self, f: Convs) -> None:
        rows, badge = await self.ctx.messaging.conversation_list(self.uid, f.limit)
        self._reply(ConvList(f.id, [conv_item(self.uid, r) for r in rows], badge))

    # ------------------------------------------------------------------ live rooms

    def _on_join(self, f: Join) -> None:
        room = check_room(f.room)
        if room not in self.rooms and len(self.rooms) >= self._s.rooms_per_session:
            raise TidingsError("forbidden", f"at most {self._s.rooms_per_session} rooms at once")
        online = self.ctx.registry.join_room(self, room)
        self._reply(Joined(f.id, room, online))
        self.ctx.registry.greet_room(self, room)

    def _on_leave(self, f: Leave) -> None:
        self.ctx.registry.leave_room(self, check_room(f.room))
        self._reply(Ok(f.id))

    def _on_room_send(self, f: RoomSend) -> None:
        if f.room not in self.rooms:
            raise TidingsError("forbidden", "join the room first")
        self.ctx.rooms.post(self.uid, f.room, f.kind, f.body)
        if f.id:
            self._reply(Ok(f.id))

    # ------------------------------------------------------------------ groups

    async def _on_group(self, f: Group) -> None:
        groups = self.ctx.groups
        if f.op == "info":
            if f.conv is None:
                raise TidingsError("invalid", "`conv` names the group")
            mine = await groups.member(self.uid, f.conv)
            self._reply(GroupDone(f.id, f.conv, info_out(await groups.info(f.conv), mine)))
            return
        req = GroupOp(
            f.op,
            f.conv,
            f.users,
            f.role,
            f.duration_ms,
            f.on,
            profile_of(f),
            f.cid,
        )
        res = await groups.operate(self.uid, self.device, req)
        me = await self.ctx.store.membership(res.info.conv, self.uid)
        rec = res.record
        self._reply(
            GroupDone(
                f.id,
                res.info.conv,
                info_out(res.info, me),
                0 if rec is None else rec.seq,
                "" if rec is None else str(rec.mid),
                res.dup,
            )
        )

    async def _on_members(self, f: Members) -> None:
        await self.ctx.groups.member(self.uid, f.conv)
        rows, nxt = await self.ctx.groups.members(f.conv, f.cursor, f.limit)
        items = [MemberItem(r.uid, role_name(r.role), r.joined_ms, r.muted_until) for r in rows]
        self._reply(MemberList(f.id, f.conv, items, nxt))

    async def _on_receipts(self, f: Receipts) -> None:
        await self.ctx.messaging.check_read(self.uid, f.conv)
        size = (await self.ctx.groups.info(f.conv)).member_count if is_group(f.conv) else 2
        counts = await self.ctx.groups.receipts(f.conv, f.seqs, size)
        items = [ReceiptItem(c.seq, c.count, c.readers) for c in counts]
        self._reply(ReceiptList(f.id, f.conv, items))

    # ------------------------------------------------------------------ reads

    async def _on_ping(self, f: Ping) -> None:
        wm, cv = await self.ctx.store.sync_point(self.uid)
        self._reply(Pong(f.id, str(wm), self.ctx.clock.now_ms(), cv))

    async def _on_sync(self, f: Sync) -> None:
        res = await self.ctx.messaging.sync(self.uid, f.since, f.have, f.limit, f.cv, f.tail)
        msgs = [to_wire(m) for m in res.msgs]
        states = [conv_item(self.uid, r, res.deletions.get(r.conv)) for r in res.states]
        self._reply(
            Synced(f.id, res.convs, msgs, res.complete, str(res.wm), states, res.cv, res.left)
        )

    async def _on_history(self, f: History) -> None:
        rows, more = await self.ctx.messaging.history(self.uid, f.conv, f.before, f.limit)
        self._reply(Page(f.id, f.conv, [to_wire(m) for m in rows], more))

    def _spawn(
        self,
        rid: int,
        coro: Coroutine[Any, Any, None],
        on_error: Callable[[int, TidingsError], None] | None = None,
    ) -> None:
        if self.reads >= MAX_READS_INFLIGHT:
            if asyncio.iscoroutine(coro):
                coro.close()
            self._error(
                rid, TidingsError("rate_limited", "too many requests in flight", retry_after_ms=100)
            )
            return
        self.reads += 1
        loop = self.ctx.loop
        task = loop.create_task(coro) if loop is not None else asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: self._read_done(rid, t, on_error))

    def _read_done(
        self,
        rid: int,
        task: asyncio.Future[Any],
        on_error: Callable[[int, TidingsError], None] | None,
    ) -> None:
        self.reads -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if not isinstance(exc, TidingsError):
            log.error("request failed", exc_info=exc)
            exc = TidingsError("internal", "request failed")
        if on_error is not None:
            on_error(rid, exc)
        else:
            self._error(rid, exc)

    # ------------------------------------------------------------------ outbound

    def _reply(self, frame: ServerFrame) -> None:
        if self.state == "closed":
            return
        link = self.link
        link.write(link.frame(link.codec.encode(frame)))

    def _error(self, rid: int, err: TidingsError) -> None:
        self._reply(Error(err.code, err.message, err.retryable, rid, err.retry_after_ms))


# Live-room frames, answered at once (nothing is stored).
_ROOM_FRAMES: dict[type, Callable[[Session, Any], None]] = {
    Join: Session._on_join,
    Leave: Session._on_leave,
    RoomSend: Session._on_room_send,
}

# Requests answered asynchronously (a store read or write), by frame type.
_REQUESTS: dict[type, Callable[[Session, Any], Coroutine[Any, Any, None]]] = {
    Ping: Session._on_ping,
    Sync: Session._on_sync,
    History: Session._on_history,
    Block: Session._on_block,
    Blocks: Session._on_blocks,
    Read: Session._on_read,
    Convs: Session._on_convs,
    Delete: Session._on_delete,
    SettingsFrame: Session._on_settings,
    PresenceQuery: Session._on_presence,
    Privacy: Session._on_privacy,
    Group: Session._on_group,
    Members: Session._on_members,
    Receipts: Session._on_receipts,
}
