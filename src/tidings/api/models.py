"""Request and response bodies of the HTTP API; the OpenAPI document is generated from them."""

from __future__ import annotations

from typing import Any

import msgspec

from tidings.protocol.frames import ConvItem, Message


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
    to: str
    cid: str
    body: dict[str, Any]
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
