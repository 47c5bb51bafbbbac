"""The `Store` interface and its records.

Guarantees every implementation gives (checked by tests/store_contract.py):

* ``append_message`` resolves only after the message is durable (for SQLite: the group
  commit's fsync), with a per-conversation ``seq`` that is gapless and increases in
  commit order. A message that fails burns no seq and never fails its batch-mates.
* The same (sender, cid) never makes two messages, across restarts: a retry resolves to
  the original record with ``dup=True``; different content under that pair is a
  ``conflict`` error.
* Reads see every append whose future has resolved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import msgspec


class UserRecord(msgspec.Struct, frozen=True):
    uid: str
    display: str
    name: str
    password_hash: str | None
    created_ms: int


class Amend(msgspec.Struct, frozen=True):
    """What a recall or edit event does to its target entry, applied in the same
    transaction as the event: the target must be the sender's own message, not recalled,
    and (recall) no older than ``window_ms``."""

    target_seq: int
    action: str  # "recall" or "edit"
    window_ms: int = 0  # recall only
    new_body: dict[str, Any] | None = None  # edit only
    new_body_bytes: bytes = b""


class NewMessage(msgspec.Struct, frozen=True):
    """A message to append. ``members`` are the conversation's members when it is created
    by this append (the direct pair); each must be an existing user."""

    conv: str
    sender: str
    dev: str
    cid: str
    type: str
    body: dict[str, Any]
    body_bytes: bytes
    members: tuple[str, ...]
    blocker: str | None = None  # refuse with `blocked` if this user blocks the sender
    counted: bool = True  # counts toward unread (false for silent/not-counted and events)
    amend: Amend | None = None  # for recall/edit events: the change to the target entry
    reads: bool = True  # a device's own message: moves the sender's read position to it
    privileged: bool = False  # the server API: group mutes do not apply (membership does)
    flags: int = 0
    mentions: tuple[str, ...] = ()
    reply_to: int | None = None
    ts: int = 0  # filled by the store


class MessageRecord(msgspec.Struct, frozen=True):
    conv: str
    seq: int
    mid: int
    sender: str
    dev: str
    cid: str
    type: str
    body: dict[str, Any]
    ts: int
    flags: int = 0
    mentions: tuple[str, ...] = ()
    reply_to: int | None = None
    size: int = 0  # bytes of the stored body (to bound reply sizes)
    edit_version: int = 0
    recalled: bool = False
    deleted: bool = False  # deleted for the reading user (set per reader, never stored here)
    n: int = 0  # counted entries of the conversation up to and including this one


EVENT_TYPES = frozenset({"recall", "edit"})  # entries that change an earlier one
GROUP_EVENT = "group"  # the type of entries a group operation writes (not counted)


def amend_target(rec: MessageRecord) -> int | None:
    """The seq a recall or edit entry changes (None for other entries)."""
    if rec.type not in EVENT_TYPES:
        return None
    seq = rec.body.get("seq")
    return seq if isinstance(seq, int) else None


def tombstone(rec: MessageRecord) -> MessageRecord:
    """How an entry the reader deleted for themself reads: its place in the sequence and
    nothing else."""
    return msgspec.structs.replace(rec, body={}, deleted=True, edit_version=0, recalled=False)


class AppendResult(msgspec.Struct, frozen=True):
    record: MessageRecord
    dup: bool


class ConvRow(msgspec.Struct, frozen=True):
    conv: str
    last_seq: int
    last_mid: int
    last_ts: int
    floor: int = 0  # the member sees entries after this seq only (joined a group then)


class ReadState(msgspec.Struct, frozen=True):
    """A member's read position in a conversation and what is left unread."""

    conv: str
    uid: str
    read_seq: int
    unread: int
    changed: bool  # False when the position was already at or past the requested seq
    version: int = 0  # the user's change-log version of this change
    read_n: int = 0  # counted entries up to the read position (unread = total - read_n)


