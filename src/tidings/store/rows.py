"""Rows of the message and conversation tables as records, the same for both stores
(SQLite and PostgreSQL select the same columns in the same order)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from tidings.protocol.errors import TidingsError
from tidings.store.base import (
    EVENT_TYPES,
    GROUP_EVENT,
    Amend,
    ConvSettings,
    ConvSummary,
    MessageRecord,
    NewMessage,
)

pack = msgspec.msgpack.Encoder().encode
unpack = msgspec.msgpack.Decoder().decode
MSG_COLS = "conv, seq, mid, sender, dev, cid, type, body, ts, flags, mentions, reply_to"
READ_COLS = MSG_COLS + ", edit_version, recalled, ctotal"
EMPTY_BODY = pack({})


def record(row: Sequence[Any]) -> MessageRecord:
    """A message from the ``READ_COLS`` of its row."""
    return MessageRecord(
        conv=row[0],
        seq=row[1],
        mid=row[2],
        sender=row[3],
        dev=row[4],
        cid=row[5],
        type=row[6],
        body=unpack(row[7]),
        ts=row[8],
        flags=row[9],
        mentions=tuple(unpack(row[10])) if row[10] else (),
        reply_to=row[11],
        size=len(row[7]),
        edit_version=row[12],
        recalled=bool(row[13]),
        n=row[14],
    )


def appended(
    msg: NewMessage, seq: int, mid: int, ts: int, ctotal: int, edit_version: int = 0
) -> MessageRecord:
    """The record of ``msg`` as just appended at ``seq``."""
    return MessageRecord(
        conv=msg.conv,
        seq=seq,
        mid=mid,
        sender=msg.sender,
        dev=msg.dev,
        cid=msg.cid,
        type=msg.type,
        body=msg.body,
        ts=ts,
        flags=msg.flags,
        mentions=msg.mentions,
        reply_to=msg.reply_to,
        size=len(msg.body_bytes),
        edit_version=edit_version,
        n=ctotal,
    )


def deletions(
    rows: Sequence[Sequence[Any]], limit: int, after: int, upto: int
) -> tuple[dict[str, list[int]], int]:
    """``deletions_since``'s answer from its change-log rows (conv, seq, version) in
    version order, at most ``limit`` + 1 of them: the seqs by conversation, ascending,
    and the version of the last one included (``upto`` when all fit)."""
    last = upto
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1][2] if rows else after
    out: dict[str, list[int]] = {}
    for conv, seq, _ in rows:
        out.setdefault(conv, []).append(seq)
    for seqs in out.values():
        seqs.sort()
    return out, last


# What an amend needs of its target: its row's (sender, ts, recalled, type, dev).
AMEND_TARGET_COLS = "sender, ts, recalled, type, dev"


def amend_refusal(
    target: Sequence[Any] | None, msg: NewMessage, amend: Amend, now: int
) -> TidingsError | None:
    """Why a recall or edit of ``target`` (its ``AMEND_TARGET_COLS``, None: no such
    entry) by ``msg`` is refused, or None when it may go ahead."""
    if target is None:
        return TidingsError("not_found", f"no entry {amend.target_seq} in this conversation")
    sender, ts, recalled, mtype, dev = target
    if sender != msg.sender or mtype == "system" or dev == "server":
        return TidingsError("forbidden", f"only the sender can {amend.action} a message")
    if mtype == GROUP_EVENT:
        return TidingsError("forbidden", f"a group's membership entries cannot be {amend.action}ed")
    if mtype in EVENT_TYPES:
        return TidingsError("invalid", f"an event entry cannot be {amend.action}ed")
    if recalled:
        return TidingsError("conflict", "the message was recalled")
    if amend.action == "recall":
        if now - ts > amend.window_ms:
            return TidingsError(
                "forbidden", f"messages can be recalled within {amend.window_ms // 1000} s"
            )
        return None
    new_body = amend.new_body or {}
    if mtype == "text" and not (isinstance(new_body.get("text"), str) and new_body["text"]):
        return TidingsError("invalid", "an edit of a text message needs a non-empty text")
    return None


# The columns of a conversation summary's row, before its last entry (both stores).
SUMMARY_COLS = (
    "c.id, c.last_seq, c.last_mid, c.last_ts, c.counted - m.read_counted, "
    "m.read_seq, CASE WHEN c.kind = 1 THEN (SELECT max(p.read_seq) FROM members p "
    "             WHERE p.conv = c.id AND p.uid <> m.uid) END, "
    "m.muted, m.pinned, m.hidden_seq, m.draft, g.name, g.member_count, m.joined_seq, "
    "CASE WHEN c.kind = 1 THEN (SELECT max({greatest}(p.delivered_seq, p.read_seq)) "
    "             FROM members p WHERE p.conv = c.id AND p.uid <> m.uid) END"
)


def conv_summary(row: Sequence[Any], last: MessageRecord | None) -> ConvSummary:
    """A summary from the ``SUMMARY_COLS`` of its row and its last entry (as the member
    sees it: a tombstone if they deleted it)."""
    conv, last_seq, last_mid, last_ts, unread, read_seq, peer_read = row[:7]
    muted, pinned, hidden_seq, draft, title, size, floor, peer_delivered = row[7:15]
    direct = title is None  # groups have no "read up to N" of a peer
    settings = ConvSettings(bool(muted), bool(pinned), hidden_seq >= last_seq, draft)
    # Notes to self: the only member is the peer too (delivered as far as read).
    peer_read = peer_read if peer_read is not None else read_seq if direct else 0
    return ConvSummary(
        conv,
        last_seq,
        last_mid,
        last_ts,
        unread,
        read_seq,
        peer_read,
        last,
        settings,
        title or "",
        size or 0,
        floor,
        peer_read if peer_delivered is None else peer_delivered,
    )
