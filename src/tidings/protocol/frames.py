"""Frame types of protocol v1, one msgspec Struct per frame.

Every frame is an object whose ``t`` field names its type. Client frames that expect an
answer carry a request ``id`` (an integer the client chooses); the answer echoes it.
64-bit ids (message ids, watermarks) travel as decimal strings in both codecs.
"""

from __future__ import annotations

from typing import Any

import msgspec

# --------------------------------------------------------------------------- shared


class Limits(msgspec.Struct, frozen=True, omit_defaults=False):
    max_frame_bytes: int
    max_body_bytes: int
    max_text_bytes: int
    rate_per_s: float
    rate_burst: int
    max_inflight: int
    history_page_max: int
    sync_page_max: int
    max_unacked: int
    max_requests_inflight: int  # hello, ping, sync and history answered concurrently
    max_mentions: int


class Message(msgspec.Struct, frozen=True, omit_defaults=True):
    """One entry of a conversation's sequence, as devices see it."""

    conv: str
    seq: int
    mid: str
    sender: str = msgspec.field(name="from")
    dev: str
    cid: str
    type: str
    body: dict[str, Any]
    ts: int
    flags: int = 0
    mentions: list[str] = []
    reply_to: str | None = None
    edit_version: int = 0  # how many times the sender edited it
    recalled: bool = False  # the sender recalled it; body is empty
    deleted: bool = False  # this user deleted it for themself; body is empty
    n: int = 0  # counted entries (toward unread) of the conversation up to this one


class ConvState(msgspec.Struct, frozen=True, omit_defaults=True):
    conv: str
    last_seq: int
    peer: str | None = None
    base: int = 0  # entries up to here are skipped (``tail``): page them with ``history``


# --------------------------------------------------------------------- client -> server


class Hello(msgspec.Struct, frozen=True, tag="hello", tag_field="t"):
    """First frame of a client: protocol version and the device token (authentication)."""

    v: int
    token: str
    id: int = 0
    caps: list[str] = []
    client: str = ""


class Send(msgspec.Struct, frozen=True, tag="send", tag_field="t"):
    id: int
    cid: str
    body: dict[str, Any]
    to: str | None = None
    conv: str | None = None
    type: str = "text"
    flags: int = 0
    mentions: list[str] = []
    reply_to: str | None = None


class Ack(msgspec.Struct, frozen=True, tag="ack", tag_field="t"):
    """Cumulative: the device holds every entry of ``conv`` up to ``seq``."""

    conv: str
    seq: int


class Ping(msgspec.Struct, frozen=True, tag="ping", tag_field="t"):
    id: int = 0


class Sync(msgspec.Struct, frozen=True, tag="sync", tag_field="t"):
    """The device's sync point (``since``) and, per conversation, the seq it holds."""

    id: int
    since: str = "0"
    have: dict[str, int] = {}
    limit: int = 200
    cv: int = 0  # the user change-log version the device has applied
    tail: int = 0  # > 0: at most this many newest entries of a conversation far behind


class History(msgspec.Struct, frozen=True, tag="history", tag_field="t"):
    """Page backwards: entries with seq < ``before`` (0 = from the newest)."""

    id: int
    conv: str
    before: int = 0
    limit: int = 50


class Close(msgspec.Struct, frozen=True, tag="close", tag_field="t"):
    """Raw TCP only: the sender is closing the connection with a close code."""

    code: int
    reason: str = ""


class Typing(msgspec.Struct, frozen=True, tag="typing", tag_field="t"):
    """The user is typing in ``conv``: relayed to the other members' online devices."""

    conv: str


class Block(msgspec.Struct, frozen=True, tag="block", tag_field="t"):
    """Block (or, with ``on`` false, unblock) ``user``: their sends to me are refused."""

    id: int
    user: str
    on: bool = True


class Read(msgspec.Struct, frozen=True, tag="read", tag_field="t"):
    """Mark ``conv`` read up to ``seq`` (cumulative, never backwards)."""

    id: int
    conv: str
    seq: int


class Convs(msgspec.Struct, frozen=True, tag="convs", tag_field="t"):
    """Ask for the conversation list, newest activity first."""

    id: int
    limit: int = 50


