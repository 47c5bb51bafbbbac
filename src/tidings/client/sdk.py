"""The async Python SDK.

``Client`` keeps one connection up (reconnecting with jittered exponential backoff),
authenticates with the device token, resends unacknowledged sends with the same client
id, tracks each conversation's seq, buffers out-of-order pushes for a short grace period
and syncs when a gap persists, acknowledges pushes cumulatively, and exposes everything
as an async iterator of events::

    async with Client("ws://127.0.0.1:8080/v1/ws", token) as c:
        await c.send(to="bob", text="hi")
        async for ev in c.events():
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import msgspec

from tidings.client.state import LocalState, ends_membership
from tidings.client.transport import ClientConn, connect
from tidings.protocol import PROTOCOL_VERSION, close
from tidings.protocol.frames import (
    Ack,
    Block,
    BlockList,
    Blocks,
    ConvItem,
    ConvList,
    Convs,
    Delete,
    Deleted,
    DeliveredEvent,
    Error,
    Group,
    GroupDone,
    Hello,
    History,
    Join,
    Joined,
    Leave,
    Limits,
    MemberList,
    Members,
    Message,
    Ok,
    Page,
    Ping,
    Pong,
    PresenceEvent,
    PresenceItem,
    PresenceQuery,
    Privacy,
    Push,
    Read,
    ReadEvent,
    Ready,
    ReceiptItem,
    ReceiptList,
    Receipts,
    Resync,
    RoomFrame,
    RoomMsg,
    RoomSend,
    Send,
    Sent,
    ServerHello,
    SettingsEvent,
    Sync,
    Synced,
    Typing,
    TypingEvent,
)
from tidings.protocol.frames import Settings as SettingsFrame

log = logging.getLogger(__name__)

FINAL_CODES = frozenset(
    {close.AUTH_FAILED, close.TOKEN_REVOKED, close.KICKED, close.UNSUPPORTED_VERSION}
)
TokenSource = str | Callable[[], Awaitable[str]]


class RequestError(Exception):
    """The server refused a request; ``code`` is from the protocol's error table."""

    def __init__(self, err: Error) -> None:
        super().__init__(f"{err.code}: {err.message}")
        self.code = err.code
        self.message = err.message
        self.retryable = err.retryable
        self.retry_after_ms = err.retry_after_ms


@dataclass(frozen=True)
class MessageEvent:
    message: Message
    echo: bool  # True for this device's own send


@dataclass(frozen=True)
class Connected:
    user: str
    device: str
    session: str


@dataclass(frozen=True)
class Disconnected:
    code: int | None
    reason: str
    final: bool  # True when the client will not reconnect (auth failure, revoked, closed)


@dataclass(frozen=True)
class TypingNotice:
    conv: str
    user: str  # who is typing


@dataclass(frozen=True)
class ReadReceipt:
    """``by`` read ``conv`` up to ``seq``. ``unread`` is set when ``by`` is this user (read
    on another device): what is left unread in that conversation."""

    conv: str
    by: str
    seq: int
    unread: int | None


@dataclass(frozen=True)
class Delivered:
    """A device of ``by``, the other member of 1:1 conversation ``conv``, holds its
    entries up to ``seq`` ("delivered"; ``state`` keeps it as ``peer_delivered_seq``)."""

    conv: str
    by: str
    seq: int


@dataclass(frozen=True)
class SettingsChanged:
    """This user changed a conversation's settings on another device."""

    conv: str
    muted: bool
    pinned: bool
    hidden: bool
    draft: str


@dataclass(frozen=True)
class DeletedForMe:
    """This user deleted these entries for themself on another device."""

    conv: str
    seqs: list[int]


@dataclass(frozen=True)
class StatesSynced:
    """Sync brought conversation states: of conversations whose state for this user
    changed while this device was away (read positions, the other member's reads,
    settings, deletions), and of those whose newest entries it just delivered."""

    convs: list[ConvItem]


@dataclass(frozen=True)
class PresenceChanged:
    """Contacts went online or offline (a batch)."""

    users: list[PresenceItem]


@dataclass(frozen=True)
class LeftGroup:
    """This user is no longer a member of group ``conv`` (removed, or left on another
    device); what the device held of it is dropped from ``state``."""

    conv: str


