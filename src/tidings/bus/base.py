"""The `Bus` interface: fan events out to the nodes where the target users are online.

Guarantee: at-most-once, best effort, in publish order from one publisher. A device that
misses an event finds out from the watermark in its next pong (or a resync hint after a
bus reconnect) and syncs; the store, not the bus, is the source of truth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from tidings.store.base import ConvSettings, MessageRecord


class MessageEvent(msgspec.Struct, frozen=True, tag="msg"):
    """A committed message for ``users``' devices, except the sending device. For a group
    ``users`` is empty: each node fans out to the group's members it knows, applying the
    membership changes an entry carries (``joined`` get it too, ``left`` get it last)."""

    record: MessageRecord
    users: tuple[str, ...]
    exclude_device: str | None = None  # device id of the sender, not pushed to it
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()


class RevokeEvent(msgspec.Struct, frozen=True, tag="revoke"):
    """Close sessions of (uid, device) authenticated before ``before_ms``, or with ``jti``."""

    uid: str
    device: str
    before_ms: int = 0
    jti: str | None = None


class TypingNotice(msgspec.Struct, frozen=True, tag="typing"):
    """``sender`` is typing in ``conv``; for the online devices of ``users``."""

    conv: str
    sender: str
    users: tuple[str, ...]


class ReadNotice(msgspec.Struct, frozen=True, tag="read"):
    """``uid`` read ``conv`` up to ``seq`` on ``device``; ``unread`` is what is left."""

    conv: str
    uid: str
    device: str
    seq: int
    unread: int
    users: tuple[str, ...]
    read_n: int = 0  # counted entries up to ``seq`` (unread = total - read_n)


class DeliveredNotice(msgspec.Struct, frozen=True, tag="delivered"):
    """A device of ``uid`` holds 1:1 conversation ``conv`` up to ``seq``; for the online
    devices of ``users`` (the other member)."""

    conv: str
    uid: str
    seq: int
    users: tuple[str, ...]


class SettingsNotice(msgspec.Struct, frozen=True, tag="settings"):
    """``uid`` changed its settings of ``conv`` on ``device``."""

    conv: str
    uid: str
    device: str
    settings: ConvSettings


class DeletedNotice(msgspec.Struct, frozen=True, tag="deleted"):
    """``uid`` deleted ``seqs`` of ``conv`` for themself on ``device``."""

    conv: str
    uid: str
    device: str
    seqs: tuple[int, ...]


class SessionStarted(msgspec.Struct, frozen=True, tag="session"):
    """A device of ``uid`` authenticated: under a login policy, older sessions it
    supersedes (on any node) are kicked."""

    uid: str
    device: str
    platform: str
    session: str


class RoomEvent(msgspec.Struct, frozen=True, tag="room"):
    """A post to live room ``room`` (each node with viewers in it batches it into its next
    tick); at most once."""

    room: str
    sender: str
    kind: str
    body: dict[str, Any]
    ts: int


BusEvent = (
    MessageEvent
    | RevokeEvent
    | TypingNotice
    | ReadNotice
    | DeliveredNotice
    | SettingsNotice
    | SessionStarted
    | DeletedNotice
    | RoomEvent
)
Handler = Callable[[BusEvent], None]


class Bus(Protocol):
    def set_handler(self, handler: Handler) -> None:
        """Events for users online on this node are passed to ``handler`` (on the loop)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def publish(self, event: BusEvent) -> None:
        """Fire and forget. Never raises for delivery problems; never blocks."""
        ...