class Settings(msgspec.Struct, frozen=True, tag="settings", tag_field="t"):
    """Change this user's settings for ``conv``; absent fields stay as they are."""

    id: int
    conv: str
    muted: bool | None = None
    pinned: bool | None = None
    hidden: bool | None = None
    draft: str | None = None


class Delete(msgspec.Struct, frozen=True, tag="delete", tag_field="t"):
    """Delete entries of ``conv`` for this user's devices only."""

    id: int
    conv: str
    seqs: list[int]


class PresenceQuery(msgspec.Struct, frozen=True, tag="presence", tag_field="t"):
    """Ask for the presence of up to 100 users (only 1:1 contacts are answered)."""

    id: int
    users: list[str]


class Privacy(msgspec.Struct, frozen=True, tag="privacy", tag_field="t"):
    """Show (``presence`` true) or hide this user's online state and last seen."""

    id: int
    presence: bool


class Blocks(msgspec.Struct, frozen=True, tag="blocks", tag_field="t"):
    """Ask for the list of users I block."""

    id: int


class Group(msgspec.Struct, frozen=True, tag="group", tag_field="t"):
    """A group operation (``op``): create, add, remove, leave, role, transfer, mute,
    mute_all, profile, or info (read only). Fields an op does not use are ignored; absent
    profile fields stay as they are. ``cid`` makes a retry answer the first result."""

    id: int
    op: str
    conv: str | None = None  # the group (create: an id to use, else a new one)
    users: list[str] = []
    role: str | None = None  # role: "admin" or "member"
    duration_ms: int | None = None  # mute: how long (0: unmute)
    on: bool | None = None  # mute_all
    name: str | None = None
    avatar: str | None = None
    intro: str | None = None
    announcement: str | None = None
    members_can_invite: bool | None = None
    history_visible: bool | None = None  # new members see entries from before they joined
    cid: str | None = None


class Members(msgspec.Struct, frozen=True, tag="members", tag_field="t"):
    """A page of a group's members; ``cursor`` is the ``next`` of the previous page."""

    id: int
    conv: str
    cursor: str = ""
    limit: int = 100


class Join(msgspec.Struct, frozen=True, tag="join", tag_field="t"):
    """Enter a live room (``r:…``): its posts come in `room` frames while in it."""

    id: int
    room: str


class Leave(msgspec.Struct, frozen=True, tag="leave", tag_field="t"):
    id: int
    room: str


class RoomSend(msgspec.Struct, frozen=True, tag="rsend", tag_field="t"):
    """Post to a room: ``kind`` chat (sampled when the room is busy), gift (never
    dropped) or like (counted). With ``id`` the server answers `ok` or an error; without,
    only errors (id 0)."""

    room: str
    kind: str = "chat"
    body: dict[str, Any] = {}
    id: int = 0


class Receipts(msgspec.Struct, frozen=True, tag="receipts", tag_field="t"):
    """How many members have read each entry ("read by N"), and who in small groups."""

    id: int
    conv: str
    seqs: list[int]


ClientFrame = (
    Hello
    | Send
    | Ack
    | Ping
    | Sync
    | History
    | Close
    | Typing
    | Block
    | Blocks
    | Read
    | Convs
    | Settings
    | Delete
    | PresenceQuery
    | Privacy
    | Group
    | Members
    | Receipts
    | Join
    | Leave
    | RoomSend
)
CLIENT_TYPES = frozenset(
    {
        "hello",
        "send",
        "ack",
        "ping",
        "sync",
        "history",
        "close",
        "typing",
        "block",
        "blocks",
        "read",
        "convs",
        "settings",
        "delete",
        "presence",
        "privacy",
        "group",
        "members",
        "receipts",
        "join",
        "leave",
        "rsend",
    }
)

# --------------------------------------------------------------------- server -> client


class ServerHello(msgspec.Struct, frozen=True, tag="hello", tag_field="t"):
    v: int
    server: str
    caps: list[str]
    limits: Limits
    heartbeat_ms: int
    idle_timeout_ms: int
    auth_timeout_ms: int


class Ready(msgspec.Struct, frozen=True, tag="ready", tag_field="t"):
    """Answer to a successful client hello."""

    id: int
    user: str
    device: str
    wm: str
    session: str


