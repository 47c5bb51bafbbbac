"""The `Bus` interface: fan events out to the nodes where the target users are online.

Guarantee: at-most-once, best effort, in publish order from one publisher. A device that
misses an event finds out from the watermark in its next pong, or from a resync hint the
hub sends when the bus tells it events may have been lost (`ResyncHint`: after a bus
reconnect, or when another node died); the store, not the bus, is the source of truth.

Besides events, a bus keeps the cluster's routing state, which the hub feeds: which users
have sessions on this node (`user_online` / `user_offline`), which live rooms have
viewers here (`watch_room` / `unwatch_room`). From it the bus reports cluster-wide
presence transitions (`PresenceChange`) to this node's handler, answers `online()`, and
keeps the rate-limit counters that must be global (`allow`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    supersedes (on any node) are kicked. Older means an earlier (``started_ms``,
    ``session``): the announcement of an earlier login that arrives late kicks nobody
    newer."""

    uid: str
    device: str
    platform: str
    session: str
    started_ms: int = 0  # when it was admitted (`ready`), UTC ms


class PresenceEntry(msgspec.Struct, frozen=True, array_like=True):
    """``uid`` went online or offline (``last_seen`` UTC ms, 0 while online); for the
    devices of ``contacts``."""

    uid: str
    online: bool
    last_seen: int
    contacts: tuple[str, ...]


class PresenceNotice(msgspec.Struct, frozen=True, tag="presence"):
    """One batch of presence changes (from the node that saw them): each node pushes
    every entry to the sessions it has of that entry's contacts."""

    entries: tuple[PresenceEntry, ...]


class PresenceChange(msgspec.Struct, frozen=True, tag="online"):
    """From a bus to its own node's handler, never published: ``uid``'s first session in
    the cluster started (``online``), or its last one ended or died with its node."""

    uid: str
    online: bool


class ResyncHint(msgspec.Struct, frozen=True, tag="resync"):
    """Events for this node's sessions may have been lost: each should sync. ``reason``
    says why (`reconnected`: this node's bus connection came back; `lapsed`: this node
    was silent past the node TTL; `peer_died`: ``node`` stopped without leaving, maybe
    between a commit and its publish; `peer_dropped`: ``node`` dropped publishes)."""

    reason: str
    node: str = ""


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
    | PresenceNotice
    | PresenceChange
    | ResyncHint
)
Handler = Callable[[BusEvent], None]


def users_of(event: BusEvent) -> tuple[str, ...] | None:
    """The users whose nodes must get ``event``; None: every node (a group entry, whose
    members each node looks up itself, or a resync hint). Room events go by room."""
    if isinstance(event, MessageEvent):
        return event.users or None
    if isinstance(event, (TypingNotice, DeliveredNotice)):
        return event.users
    if isinstance(event, ReadNotice):
        return event.users if event.uid in event.users else (event.uid, *event.users)
    if isinstance(event, (RevokeEvent, SettingsNotice, DeletedNotice, SessionStarted)):
        return (event.uid,)
    if isinstance(event, PresenceNotice):
        return tuple({c: None for e in event.entries for c in e.contacts})
    if isinstance(event, PresenceChange):
        return (event.uid,)
    if isinstance(event, RoomEvent):
        return ()
    return None


class BusUnavailable(Exception):
    """The bus's transport cannot be reached (raised by ``start()`` only)."""


class Bus(Protocol):
    node_id: str  # unique among the cluster's live nodes
    shared: bool
    """True when other nodes share this bus: limits that must hold across the cluster
    go through `allow` (a single node keeps them in its own memory)."""

    def set_handler(self, handler: Handler) -> None:
        """Events for users online on this node are passed to ``handler`` (on the loop),
        and so are this node's `PresenceChange` and `ResyncHint` notices."""
        ...

    async def start(self) -> None:
        """Connect and join the cluster; raises `BusUnavailable` with the reason when
        the transport cannot be reached at all. Later outages are handled inside."""
        ...

    async def close(self) -> None:
        """Send what is queued (briefly), leave the cluster cleanly, disconnect."""
        ...

    async def flush(self) -> None:
        """Wait (briefly) until what was published or registered so far went out."""
        ...

    def publish(self, event: BusEvent) -> None:
        """Fire and forget. Never raises for delivery problems; never blocks. Events for
        sessions on this node reach its handler at once, without a round trip."""
        ...

    def user_online(self, uid: str) -> None:
        """``uid``'s first session on this node started: route the user's events here."""
        ...

    def user_offline(self, uid: str) -> None:
        """``uid``'s last session on this node ended."""
        ...

    def watch_room(self, room: str) -> None:
        """Live room ``room`` has its first viewer on this node: send its posts here."""
        ...

    def unwatch_room(self, room: str) -> None:
        """Live room ``room`` has no viewer left on this node."""
        ...

    async def online(self, users: Sequence[str]) -> set[str]:
        """Which of ``users`` have a session on some live node (this node's own view
        alone while the transport is unreachable)."""
        ...

    def allow(self, key: str, limit: int, window_ms: int = 1000) -> int:
        """Count one use of ``key`` against ``limit`` per fixed window, cluster-wide: 0
        when allowed, else the milliseconds until the window ends. Never blocks: uses on
        other nodes are learned from the shared counter's answers, a round trip late, so
        a burst spread over several nodes may get slightly more than ``limit``."""
        ...
