"""What a device knows about its user's conversations, kept current from the frames it
receives: the conversation list (unread counts, read positions, settings, last entry)
and, optionally, the entries themselves.

Every rule here is order-insensitive, so a device converges whatever order pushes, sync
answers and events reach it in: counts come from running totals (``n``) and positions
only move forward (maxima), deletions and recalls are idempotent, an edit carries the
edit version it produced, and settings carry the change-log version that set them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from tidings.protocol.frames import ConvItem, Message

AMEND_TYPES = frozenset({"recall", "edit"})
SERVER_DEVICE = "server"  # device id of entries sent through the server HTTP API
GROUP_EVENT = "group"  # entries of group operations (create, add, remove, leave, ...)


def ends_membership(m: Message, user: str) -> bool:
    """Is ``m`` the entry by which ``user`` was removed from, or left, its group?"""
    if m.type != GROUP_EVENT or m.deleted:
        return False
    op = m.body.get("op")
    if op == "leave":
        return m.sender == user
    users = m.body.get("users")
    return op == "remove" and isinstance(users, list) and user in users


def amend_target(m: Message) -> int | None:
    """The seq a recall or edit entry changes (None for other entries)."""
    if m.type not in AMEND_TYPES:
        return None
    seq = m.body.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def tombstone(m: Message) -> Message:
    """An entry this user deleted for themself: its place in the sequence, nothing else."""
    return msgspec.structs.replace(m, body={}, deleted=True, edit_version=0, recalled=False)


@dataclass
class ConversationView:
    """One conversation as this user sees it."""

    conv: str
    peer: str | None = None
    last_seq: int = 0
    last: Message | None = None
    total: int = 0  # counted entries up to last_seq
    read_seq: int = 0
    read_n: int = 0  # counted entries up to read_seq
    peer_read_seq: int = 0
    # The other member's delivered position ("delivered up to N", 1:1): the largest of
    # the delivered events, the state items' and peer_read_seq (reading implies delivery).
    peer_delivered_seq: int = 0
    muted: bool = False
    pinned: bool = False
    draft: str = ""
    hidden_at: int = -1  # hidden while no entry is newer than this seq
    settings_v: int = 0
    deleted: set[int] = field(default_factory=set)

    @property
    def unread(self) -> int:
        return max(0, self.total - self.read_n)

    @property
    def hidden(self) -> bool:
        return self.hidden_at >= self.last_seq

    @property
    def last_ts(self) -> int:
        return 0 if self.last is None else self.last.ts


class LocalState:
    """The device's replica of its user's conversations.

    ``keep_messages`` also keeps every entry received, per conversation by seq, with
    recalls, edits and deletions applied (a chat screen's cache); without it only the
    list state is kept.
    """

    def __init__(self, user: str = "", keep_messages: bool = False) -> None:
        self.user = user
        self.keep_messages = keep_messages
        self.convs: dict[str, ConversationView] = {}
        self.messages: dict[str, dict[int, Message]] = {}

    def clear(self) -> None:
        self.convs.clear()
        self.messages.clear()

    def drop(self, conv: str) -> None:
        """Forget a conversation (a group this user is no longer a member of)."""
        self.convs.pop(conv, None)
        self.messages.pop(conv, None)

    def view(self, conv: str) -> ConversationView:
        v = self.convs.get(conv)
        if v is None:
            v = self.convs[conv] = ConversationView(conv)
        return v

    # ------------------------------------------------------------------ reading

    def conversation_list(self, include_hidden: bool = False) -> list[ConversationView]:
        """Pinned first, then newest activity first (as the server's ``convs``)."""
        views = [
            v for v in self.convs.values() if v.last_seq > 0 and (include_hidden or not v.hidden)
        ]
        views.sort(key=lambda v: (not v.pinned, -v.last_ts, v.conv))
        return views

    @property
    def badge(self) -> int:
        """Total unread over the conversations that are not muted."""
        return sum(v.unread for v in self.convs.values() if not v.muted)

    # ------------------------------------------------------------------ applying

    def apply_message(self, m: Message) -> None:
        """An entry received (push, echo of an own send, sync or history page)."""
        v = self.view(m.conv)
        if m.n > v.total:
            v.total = m.n
        target = amend_target(m)
        if m.deleted:
            v.deleted.add(m.seq)  # the server's tombstone: keep later copies hidden too
        elif m.seq in v.deleted or target in v.deleted:
            m = tombstone(m)
        held = self.messages.setdefault(m.conv, {}) if self.keep_messages else None
        old = None if held is None else held.get(m.seq)
        if (
            old is not None
            and not m.deleted
            and (old.recalled or old.edit_version > m.edit_version)
        ):
            # A copy older than what was applied here (a page fetched before an edit).
            m = msgspec.structs.replace(
                m, body=old.body, recalled=old.recalled, edit_version=old.edit_version
            )
        if m.seq >= v.last_seq:
            v.last_seq, v.last = m.seq, m
        if m.type not in AMEND_TYPES and m.dev != SERVER_DEVICE:
            # Sending from a device moves the sender's read position to the entry.
            self._moved(v, m.sender, m.seq, m.n)
        if held is not None:
            held[m.seq] = m
            if target is not None and not m.deleted:
                self._amend(m, target, held)

    def _moved(self, v: ConversationView, by: str, seq: int, read_n: int | None) -> None:
        """``by``'s read position in ``v`` is at least ``seq``."""
        if by == self.user:
            if seq > v.read_seq:
                v.read_seq = seq
            if read_n is not None and read_n > v.read_n:
                v.read_n = read_n
            if v.conv == f"d:{by}|{by}" and seq > v.peer_read_seq:
                v.peer_read_seq = seq  # notes to self: the only member is the peer too
                v.peer_delivered_seq = max(v.peer_delivered_seq, seq)
        elif seq > v.peer_read_seq and not v.conv.startswith("g:"):
            v.peer_read_seq = seq  # (groups count readers on request instead)
            v.peer_delivered_seq = max(v.peer_delivered_seq, seq)

    def _amend(self, e: Message, target_seq: int, held: dict[int, Message]) -> None:
        target = held.get(target_seq)
        if e.type == "recall":
            # A recall takes the content out of the edits made before it, too.
            for seq, other in held.items():
                if other.type == "edit" and not other.deleted and amend_target(other) == target_seq:
                    held[seq] = msgspec.structs.replace(other, body={"seq": target_seq})
            if target is not None and not target.recalled and not target.deleted:
                held[target_seq] = msgspec.structs.replace(target, body={}, recalled=True)
        elif target is not None and target.recalled:
            # A copy of an edit from before the recall: no content survives a recall.
            held[e.seq] = msgspec.structs.replace(e, body={"seq": target_seq})
        elif (
            target is not None
            and not target.recalled
            and not target.deleted
            and e.edit_version > target.edit_version
        ):
            held[target_seq] = msgspec.structs.replace(
                target, body=e.body.get("body", {}), edit_version=e.edit_version
            )
        v = self.view(e.conv)
        if v.last is not None and v.last.seq in held:
            v.last = held[v.last.seq]

    def apply_deleted(self, conv: str, seqs: list[int]) -> None:
        """Entries this user deleted for themself (on any device); recall and edit entries
        read as deleted with the entry they changed."""
        v = self.view(conv)
        v.deleted.update(seqs)
        held = self.messages.get(conv)
        if held is not None:
            for seq, m in held.items():
                if not m.deleted and (seq in v.deleted or amend_target(m) in v.deleted):
                    held[seq] = tombstone(m)
        last = v.last
        if (
            last is not None
            and not last.deleted
            and (last.seq in v.deleted or amend_target(last) in v.deleted)
        ):
            v.last = tombstone(last)

    def apply_read(self, conv: str, by: str, seq: int, read_n: int | None) -> None:
        self._moved(self.view(conv), by, seq, read_n)

    def apply_delivered(self, conv: str, by: str, seq: int) -> None:
        """A device of ``by`` (the other member) holds ``conv`` up to ``seq``."""
        v = self.view(conv)
        if by != self.user and seq > v.peer_delivered_seq and not conv.startswith("g:"):
            v.peer_delivered_seq = seq

    def apply_settings(
        self,
        conv: str,
        muted: bool,
        pinned: bool,
        hidden: bool,
        draft: str,
        version: int,
        hidden_at: int = 0,
    ) -> None:
        v = self.view(conv)
        if version and version < v.settings_v:
            return  # an older change than what is applied
        v.settings_v = max(v.settings_v, version)
        v.muted, v.pinned, v.draft = muted, pinned, draft
        if hidden:
            # Hidden at the server's last seq then, even if this device lags behind it.
            v.hidden_at = max(v.hidden_at, hidden_at or v.last_seq)
        else:
            v.hidden_at = -1

    def apply_state(self, item: ConvItem, cv: int) -> None:
        """A conversation's state from a sync answer, as of change-log version ``cv``."""
        v = self.view(item.conv)
        v.peer = item.peer
        if item.deleted:
            self.apply_deleted(item.conv, item.deleted)
        if item.last is not None:
            self.apply_message(item.last)
        if item.n > v.total:
            v.total = item.n
        if item.read_seq > v.read_seq:
            v.read_seq = item.read_seq
        # The state's unread count is as of its last_seq: total there - read_n.
        read_n = item.n - item.unread
        if read_n > v.read_n:
            v.read_n = read_n
        if item.peer_read_seq > v.peer_read_seq:
            v.peer_read_seq = item.peer_read_seq
        v.peer_delivered_seq = max(
            v.peer_delivered_seq, item.peer_delivered_seq, item.peer_read_seq
        )
        if cv >= v.settings_v:
            v.settings_v = cv
            v.muted, v.pinned, v.draft = item.muted, item.pinned, item.draft
            if item.hidden:
                v.hidden_at = max(v.hidden_at, item.last_seq)
            elif v.hidden_at >= item.last_seq:
                v.hidden_at = -1