class ConvSettings(msgspec.Struct, frozen=True):
    """A user's own settings for one conversation."""

    muted: bool = False
    pinned: bool = False
    hidden: bool = False  # hidden until the next message
    draft: str = ""
    version: int = 0  # the change-log version of the change that set these (0: not known)
    hidden_seq: int = 0  # while hidden: hidden until an entry after this seq arrives


class ConvSummary(msgspec.Struct, frozen=True):
    conv: str
    last_seq: int
    last_mid: int
    last_ts: int
    unread: int
    read_seq: int
    peer_read_seq: int
    last: MessageRecord | None
    settings: ConvSettings = ConvSettings()
    title: str = ""  # a group's name
    size: int = 0  # a group's member count
    floor: int = 0  # the member sees entries after this seq only
    peer_delivered_seq: int = 0  # the other member's delivered position (>= peer_read_seq)


class DeliveredMove(msgspec.Struct, frozen=True):
    """``uid``'s delivered position in 1:1 conversation ``conv`` moved to ``seq``; ``tell``
    is the other member, to be told (None when that member blocks ``uid``)."""

    conv: str
    uid: str
    seq: int
    tell: str | None


class GroupChange(msgspec.Struct, frozen=True):
    """One group operation, applied by the store's writer together with the entry that
    records it (type ``group``) in the group's sequence. ``cid`` is the idempotency key:
    the same (actor, cid) again answers the first result with ``dup``."""

    conv: str
    op: str  # create, add, remove, leave, role, transfer, mute, mute_all, profile
    actor: str  # who acts: the entry's sender
    dev: str  # the actor's device ("server" for the server API)
    cid: str
    users: tuple[str, ...] = ()  # the members acted on (create: the first members)
    role: int = 0  # role: the new role
    until_ms: int = 0  # mute: muted until (0: unmute)
    fields: dict[str, Any] = {}  # create/profile: profile fields; mute_all: {"on": bool}
    privileged: bool = False  # the server API: acts with the owner's rights
    max_members: int = 100_000  # create: the group's size limit
    history_visible: bool = False  # create: new members see entries from before joining


class GroupInfo(msgspec.Struct, frozen=True):
    conv: str
    owner: str
    name: str
    avatar: str
    intro: str
    announcement: str
    muted_all: bool
    members_can_invite: bool
    history_visible: bool
    max_members: int
    member_count: int
    created_ms: int
    last_seq: int = 0


class MemberRecord(msgspec.Struct, frozen=True):
    uid: str
    role: int
    muted_until: int
    joined_seq: int  # the member sees entries after this seq (0: all history)
    joined_ms: int
    read_seq: int


class GroupResult(msgspec.Struct, frozen=True):
    """What a group operation did: its entry (None when nothing changed, e.g. adding
    members who are all members already), the group now, and who joined or left."""

    record: MessageRecord | None
    info: GroupInfo
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()
    dup: bool = False


class ReadCount(msgspec.Struct, frozen=True):
    seq: int
    count: int  # members other than the sender whose read position is at or past seq
    readers: list[str] | None = None  # who they are (small groups only)


class AuthState(msgspec.Struct, frozen=True):
    token_revoked: bool
    device_revoked_before_ms: int


