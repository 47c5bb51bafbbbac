"""Request and response bodies of the HTTP API; the OpenAPI document is generated from them."""

from __future__ import annotations

from typing import Any

import msgspec

from tidings.protocol.frames import ConvItem, GroupInfo, Message
from tidings.protocol.frames import MemberItem as MemberItem  # re-exported: API bodies
from tidings.protocol.frames import ReceiptItem as ReceiptItem


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    retryable: bool
    retry_after_ms: int | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    error: ErrorBody


class Health(msgspec.Struct, frozen=True):
    status: str
    version: str
    online: int  # authenticated device sessions on this process
    pending_writes: int  # writes queued for the store, not yet committed
    room_viewers: int = 0  # viewers in live rooms on this process
    room_ticks: int = 0  # room ticks run since start (statistics)
    room_ticks_late: int = 0  # ticks that started more than a tick period late
    room_deliveries: int = 0  # room posts written to viewers since start
    room_tick_ms: int = 0  # wall time spent in room ticks since start
    pid: int = 0  # this process (one of the workers, in a cluster)
    worker_id: int = -1  # the worker id it leased for message ids
    store: str = ""  # "sqlite" or "postgres"
    bus: str = ""  # "memory" or "redis"; with "redis", bus_connected says if it is up
    bus_connected: bool = True


class PutUser(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = ""
    password: str | None = None


class UserOut(msgspec.Struct, frozen=True):
    uid: str
    display: str
    name: str
    created_ms: int


class TokenRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: str
    platform: str
    ttl_s: int | None = None


class TokenOut(msgspec.Struct, frozen=True):
    token: str
    user: str
    device: str
    platform: str
    expires_ms: int


class RevokeToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    token: str


class Register(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: str
    password: str
    device: str
    platform: str
    name: str = ""


class Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user: str
    password: str
    device: str
    platform: str


class ServerSend(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A message sent by the app backend on behalf of ``sender`` (device ``server``)."""

    sender: str = msgspec.field(name="from")
    cid: str
    body: dict[str, Any]
    to: str | None = None  # a user (1:1), or
    conv: str | None = None  # a conversation (a group: the sender must be a member)
    type: str = "text"
    flags: int = 0


class SentOut(msgspec.Struct, frozen=True):
    conv: str
    seq: int
    mid: str
    ts: int
    cid: str
    dup: bool


class BlocksOut(msgspec.Struct, frozen=True):
    users: list[str]


class ConversationsOut(msgspec.Struct, frozen=True):
    convs: list[ConvItem]
    badge: int


class PageOut(msgspec.Struct, frozen=True):
    conv: str
    msgs: list[Message]
    more: bool


class CreateGroup(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new group owned by ``owner``; ``id`` (optional) becomes ``g:<id>``. ``key`` makes
    a retry answer the first result."""

    owner: str
    members: list[str] = []
    id: str | None = None
    name: str | None = None
    avatar: str | None = None
    intro: str | None = None
    announcement: str | None = None
    members_can_invite: bool | None = None
    history_visible: bool | None = None
    max_members: int | None = None
    key: str | None = None


class AddMembers(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Add up to 10,000 users (bulk adds: several calls, each with its own ``key``)."""

    users: list[str]
    by: str | None = None  # who adds them (default: the owner)
    key: str | None = None


class GroupOpIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Any group operation, as the client protocol's `group` frame (``by``: who acts,
    default the owner; the server API may do what the owner may)."""

    op: str
    by: str | None = None
    users: list[str] = []
    role: str | None = None
    duration_ms: int | None = None
    on: bool | None = None
    name: str | None = None
    avatar: str | None = None
    intro: str | None = None
    announcement: str | None = None
    members_can_invite: bool | None = None
    history_visible: bool | None = None
    key: str | None = None


class GroupOut(msgspec.Struct, frozen=True):
    info: GroupInfo
    seq: int  # the entry recording the change (0: nothing changed)
    mid: str
    dup: bool


class MembersOut(msgspec.Struct, frozen=True):
    members: list[MemberItem]
    next: str


class ReceiptsOut(msgspec.Struct, frozen=True):
    receipts: list[ReceiptItem]


class RoomPostIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A post from the app backend to a live room: ``admin`` and ``gift`` go in the high
    lane (never sampled away), ``chat`` in the low one."""

    body: dict[str, Any]
    kind: str = "admin"
    sender: str | None = msgspec.field(default=None, name="from")


class RoomOut(msgspec.Struct, frozen=True):
    room: str
    online: int  # viewers on this node