class Sent(msgspec.Struct, frozen=True, tag="sent", tag_field="t"):
    """Answer to ``send``: the message is durable. ``dup`` marks a retried client id."""

    id: int
    cid: str
    conv: str
    seq: int
    mid: str
    ts: int
    dup: bool = False
    n: int = 0  # counted entries of the conversation up to this one (see Message.n)
    edit_version: int = 0  # an edit: the edit version of the changed entry it produced


class Push(msgspec.Struct, frozen=True, tag="push", tag_field="t"):
    m: Message


class Pong(msgspec.Struct, frozen=True, tag="pong", tag_field="t"):
    id: int
    wm: str
    ts: int
    cv: int = 0  # the user's newest change-log version: sync if above the device's


class Synced(msgspec.Struct, frozen=True, tag="synced", tag_field="t"):
    id: int
    convs: list[ConvState]
    msgs: list[Message]
    complete: bool
    wm: str
    states: list[ConvItem] = []  # state of conversations changed since cv or completed now
    cv: int = 0  # the change-log version to send next time
    # Groups whose membership of this user ended since cv: drop what the device holds of
    # them first; this answer's convs, msgs and states bring a new membership, if any.
    left: list[str] = []


class Page(msgspec.Struct, frozen=True, tag="page", tag_field="t"):
    id: int
    conv: str
    msgs: list[Message]
    more: bool


class Error(msgspec.Struct, frozen=True, tag="error", tag_field="t"):
    code: str
    message: str
    retryable: bool
    id: int = 0
    retry_after_ms: int | None = None


class Ok(msgspec.Struct, frozen=True, tag="ok", tag_field="t"):
    """Answer to a request that has nothing else to say."""

    id: int


class TypingEvent(msgspec.Struct, frozen=True, tag="typing", tag_field="t"):
    """Someone is typing: show it for a few seconds. Never stored, never retransmitted."""

    conv: str
    sender: str = msgspec.field(name="from")


class ReadEvent(msgspec.Struct, frozen=True, tag="read", tag_field="t", omit_defaults=True):
    """``by`` has read ``conv`` up to ``seq``. The answer to a ``read`` request (with its
    id), and an event (id 0) to the reader's other devices (with ``unread``, the reader's
    unread count there) and to the other member's devices (a read receipt, no ``unread``)."""

    conv: str
    by: str
    seq: int
    id: int = 0
    unread: int | None = None
    n: int | None = None  # with ``unread``: counted entries up to the read position


class DeliveredEvent(msgspec.Struct, frozen=True, tag="delivered", tag_field="t"):
    """A device of ``by`` holds ``conv`` up to ``seq`` (1:1 conversations): "delivered"
    for the other member's devices. Never stored as a frame, never retransmitted; the
    conversation list's ``peer_delivered_seq`` has the current position."""

    conv: str
    by: str
    seq: int


class ConvItem(msgspec.Struct, frozen=True, omit_defaults=True):
    conv: str
    last_seq: int
    last_ts: int
    unread: int
    read_seq: int
    peer_read_seq: int  # the other member's read position (1:1): "read up to N"
    peer: str | None = None
    last: Message | None = None
    muted: bool = False
    pinned: bool = False
    draft: str = ""
    hidden: bool = False  # only in sync states (the list leaves hidden conversations out)
    n: int = 0  # counted entries up to last_seq: unread = n - (counted up to read_seq)
    deleted: list[int] = []  # sync states: seqs this user deleted for themself since cv
    title: str = ""  # a group's name
    size: int = 0  # a group's member count
    # The other member's delivered position (1:1): a device of theirs holds entries up to
    # here; at least peer_read_seq (reading implies delivery).
    peer_delivered_seq: int = 0


class SettingsEvent(msgspec.Struct, frozen=True, tag="settings", tag_field="t"):
    """This user's settings for ``conv`` now: the answer to ``settings`` (with its id) and
    an event (id 0) to the user's other devices."""

    conv: str
    muted: bool
    pinned: bool
    hidden: bool
    draft: str
    id: int = 0
    v: int = 0  # the user's change-log version of this change (newer wins)
    hidden_at: int = 0  # while hidden: the seq it was hidden at (a newer entry shows it)


class ConvList(msgspec.Struct, frozen=True, tag="convs", tag_field="t"):
    id: int
    convs: list[ConvItem]
    badge: int  # total unread over all the user's conversations