class Store(Protocol):
    # Message ids are in commit order when 0 (one writer). Otherwise an id may commit up
    # to this many ms after a larger one, and a sync from a watermark looks that far back.
    sync_slack_ms: int

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Finish every submitted write, then release resources."""
        ...

    # -- users and devices
    async def put_user(
        self, uid: str, display: str, name: str, password_hash: str | None, now_ms: int
    ) -> tuple[UserRecord, bool]:
        """Create the user, or update its name (and password when given). True if created."""
        ...

    async def create_user(
        self, uid: str, display: str, name: str, password_hash: str | None, now_ms: int
    ) -> UserRecord:
        """Create the user; TidingsError('conflict') if the id is taken (no overwrite)."""
        ...

    async def get_user(self, uid: str) -> UserRecord | None: ...

    async def users_exist(self, uids: list[str]) -> set[str]: ...

    async def upsert_device(self, uid: str, device: str, platform: str, now_ms: int) -> None: ...

    async def revoke_device(self, uid: str, device: str, before_ms: int) -> None:
        """Tokens of (uid, device) issued before ``before_ms`` are no longer valid."""
        ...

    async def revoke_token(self, jti: str, uid: str, device: str, expires_ms: int) -> None: ...

    async def auth_state(self, jti: str, uid: str, device: str) -> AuthState: ...

    def login_state(self, jti: str, uid: str, device: str) -> asyncio.Future[tuple[AuthState, int]]:
        """``auth_state`` and ``watermark(uid)`` in one read (what a login needs). A future
        to await or to add a callback to: a login's hot path starts no task for it."""
        ...

    # -- read state
    async def mark_read(self, uid: str, conv: str, seq: int) -> ReadState:
        """Advance ``uid``'s read position in ``conv`` to ``seq`` (capped at the last seq;
        never backwards). TidingsError('forbidden') if ``uid`` is not a member."""
        ...

    async def conversation_list(self, uid: str, limit: int) -> tuple[list[ConvSummary], int]:
        """The user's visible conversations, pinned first then newest activity first, and
        the badge (total unread of conversations that are not muted)."""
        ...

    async def conversation_states(self, uid: str, convs: list[str]) -> list[ConvSummary]:
        """The user's state of the given conversations (hidden ones included)."""
        ...

    async def user_changes_since(self, uid: str, version: int, limit: int) -> tuple[list[str], int]:
        """Conversations with user-scoped changes (read position, settings, deletions)
        after ``version``, oldest change first, and the newest version among them."""
        ...

    async def left_since(self, uid: str, after: int, upto: int) -> list[str]:
        """Groups whose membership of ``uid`` ended (removed or left) by a change with a
        version in (after, upto], whether or not the user is a member again."""
        ...

    async def user_version(self, uid: str) -> int:
        """The newest version of the user's change log (0 if none)."""
        ...

    async def sync_point(self, uid: str) -> tuple[int, int]:
        """``(watermark(uid), user_version(uid))`` in one read (what a pong carries)."""
        ...

    async def update_settings(
        self,
        uid: str,
        conv: str,
        muted: bool | None,
        pinned: bool | None,
        hidden: bool | None,
        draft: str | None,
    ) -> ConvSettings:
        """Change the given settings (None: unchanged); TidingsError('forbidden') if not a
        member. Hiding hides the conversation until its next entry."""
        ...

    async def delete_for(self, uid: str, conv: str, seqs: list[int]) -> list[int]:
        """Hide entries of ``conv`` for ``uid`` only; returns the seqs newly hidden.
        TidingsError('forbidden') if not a member."""
        ...

    async def deleted_in(self, uid: str, spans: dict[str, tuple[int, int]]) -> dict[str, set[int]]:
        """For each conversation, the seqs in its [lo, hi] span that ``uid`` deleted for
        themself (conversations with none are left out)."""
        ...

    async def deletions_since(
        self, uid: str, after: int, upto: int, limit: int
    ) -> tuple[dict[str, list[int]], int]:
        """The seqs ``uid`` deleted for themself by changes with a change-log version in
        (after, upto], oldest change first, at most ``limit`` of them: by conversation
        (ascending), and the version of the last change included (``upto`` when all
        fit)."""
        ...

    # -- presence
    async def contacts(self, uid: str) -> list[str]:
        """The users ``uid`` has a 1:1 conversation with."""
        ...

    async def set_presence_hidden(self, uid: str, hidden: bool) -> None: ...

    async def presence_info(self, uids: list[str]) -> dict[str, tuple[bool, int]]:
        """For each existing user: (presence hidden, last seen ms)."""
        ...

    async def set_last_seen(self, uid: str, ms: int) -> None: ...

    # -- block list
    async def set_block(self, uid: str, other: str, on: bool, now_ms: int) -> None:
        """``uid`` blocks (or unblocks) ``other``. Idempotent."""
        ...

    async def blocked_by(self, uid: str) -> list[str]:
        """The users ``uid`` blocks, sorted."""
        ...

    async def is_blocked(self, blocker: str, sender: str) -> bool: ...

    # -- messages
    def append_message(self, msg: NewMessage) -> asyncio.Future[AppendResult]:
        """Submit for durable append; the future fails with TidingsError on refusal."""
        ...

    async def history(
        self, conv: str, before: int, limit: int, floor: int = 0
    ) -> list[MessageRecord]:
        """Up to ``limit`` entries with floor < seq < before (0: newest), ascending."""
        ...

    async def messages_after(self, conv: str, after: int, limit: int) -> list[MessageRecord]: ...

    async def messages_in(self, spans: list[tuple[str, int, int]]) -> list[MessageRecord]:
        """For each (conv, after, upto): the entries with after < seq <= upto, in the
        order of ``spans`` and ascending seq within each; one read for them all."""
        ...

    async def changed_conversations(self, uid: str, since_mid: int, limit: int) -> list[ConvRow]:
        """The user's conversations whose last message id is above ``since_mid``, at most
        ``limit`` of them, in ascending last message id."""
        ...

    async def watermark(self, uid: str) -> int:
        """The highest message id in any of the user's conversations (0 if none)."""
        ...

    async def is_member(self, conv: str, uid: str) -> bool: ...

    # -- groups
    def apply_group(self, change: GroupChange) -> asyncio.Future[GroupResult]:
        """Check and apply a group operation with its entry, atomically, in commit order
        with the group's messages; the future fails with TidingsError on refusal."""
        ...

    async def group_info(self, conv: str) -> GroupInfo | None: ...

    async def membership(self, conv: str, uid: str) -> MemberRecord | None: ...

    async def members_page(self, conv: str, after: str, limit: int) -> list[MemberRecord]:
        """Members with user id above ``after``, ascending, at most ``limit``."""
        ...

    async def member_snapshot(self, conv: str) -> tuple[int, list[tuple[str, int]]]:
        """``(last_seq, [(member id, seq before its add entry)])`` as of one consistent
        point."""
        ...

    async def read_counts(self, conv: str, seqs: list[int], readers_up_to: int) -> list[ReadCount]:
        """For each entry: how many members other than its sender have read it, and who
        (only while the group has at most ``readers_up_to`` members)."""
        ...

    async def peek_read(self, uid: str, conv: str, seq: int) -> ReadState:
        """What ``mark_read`` would do (nothing written): `changed` false if the position
        is at or past ``seq`` already. TidingsError('forbidden') if not a member."""
        ...

    async def write_reads(self, reads: list[tuple[str, str, int]]) -> None:
        """Advance many read positions (uid, conv, seq) in one write (never backwards),
        logging each for the user's other devices; the coalesced path of large groups."""
        ...

    async def write_delivered(self, positions: list[tuple[str, str, int]]) -> list[DeliveredMove]:
        """Advance many delivered positions (conv, uid, seq) of 1:1 conversations in one
        write: each capped at the conversation's last seq, never backwards. Returns those
        that moved past the member's delivered and read positions (reading implies
        delivery), each logged as a change for the other member; ids that are not a 1:1
        conversation of two users with ``uid`` a member are skipped."""
        ...

    async def conversation(self, conv: str) -> ConvRow | None: ...

    async def lease_worker_id(self, holder: str, now_ms: int, ttl_ms: int) -> int:
        """A worker id no other live holder has; renew by calling again before expiry."""
        ...

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` on the loop after every group commit has been handed back."""
        ...

    def backlog(self) -> int:
        """Writes submitted and not yet committed (the depth of the write queue)."""
        ...