@dataclass(frozen=True)
class RoomEvent:
    """A live room's posts of one tick (high lane first, chat sampled when the room is
    busy: ``dropped`` says how many were left out), the likes counted in it, and now and
    then the approximate ``online`` count (0: not in this frame). With ``recent`` it is
    the room's last posts, right after joining (or re-joining: it may repeat posts seen
    before the connection dropped; rooms are at-most-once and not deduplicated)."""

    room: str
    msgs: list[RoomMsg]
    likes: int
    dropped: int
    online: int
    recent: bool
    ts: int  # the tick's server time, UTC ms


Event = (
    StatesSynced
    | LeftGroup
    | PresenceChanged
    | MessageEvent
    | Connected
    | Disconnected
    | TypingNotice
    | ReadReceipt
    | Delivered
    | SettingsChanged
    | DeletedForMe
    | RoomEvent
)
_END = object()


class _PendingSend:
    """A send in the outbox until acked; ``rid`` is 0 while not on the wire."""

    __slots__ = (
        "body",
        "cid",
        "conv",
        "flags",
        "future",
        "mentions",
        "reply_to",
        "rid",
        "to",
        "type",
    )

    def __init__(
        self,
        cid: str,
        to: str | None,
        conv: str | None,
        mtype: str,
        body: dict[str, Any],
        flags: int,
        future: asyncio.Future[Sent],
        mentions: list[str],
        reply_to: str | None,
    ) -> None:
        self.cid = cid
        self.to = to
        self.conv = conv
        self.type = mtype
        self.body = body
        self.flags = flags
        self.future = future
        self.mentions = mentions
        self.reply_to = reply_to
        self.rid = 0