class Deleted(msgspec.Struct, frozen=True, tag="deleted", tag_field="t"):
    """The answer to ``delete`` (with its id): the entries now deleted; and an event (id
    0) to the user's other devices: hide them."""

    conv: str
    seqs: list[int]
    id: int = 0


class PresenceItem(msgspec.Struct, frozen=True, omit_defaults=True):
    user: str
    online: bool
    last_seen: int = 0  # UTC ms when last online (0: unknown or hidden)


class PresenceEvent(msgspec.Struct, frozen=True, tag="presence", tag_field="t"):
    """Presence of contacts: a batch of changes (id 0) or the answer to a query."""

    users: list[PresenceItem]
    id: int = 0


class Kicked(msgspec.Struct, frozen=True, tag="kicked", tag_field="t"):
    """This session was replaced by a newer one under the server's login policy; the
    connection closes with 4004 next. Do not reconnect automatically."""

    device: str  # the device that took over
    platform: str
    reason: str


class BlockList(msgspec.Struct, frozen=True, tag="blocked", tag_field="t"):
    id: int
    users: list[str]


class GroupInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    conv: str
    owner: str
    name: str
    member_count: int
    max_members: int
    last_seq: int
    created_ms: int
    avatar: str = ""
    intro: str = ""
    announcement: str = ""
    muted_all: bool = False
    members_can_invite: bool = True
    history_visible: bool = False
    role: str | None = None  # the asking member's role
    muted_until: int = 0  # the asking member's mute (UTC ms)


class GroupDone(msgspec.Struct, frozen=True, tag="group", tag_field="t"):
    """Answer to ``group``: the entry that records the change (``seq`` 0: nothing changed)
    and the group as it is now."""

    id: int
    conv: str
    info: GroupInfo
    seq: int = 0
    mid: str = ""
    dup: bool = False


class MemberItem(msgspec.Struct, frozen=True, omit_defaults=True):
    user: str
    role: str
    joined_ms: int
    muted_until: int = 0


class MemberList(msgspec.Struct, frozen=True, tag="members", tag_field="t"):
    id: int
    conv: str
    members: list[MemberItem]
    next: str  # cursor of the next page ("" at the end)


class ReceiptItem(msgspec.Struct, frozen=True, omit_defaults=True):
    seq: int
    count: int  # members other than the sender who read up to here or further
    readers: list[str] | None = None  # who (groups up to the server's listing size)


class RoomMsg(msgspec.Struct, frozen=True):
    sender: str = msgspec.field(name="from")
    kind: str  # chat, gift, admin
    body: dict[str, Any]
    ts: int  # server time, UTC ms


class Joined(msgspec.Struct, frozen=True, tag="joined", tag_field="t"):
    """Answer to ``join``: the room's approximate online count. The ring of recent posts
    follows as a `room` frame."""

    id: int
    room: str
    online: int


class RoomFrame(msgspec.Struct, frozen=True, tag="room", tag_field="t", omit_defaults=True):
    """A room's tick: its posts (high lane first), likes counted, chat posts sampled away
    (``dropped``), and now and then the approximate online count. The same bytes go to
    every viewer."""

    room: str
    msgs: list[RoomMsg] = []
    likes: int = 0
    dropped: int = 0
    online: int = 0
    recent: bool = False  # the ring of recent posts, for a viewer that just joined
    ts: int = 0  # server time of the tick, UTC ms


class Resync(msgspec.Struct, frozen=True, tag="resync", tag_field="t"):
    """Pushes to this device may have been lost (the server's bus reconnected, or a
    node died, maybe between a commit and its publish): sync now, as after a reconnect.
    The server spreads these over a moment, so clients need not add jitter."""


class ReceiptList(msgspec.Struct, frozen=True, tag="receipts", tag_field="t"):
    id: int
    conv: str
    receipts: list[ReceiptItem]


ServerFrame = (
    ServerHello
    | Ready
    | Sent
    | Push
    | Pong
    | Synced
    | Page
    | Error
    | Close
    | Ok
    | TypingEvent
    | BlockList
    | ReadEvent
    | DeliveredEvent
    | ConvList
    | SettingsEvent
    | Kicked
    | Deleted
    | PresenceEvent
    | GroupDone
    | MemberList
    | ReceiptList
    | Joined
    | RoomFrame
    | Resync
)
