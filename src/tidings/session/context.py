"""What a session needs from the rest of the server, gathered by the composition root."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tidings.clock import Clock
from tidings.config import Settings
from tidings.protocol.codec import Codec
from tidings.services.accounts import Accounts
from tidings.services.contacts import Contacts
from tidings.services.groups import Groups
from tidings.services.messaging import Messaging
from tidings.services.presence import Presence
from tidings.services.rooms import Rooms
from tidings.session.gate import WriteGate
from tidings.store.base import Store

if TYPE_CHECKING:
    from tidings.session.session import Session


class Link(Protocol):
    """The transport under a session (WebSocket or raw TCP)."""

    codec: Codec
    framing: str  # "ws" or "tcp": sessions with equal (codec, framing) share push bytes
    peer: str

    def frame(self, payload: bytes) -> bytes:
        """Wrap an encoded frame for this transport (WebSocket header / length prefix)."""
        ...

    def write(self, data: bytes) -> None:
        """Queue framed bytes; an overfull send buffer closes the link as a slow consumer."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Send the close code (where the transport has one) and close."""
        ...

    def pause_reading(self) -> None:
        """Stop taking frames from the socket until resume_reading()."""
        ...

    def resume_reading(self) -> None: ...


class Registry(Protocol):
    def register(self, session: Session) -> None: ...

    def unregister(self, session: Session) -> None: ...

    def announce(self, session: Session) -> None:
        """Called once the session passed every check (login policy kicks happen here)."""
        ...

    def revoked_since(self, uid: str, since: float) -> bool:
        """Whether a revocation of one of ``uid``'s tokens or devices may have been
        published since monotonic time ``since`` (always True when this node cannot see
        every revocation: on a cluster)."""
        ...

    async def routed(self) -> bool:
        """Wait until the users registered so far are routed to this node cluster-wide;
        False (at once) when there is no cluster (routing here is immediate)."""
        ...

    def track(self, session: Session) -> None:
        """Watch an unauthenticated session for the auth timeout."""
        ...

    def watch(self, session: Session) -> None:
        """The session holds unacked pushes: check its retransmit timer often."""
        ...

    def join_room(self, session: Session, room: str) -> int:
        """Enter a live room on this node; its approximate online count."""
        ...

    def greet_room(self, session: Session, room: str) -> None:
        """Write the room's recent posts to a viewer that just joined."""
        ...

    def leave_room(self, session: Session, room: str) -> None: ...


@dataclass
class ServerContext:
    settings: Settings
    clock: Clock
    store: Store
    accounts: Accounts
    messaging: Messaging
    registry: Registry
    gate: WriteGate
    contacts: Contacts
    presence: Presence
    groups: Groups
    rooms: Rooms
    server_name: str = "tidings"
    # The server's hello is the same for every connection: encoded once per (codec,
    # framing) here.
    hello_frames: dict[tuple[str, str], bytes] = field(default_factory=dict)
    # The server's loop, set when it starts: `loop.create_task` skips the running-loop
    # lookup of `asyncio.ensure_future` (a getpid() system call each, in CPython 3.11).
    loop: asyncio.AbstractEventLoop | None = None