class Client:
    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        codec: str = "msgpack",
        ssl_context: ssl.SSLContext | None = None,
        heartbeat_s: float | None = None,
        dead_after_s: float | None = None,
        gap_grace_s: float = 0.15,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 5.0,
        request_timeout_s: float = 15.0,
        sync_limit: int = 200,
        tail: int = 0,
        keep_messages: bool = False,
    ) -> None:
        """``tail`` > 0: a conversation this device is more than ``tail`` entries behind in
        syncs only its newest ``tail`` entries (page older ones with ``history``); 0 syncs
        every entry. ``keep_messages`` keeps the entries received in ``state.messages``."""
        self.url = url
        self._token = token
        self.codec = codec
        self.ssl_context = ssl_context
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.gap_grace_s = gap_grace_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.request_timeout_s = request_timeout_s
        self.sync_limit = sync_limit
        self.tail = tail
        self.state = LocalState(keep_messages=keep_messages)
        self.user = ""
        self.device = ""
        self.limits: Limits | None = None
        self.since = "0"
        self.cv = 0  # the user change-log version applied (read positions, settings, ...)
        self.held: dict[str, int] = {}
        # Live rooms joined: the server forgets them with the connection, so they are
        # joined again after every reconnect (until ``leave_room``).
        self.rooms: set[str] = set()
        self.connects = 0
        self.sync_answers = 0  # `synced` answers received (sync round trips)
        self._have_sizes: dict[str, int] = {}
        self.ready = asyncio.Event()
        self._buffer: dict[str, dict[int, tuple[Message, bool]]] = {}
        self._outbox: dict[str, _PendingSend] = {}
        self._send_rids: dict[int, _PendingSend] = {}
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._rid = itertools.count(1)
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._conn: ClientConn | None = None
        self._outq: asyncio.Queue[bytes] | None = None
        self._ack_dirty: set[str] = set()
        self._ack_scheduled = False
        self._sync_task: asyncio.Task[None] | None = None
        self._want_sync = False
        self._run_task: asyncio.Task[None] | None = None
        self._closing = False
        self._pausing = False
        self._lifecycle = asyncio.Lock()  # connect() and disconnect() one at a time
        self._final: Disconnected | None = None
        self._last_rx = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, wait: bool = True) -> None:
        """Start the connection loop; with ``wait``, return once authenticated."""
        async with self._lifecycle:  # after a disconnect() in progress has finished
            if self._run_task is None:
                self._run_task = asyncio.ensure_future(self._run())
        if wait:
            await self.wait_ready()

    async def wait_ready(self, timeout: float | None = None) -> None:
        ready = asyncio.ensure_future(self.ready.wait())
        done = asyncio.ensure_future(asyncio.shield(self._run_task)) if self._run_task else None
        waits = [ready] + ([done] if done else [])
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        if not self.ready.is_set():
            if self._final is not None:
                raise ConnectionError(
                    f"connection refused: {self._final.reason or self._final.code}"
                )
            raise TimeoutError("not connected")

    async def disconnect(self) -> None:
        """Go offline but keep everything this device holds (sync point, held seqs,
        ``state``, unsent messages); ``connect()`` comes back and syncs the difference."""
        async with self._lifecycle:
            task, self._run_task = self._run_task, None
            if task is None:
                return
            self._pausing = True
            try:
                conn = self._conn
                if conn is not None:
                    await conn.close(close.NORMAL)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            finally:
                self._pausing = False
                self.ready.clear()

    async def close(self) -> None:
        self._closing = True
        conn = self._conn
        if conn is not None:
            await conn.close(close.NORMAL)
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run_task
        self._fail_outbox(ConnectionError("client closed"))
        self._events.put_nowait(_END)

    def _fail_outbox(self, exc: Exception) -> None:
        for p in self._outbox.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self._outbox.clear()
        self._send_rids.clear()

    def abort_connection(self) -> None:
        """Drop the current connection abruptly (the client reconnects by itself)."""
        if self._conn is not None:
            self._conn.abort()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            ev = await self._events.get()
            if ev is _END:
                return
            yield ev

    # ------------------------------------------------------------------ public requests

    async def send(
        self,
        to: str | None = None,
        text: str | None = None,
        *,
        conv: str | None = None,
        body: dict[str, Any] | None = None,
        type: str = "text",
        cid: str | None = None,
        flags: int = 0,
        mentions: list[str] | None = None,
        reply_to: str | None = None,
    ) -> Sent:
        """Send and wait until the server has stored it. Survives reconnects: the same
        client id is resent until acked. Raises RequestError when refused for good."""
        if self._final is not None:
            raise ConnectionError(f"connection closed for good ({self._final.code})")
        if body is None:
            body = {"text": text or ""}
        cid = cid or uuid.uuid4().hex
        existing = self._outbox.get(cid)
        if existing is not None:
            return await asyncio.shield(existing.future)
        fut: asyncio.Future[Sent] = asyncio.get_running_loop().create_future()
        p = _PendingSend(cid, to, conv, type, body, flags, fut, mentions or [], reply_to)
        self._outbox[cid] = p
        self._pump()
        return await asyncio.shield(fut)

    async def recall(self, conv: str, seq: int) -> Sent:
        """Recall this user's message ``seq`` (within the server's recall window). Every
        device gets a `recall` entry; the message then shows as recalled."""
        return await self.send(conv=conv, type="recall", body={"seq": seq})

    async def edit(
        self, conv: str, seq: int, text: str | None = None, body: dict[str, Any] | None = None
    ) -> Sent:
        """Replace the content of this user's message ``seq``; every device gets an `edit`
        entry and history shows the new content with its edit version."""
        new = body if body is not None else {"text": text or ""}
        return await self.send(conv=conv, type="edit", body={"seq": seq, "body": new})

    @property
    def unacked_sends(self) -> int:
        return len(self._outbox)

    async def history(self, conv: str, before: int = 0, limit: int = 50) -> Page:
        """A page of entries before ``before`` (0: the newest); they go into ``state``."""
        res = await self._request(lambda rid: History(rid, conv, before, limit))
        assert isinstance(res, Page)
        for m in res.msgs:
            self.state.apply_message(m)
        return res

    async def mark_read(self, conv: str, seq: int) -> ReadEvent:
        """Mark ``conv`` read up to ``seq``; the answer has the position and unread left.
        The user's other devices and the other member are told."""
        res = await self._request(lambda rid: Read(rid, conv, seq))
        assert isinstance(res, ReadEvent)
        self.state.apply_read(res.conv, res.by, res.seq, res.n)
        return res

    async def settings(
        self,
        conv: str,
        *,
        muted: bool | None = None,
        pinned: bool | None = None,
        hidden: bool | None = None,
        draft: str | None = None,
    ) -> SettingsEvent:
        """Change this user's settings of ``conv`` (None: unchanged); returns them all.
        The user's other devices get a SettingsChanged event."""
        res = await self._request(
            lambda rid: SettingsFrame(rid, conv, muted, pinned, hidden, draft)
        )
        assert isinstance(res, SettingsEvent)
        self.state.apply_settings(
            res.conv, res.muted, res.pinned, res.hidden, res.draft, res.v, res.hidden_at
        )
        return res

    async def delete_for_me(self, conv: str, seqs: list[int]) -> list[int]:
        """Delete entries for this user's devices only (the other member keeps them);
        history and sync then show them as empty `deleted` entries. Returns the seqs
        newly deleted (recall and edit entries go with the entry they changed)."""
        res = await self._request(lambda rid: Delete(rid, conv, seqs))
        assert isinstance(res, Deleted)
        self.state.apply_deleted(res.conv, res.seqs)
        return res.seqs

    async def presence(self, users: list[str]) -> list[PresenceItem]:
        """Online state and last seen of up to 100 users this user has 1:1 chats with
        (others are left out of the answer)."""
        res = await self._request(lambda rid: PresenceQuery(rid, users))
        assert isinstance(res, PresenceEvent)
        return res.users

    async def show_presence(self, visible: bool) -> None:
        """The privacy switch: hidden users appear offline, with no last seen."""
        await self._request(lambda rid: Privacy(rid, visible))

    async def conversations(self, limit: int = 50) -> tuple[list[ConvItem], int]:
        """The conversation list (newest activity first) and the badge (total unread)."""
        res = await self._request(lambda rid: Convs(rid, limit))
        assert isinstance(res, ConvList)
        return res.convs, res.badge

    def typing(self, conv: str) -> None:
        """Tell the other member(s) of ``conv`` that this user is typing. Fire and forget;
        the server relays at most one per conversation per `typing_interval_ms`."""
        if self.ready.is_set():
            self._write(Typing(conv))

    async def block(self, user: str, on: bool = True) -> None:
        """Block ``user`` (their messages to me fail with `blocked`), or unblock."""
        await self._request(lambda rid: Block(rid, user, on))

    async def blocked(self) -> list[str]:
        res = await self._request(lambda rid: Blocks(rid))
        assert isinstance(res, BlockList)
        return res.users

    # ------------------------------------------------------------------ groups

    async def group(self, op: str, conv: str | None = None, **fields: Any) -> GroupDone:
        """Run a group operation (see docs/protocol.md, `group`); the answer has the
        entry that records it (``seq`` 0: nothing changed) and the group now. A client id
        is chosen once, so a retry after a throttling answer cannot apply it twice."""
        fields.setdefault("cid", uuid.uuid4().hex)
        res = await self._request(lambda rid: Group(rid, op, conv, **fields))
        assert isinstance(res, GroupDone)
        return res

    async def create_group(
        self, users: list[str], name: str | None = None, *, conv: str | None = None, **kw: Any
    ) -> GroupDone:
        """A new group with this user as owner; ``conv`` picks its id (else a new one)."""
        return await self.group("create", conv, users=users, name=name, **kw)

    async def add_members(self, conv: str, users: list[str]) -> GroupDone:
        return await self.group("add", conv, users=users)

    async def remove_members(self, conv: str, users: list[str]) -> GroupDone:
        return await self.group("remove", conv, users=users)

    async def leave_group(self, conv: str) -> GroupDone:
        return await self.group("leave", conv)

    async def set_role(self, conv: str, users: list[str], role: str) -> GroupDone:
        """Make ``users`` "admin" or "member" (owner only)."""
        return await self.group("role", conv, users=users, role=role)

    async def mute_members(self, conv: str, users: list[str], duration_ms: int) -> GroupDone:
        """Mute for ``duration_ms`` (0: lift the mute)."""
        return await self.group("mute", conv, users=users, duration_ms=duration_ms)

    async def group_info(self, conv: str) -> GroupDone:
        return await self.group("info", conv)

    async def members(self, conv: str, cursor: str = "", limit: int = 100) -> MemberList:
        """A page of the member list; pass the answer's ``next`` for the next page."""
        res = await self._request(lambda rid: Members(rid, conv, cursor, limit))
        assert isinstance(res, MemberList)
        return res

    async def receipts(self, conv: str, seqs: list[int]) -> list[ReceiptItem]:
        """ "Read by N" for entries of ``conv`` (and who, in small groups)."""
        res = await self._request(lambda rid: Receipts(rid, conv, seqs))
        assert isinstance(res, ReceiptList)
        return res.receipts

    # ------------------------------------------------------------------ live rooms

    async def join_room(self, room: str) -> Joined:
        """Enter live room ``room`` (``r:…``): its posts come as RoomEvents, the first
        one (``recent``) right away. The room is remembered and joined again after every
        reconnect (the server's rooms live in memory: a dropped connection leaves them),
        so what was posted while the connection was down is missed."""
        res = await self._request(lambda rid: Join(rid, room))
        assert isinstance(res, Joined)
        self.rooms.add(res.room)
        return res

    async def leave_room(self, room: str) -> None:
        """Leave ``room``; it is not joined again on reconnect. While disconnected there
        is nothing to tell the server (the connection's end left the room)."""
        self.rooms.discard(room)
        if self.ready.is_set():
            await self._request(lambda rid: Leave(rid, room))

    async def room_send(
        self,
        room: str,
        kind: str = "chat",
        body: dict[str, Any] | None = None,
        text: str | None = None,
    ) -> None:
        """Post to a room this client is in (``kind`` chat, gift or like) and wait for the
        server's `ok`. Nothing is stored or resent: a refusal raises RequestError at once,
        `rate_limited` included (with ``retry_after_ms``), since a live post sent late is
        seldom worth sending; `forbidden` when the room was not joined."""
        if body is None:
            body = {} if text is None else {"text": text}
        res = await self._request(lambda rid: RoomSend(room, kind, body, rid), retries=0)
        assert isinstance(res, Ok)

    async def _rejoin_rooms(self) -> None:
        """Join again, after a reconnect, the rooms this client was in. A room the server
        now refuses is forgotten (logged); a lost connection leaves the rest for the next
        reconnect."""
        for room in sorted(self.rooms):
            try:
                await self._request(partial(Join, room=room))
            except RequestError as exc:
                log.warning("could not join room %s again: %s", room, exc)
                self.rooms.discard(room)
            except (ConnectionError, TimeoutError):
                return

    async def ping(self) -> Pong:
        res = await self._request(lambda rid: Ping(rid))
        assert isinstance(res, Pong)
        return res

    def request_sync(self) -> None:
        self._want_sync = True
        if self.ready.is_set() and (self._sync_task is None or self._sync_task.done()):
            self._sync_task = asyncio.ensure_future(self._sync_loop())

    async def sync_now(self) -> None:
        self.request_sync()
        if self._sync_task is not None:
            await self._sync_task

    async def reset(self) -> None:
        """Forget everything this device holds (a cleared cache) and, when connected,
        sync from scratch."""
        task = self._sync_task
        if task is not None and not task.done():
            # An answer already on its way was asked for with what is being forgotten.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._want_sync = False
        self.since, self.cv = "0", 0
        self.held.clear()
        self._buffer.clear()
        self.state.clear()
        if self.ready.is_set():
            await self.sync_now()

    # ------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                conn = await connect(self.url, self.codec, self.ssl_context)
            except (OSError, aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                log.debug("connect failed: %s", exc)
                await self._backoff(attempt)
                attempt += 1
                continue
            self._conn = conn
            try:
                authenticated = await self._session(conn)
            except Exception:
                log.exception("client session failed")
                authenticated = False
                conn.abort()
            finally:
                self._conn = None
                self.ready.clear()
                self._fail_requests()
            if self._pausing:
                return
            code = conn.close_code
            log.debug("connection ended: %s %s", code, conn.close_reason)
            final = code in FINAL_CODES or self._closing
            ev = Disconnected(code, conn.close_reason, final)
            if final:
                self._final = ev
                self._fail_outbox(ConnectionError(f"connection closed for good ({code})"))
            self._events.put_nowait(ev)
            if final:
                return
            attempt = 0 if authenticated else attempt + 1
            await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> None:
        delay = min(self.backoff_max_s, self.backoff_min_s * (2 ** min(attempt, 16)))
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _session(self, conn: ClientConn) -> bool:
        first = await asyncio.wait_for(conn.recv(), self.request_timeout_s)
        if first is None:
            return False
        hello = conn.codec.decode_server(first)
        if not isinstance(hello, ServerHello):
            raise ConnectionError("server did not open with hello")
        self.limits = hello.limits
        token = self._token if isinstance(self._token, str) else await self._token()
        outq: asyncio.Queue[bytes] = asyncio.Queue()
        self._outq = outq
        writer = asyncio.ensure_future(self._writer(conn, outq))
        reader = asyncio.ensure_future(self._reader(conn))
        beat = asyncio.ensure_future(self._heartbeat(conn, hello.heartbeat_ms / 1000))
        authenticated = False
        rejoin: asyncio.Task[None] | None = None
        try:
            ready = await self._request(
                lambda rid: Hello(PROTOCOL_VERSION, token, rid, client="tidings-python"),
                retries=0,  # a refused hello is followed by a close: reconnect instead
            )
            assert isinstance(ready, Ready)
            authenticated = True
            self.user, self.device = ready.user, ready.device
            self.state.user = ready.user
            self.connects += 1
            self.ready.set()
            self._events.put_nowait(Connected(ready.user, ready.device, ready.session))
            for p in self._outbox.values():
                p.rid = 0
            self._pump()
            self.request_sync()
            if self.rooms:
                rejoin = asyncio.ensure_future(self._rejoin_rooms())
        except (RequestError, ConnectionError, TimeoutError) as exc:
            log.debug("hello failed: %s", exc)
        try:
            # The reader ends when the peer closes; the heartbeat ends when the link is dead
            # (half-open: nothing arrives any more), and then the reader is abandoned.
            await asyncio.wait({reader, beat}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                reader.cancel()
                await conn.dispose()
        finally:
            for t in (writer, beat, self._sync_task, rejoin):
                if t is not None and not t.done():
                    t.cancel()
            self._outq = None
            self._send_rids.clear()
        return authenticated

    async def _writer(self, conn: ClientConn, q: asyncio.Queue[bytes]) -> None:
        try:
            while True:
                await conn.send(await q.get())
        except (ConnectionError, OSError, RuntimeError):
            conn.abort()

    async def _reader(self, conn: ClientConn) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await conn.recv()
            if data is None:
                self._fail_requests()  # nothing pending can be answered on this connection
                return
            self._last_rx = loop.time()
            try:
                frame = conn.codec.decode_server(data)
            except msgspec.MsgspecError:
                log.warning("undecodable frame from server")
                continue
            self._dispatch(frame)

    async def _heartbeat(self, conn: ClientConn, server_hb: float) -> None:
        interval = self.heartbeat_s or server_hb
        dead_after = self.dead_after_s or interval * 2 + 1
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        while True:
            await asyncio.sleep(interval)
            if loop.time() - self._last_rx > dead_after:
                log.debug("no traffic for %.1fs: dropping connection", dead_after)
                self._fail_requests()
                return
            if self.ready.is_set():
                self._write(Ping(next(self._rid)))

    def _write(self, frame: Any) -> None:
        if self._outq is not None and self._conn is not None:
            self._outq.put_nowait(self._conn.codec.encode(frame))

    # ------------------------------------------------------------------ inbound

    def _dispatch(self, frame: Any) -> None:
        kind = type(frame)
        if kind is Push:
            self._on_message(frame.m, echo=False)
        elif kind is Sent:
            self._on_sent(frame)
        elif kind is Error:
            self._on_error(frame)
        elif kind is Pong:
            if int(frame.wm) > int(self.since) or frame.cv > self.cv:
                self.request_sync()
            self._resolve(frame.id, frame)
        elif kind is Resync:  # the server may have lost pushes to us: catch up
            self.request_sync()
        elif kind in (
            Ready,
            Synced,
            Page,
            Ok,
            BlockList,
            GroupDone,
            MemberList,
            ReceiptList,
            Joined,
        ):
            self._resolve(frame.id, frame)
        elif kind is RoomFrame:
            f = frame
            self._events.put_nowait(
                RoomEvent(f.room, f.msgs, f.likes, f.dropped, f.online, f.recent, f.ts)
            )
        elif kind is TypingEvent:
            self._events.put_nowait(TypingNotice(frame.conv, frame.sender))
        elif kind is ReadEvent:
            if frame.id:
                self._resolve(frame.id, frame)
            else:
                self.state.apply_read(frame.conv, frame.by, frame.seq, frame.n)
                self._events.put_nowait(ReadReceipt(frame.conv, frame.by, frame.seq, frame.unread))
        elif kind is DeliveredEvent:
            self.state.apply_delivered(frame.conv, frame.by, frame.seq)
            self._events.put_nowait(Delivered(frame.conv, frame.by, frame.seq))
        elif kind is ConvList:
            self._resolve(frame.id, frame)
        elif kind is PresenceEvent:
            if frame.id:
                self._resolve(frame.id, frame)
            else:
                self._events.put_nowait(PresenceChanged(frame.users))
        elif kind is Deleted:
            if frame.id:
                self._resolve(frame.id, frame)
            else:
                self.state.apply_deleted(frame.conv, frame.seqs)
                self._events.put_nowait(DeletedForMe(frame.conv, frame.seqs))
        elif kind is SettingsEvent:
            if frame.id:
                self._resolve(frame.id, frame)
            else:
                f = frame
                self.state.apply_settings(
                    f.conv, f.muted, f.pinned, f.hidden, f.draft, f.v, f.hidden_at
                )
                self._events.put_nowait(
                    SettingsChanged(
                        frame.conv, frame.muted, frame.pinned, frame.hidden, frame.draft
                    )
                )

    def _resolve(self, rid: int, value: Any) -> None:
        fut = self._requests.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _on_error(self, err: Error) -> None:
        p = self._send_rids.pop(err.id, None)
        if p is not None:
            log.debug("send %s refused: %s %s", p.cid, err.code, err.message)
            p.rid = 0
            if err.retryable:
                delay = (err.retry_after_ms or 100) / 1000
                asyncio.get_running_loop().call_later(delay, self._pump)
            else:
                self._outbox.pop(p.cid, None)
                if not p.future.done():
                    p.future.set_exception(RequestError(err))
                self._pump()
            return
        fut = self._requests.pop(err.id, None)
        if fut is not None and not fut.done():
            fut.set_exception(RequestError(err))
        elif err.id == 0:
            log.debug("server error: %s %s", err.code, err.message)

    def _on_sent(self, s: Sent) -> None:
        p = self._send_rids.pop(s.id, None)
        if p is None:
            return
        self._outbox.pop(p.cid, None)
        msg = Message(
            conv=s.conv,
            seq=s.seq,
            mid=s.mid,
            sender=self.user,
            dev=self.device,
            cid=s.cid,
            type=p.type,
            body=p.body,
            ts=s.ts,
            flags=p.flags,
            mentions=p.mentions,
            reply_to=p.reply_to,
            # A retried send answered `dup` reports the entry's edit version now, but
            # this copy has the original body: only an edit entry carries its version.
            edit_version=s.edit_version if p.type == "edit" else 0,
            n=s.n,
        )
        self._on_message(msg, echo=True)
        if not p.future.done():
            p.future.set_result(s)
        self._pump()

    def _on_message(self, m: Message, echo: bool, live: bool = True) -> None:
        """An entry from a push or an own send (``live``), or from a sync answer (where
        ``left`` says which groups the user is out of)."""
        conv = m.conv
        held = self.held.get(conv, 0)
        if m.seq <= held:
            if not echo:
                self._mark_ack(conv)
            return
        if m.seq != held + 1:
            buf = self._buffer.setdefault(conv, {})
            buf[m.seq] = (m, echo)
            if len(buf) > 1000:
                self.request_sync()
            else:
                asyncio.get_running_loop().call_later(self.gap_grace_s, self._check_gap, conv)
            return
        self.state.apply_message(m)
        self._events.put_nowait(MessageEvent(m, echo))
        held = m.seq
        buf2 = self._buffer.get(conv)
        if buf2:
            while held + 1 in buf2:
                nm, necho = buf2.pop(held + 1)
                self.state.apply_message(nm)
                self._events.put_nowait(MessageEvent(nm, necho))
                held += 1
            for stale in [s for s in buf2 if s <= held]:
                del buf2[stale]
            if not buf2:
                del self._buffer[conv]
        view = self.state.convs.get(conv)
        last = None if view is None else view.last
        if live and last is not None and ends_membership(last, self.user):
            self._write(Ack(conv, held))  # removed, or left on another device
            self._forget(conv)
            return
        self.held[conv] = held
        self._mark_ack(conv)

    def _forget(self, conv: str) -> None:
        """Drop a group this user is no longer a member of."""
        self.state.drop(conv)
        self.held.pop(conv, None)
        self._buffer.pop(conv, None)
        self._events.put_nowait(LeftGroup(conv))

    def _skipped(self, conv: str, base: int) -> None:
        buf = self._buffer.get(conv)
        if buf:
            for seq in [s for s in buf if s <= base]:
                del buf[seq]
            if not buf:
                del self._buffer[conv]

    def _check_gap(self, conv: str) -> None:
        buf = self._buffer.get(conv)
        if buf and min(buf) > self.held.get(conv, 0) + 1:
            self.request_sync()

    def _mark_ack(self, conv: str) -> None:
        self._ack_dirty.add(conv)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        if self.ready.is_set():
            for conv in self._ack_dirty:
                self._write(Ack(conv, self.held.get(conv, 0)))
        self._ack_dirty.clear()

    # ------------------------------------------------------------------ outbound

    def _pump(self) -> None:
        """Transmit outbox entries not yet on the wire, within the in-flight limit."""
        if not self.ready.is_set():
            return
        limit = self.limits.max_inflight if self.limits else 64
        for p in list(self._outbox.values()):
            if len(self._send_rids) >= limit:
                return
            if p.rid:
                continue
            if self._outq is None or self._conn is None:
                return
            rid = next(self._rid)
            data = self._conn.codec.encode(
                Send(rid, p.cid, p.body, p.to, p.conv, p.type, p.flags, p.mentions, p.reply_to)
            )
            if len(data) > (self.limits.max_frame_bytes if self.limits else 65_536):
                # The server would close the connection (1009) and the outbox would send
                # it again after every reconnect: refuse it here, for good.
                self._outbox.pop(p.cid, None)
                if not p.future.done():
                    p.future.set_exception(
                        RequestError(Error("too_large", "message too large", False))
                    )
                continue
            p.rid = rid
            self._send_rids[rid] = p
            self._outq.put_nowait(data)

    async def _request(self, make: Callable[[int], Any], retries: int = 5) -> Any:
        """One request/answer; throttling answers (retryable) are retried after the hint."""
        for attempt in range(retries + 1):
            if self._conn is None:
                raise ConnectionError("not connected")
            rid = next(self._rid)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._requests[rid] = fut
            self._write(make(rid))
            try:
                return await asyncio.wait_for(fut, self.request_timeout_s)
            except RequestError as exc:
                if not exc.retryable or attempt == retries:
                    raise
                await asyncio.sleep((exc.retry_after_ms or 100) / 1000)
            finally:
                self._requests.pop(rid, None)
        raise AssertionError("unreachable")

    def _fail_requests(self) -> None:
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        self._requests.clear()

    def _sync_frame(self, since: str, have: dict[str, int], limit: int, rid: int) -> Sync:
        return Sync(rid, since, have, limit, self.cv, self.tail)

    def _have_room(self) -> int:
        """Bytes a sync frame may spend on ``have``."""
        return (self.limits.max_frame_bytes if self.limits else 65_536) - 1024

    def _have_size(self, conv: str, seq: int) -> int:
        """An upper bound of one ``have`` entry's encoded size in either codec: the id as a
        JSON string (escapes included), a colon, up to 19 digits and a comma."""
        size = self._have_sizes.get(conv)
        if size is None:
            if len(self._have_sizes) > 100_000:
                self._have_sizes.clear()
            size = self._have_sizes[conv] = len(msgspec.json.encode(conv)) + 21
        return size

    def _have_fits(self, have: dict[str, int]) -> bool:
        room = self._have_room()
        return sum(self._have_size(c, s) for c, s in have.items()) < room

    def _have_for(self, listed: list[str]) -> dict[str, int]:
        """``have`` for the listed conversations (in the server's order) that fit a frame;
        those left out are simply sent again from the start (the extra is ignored)."""
        room, out = self._have_room(), {}
        for conv in listed:
            seq = self.held.get(conv)
            if seq is None:
                continue
            room -= self._have_size(conv, seq)
            if room < 0:
                break
            out[conv] = seq
        return out

    async def _sync_loop(self) -> None:
        try:
            while self._want_sync:
                self._want_sync = False
                listed: list[str] | None = None
                while True:
                    since, have, limit = self.since, dict(self.held), self.sync_limit
                    if listed is not None:
                        have = self._have_for(listed)
                    elif not self._have_fits(have):
                        # Too many conversations to state in one frame: ask first which
                        # ones changed (limit 0: a list, no entries), then state only those.
                        have, limit = {}, 0
                    res = await self._request(partial(self._sync_frame, since, have, limit))
                    assert isinstance(res, Synced)
                    self.sync_answers += 1
                    if limit == 0:
                        listed = [c.conv for c in res.convs]
                        if not listed:
                            break
                        continue
                    listed = None
                    for conv in res.left:
                        self._forget(conv)
                    for c in res.convs:
                        if c.base > self.held.get(c.conv, 0):
                            # Older entries were skipped (tail): start holding from here.
                            self.held[c.conv] = c.base
                            self._skipped(c.conv, c.base)
                    for m in sorted(res.msgs, key=lambda m: (m.conv, m.seq)):
                        echo = m.sender == self.user and m.dev == self.device
                        self._on_message(m, echo, live=False)
                    for item in res.states:
                        self.state.apply_state(item, res.cv)
                    if res.states:
                        self._events.put_nowait(StatesSynced(res.states))
                    cv_moved = res.cv > self.cv
                    self.cv = max(self.cv, res.cv)
                    # wm covers what this answer completed (all of it when complete).
                    advanced = int(res.wm) > int(since) or cv_moved
                    if int(res.wm) > int(since):
                        self.since = res.wm
                    if res.complete or (not res.msgs and not advanced):
                        break
        except (ConnectionError, TimeoutError, RequestError) as exc:
            log.debug("sync interrupted: %s", exc)
