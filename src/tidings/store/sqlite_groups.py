"""Groups on SQLite: operations applied by the writer (with their entry, atomically), and
the reads of group state. A mixin of `SqliteStore`, split out to keep modules small."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from tidings.clock import Clock
from tidings.domain.groups import (
    ADMIN,
    EVENT_USERS_SHOWN,
    MEMBER,
    OWNER,
    PROFILE_FIELDS,
    SERVER,
    check_manage,
    check_over,
    role_name,
)
from tidings.protocol.errors import TidingsError
from tidings.store.base import (
    GROUP_EVENT,
    AppendResult,
    GroupChange,
    GroupInfo,
    GroupResult,
    MemberRecord,
    MessageRecord,
    NewMessage,
    ReadCount,
    ReadState,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
KIND_GROUP = 2
_pack = msgspec.msgpack.Encoder().encode
_CHUNK = 500  # ids per IN (...) list
_INFO_COLS = (
    "g.conv, g.owner, g.name, g.avatar, g.intro, g.announcement, g.muted_all, "
    "g.members_can_invite, g.history_visible, g.max_members, g.member_count, g.created_ms"
)
_MEMBER_COLS = "uid, role, muted_until, joined_seq, joined_ms, read_seq"

Touched = dict[str, tuple[int, int, int, int]]
Readers = dict[tuple[str, str], tuple[int, int]]


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _info(row: tuple[Any, ...], last_seq: int) -> GroupInfo:
    return GroupInfo(
        conv=row[0],
        owner=row[1],
        name=row[2],
        avatar=row[3],
        intro=row[4],
        announcement=row[5],
        muted_all=bool(row[6]),
        members_can_invite=bool(row[7]),
        history_visible=bool(row[8]),
        max_members=row[9],
        member_count=row[10],
        created_ms=row[11],
        last_seq=last_seq,
    )


def not_member(conn: sqlite3.Connection, conv: str) -> TidingsError:
    """The error for a request of a non-member: `not_found` if there is no such
    conversation at all, else `forbidden`."""
    if conn.execute("SELECT 1 FROM conversations WHERE id=?", (conv,)).fetchone() is None:
        return TidingsError("not_found", "no such conversation")
    return TidingsError("forbidden", "not a member of this conversation")


def read_target(
    conn: sqlite3.Connection, uid: str, conv: str, seq: int, newest: tuple[int, int] | None
) -> ReadState:
    """Where reading ``conv`` up to ``seq`` puts ``uid``'s position (capped at the last
    seq, never backwards; ``newest``: the writer's (last seq, counted) when it knows
    newer ones than the row), nothing written: ``changed`` false if it stays."""
    row = conn.execute(
        "SELECT m.read_seq, m.read_counted, c.last_seq, c.counted FROM members m "
        "JOIN conversations c ON c.id = m.conv WHERE m.conv=? AND m.uid=?",
        (conv, uid),
    ).fetchone()
    if row is None:
        raise not_member(conn, conv)
    read_seq, read_counted, last_seq, counted = row
    if newest is not None:
        last_seq, counted = newest
    target = min(seq, last_seq)
    if target <= read_seq:
        return ReadState(conv, uid, read_seq, counted - read_counted, False, 0, read_counted)
    (ctotal,) = conn.execute(
        "SELECT ctotal FROM messages WHERE conv=? AND seq=?", (conv, target)
    ).fetchone()
    return ReadState(conv, uid, target, counted - ctotal, True, 0, ctotal)


class SqliteGroups:
    if TYPE_CHECKING:
        clock: Clock
        _seq: dict[str, tuple[int, int]]

        def _append(
            self, conn: sqlite3.Connection, msg: NewMessage, touched: Touched, readers: Readers
        ) -> AppendResult | TidingsError: ...

        def _by_cid(self, conn: sqlite3.Connection, sender: str, cid: str) -> MessageRecord: ...

        async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    # ------------------------------------------------------------------ writer side

    def _position(self, conn: sqlite3.Connection, conv: str) -> tuple[int, int]:
        """(last seq, counted total) of a conversation, this batch's appends included."""
        cached = self._seq.get(conv)
        if cached is not None:
            return cached
        row = conn.execute("SELECT last_seq, counted FROM conversations WHERE id=?", (conv,))
        found = row.fetchone()
        return (found[0], found[1]) if found else (0, 0)

    def _group_row(self, conn: sqlite3.Connection, conv: str) -> GroupInfo | None:
        row = conn.execute(f"SELECT {_INFO_COLS} FROM groups g WHERE conv=?", (conv,)).fetchone()
        return None if row is None else _info(row, self._position(conn, conv)[0])

    def _roles(self, conn: sqlite3.Connection, conv: str, users: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in _chunks(users):
            marks = ",".join("?" * len(part))
            for uid, role in conn.execute(
                f"SELECT uid, role FROM members WHERE conv=? AND uid IN ({marks})", (conv, *part)
            ):
                out[uid] = role
        return out

    def _group(
        self, conn: sqlite3.Connection, ch: GroupChange, touched: Touched, readers: Readers
    ) -> GroupResult | TidingsError:
        """Apply one group operation and append its entry, all or nothing."""
        try:
            conn.execute("SAVEPOINT grp")
        except sqlite3.Error as exc:
            log.error("group operation failed for %s: %s", ch.conv, exc)
            return TidingsError("unavailable", "storage write failed", retry_after_ms=500)
        try:
            res: GroupResult | TidingsError = self._group_apply(conn, ch, touched, readers)
        except TidingsError as exc:
            res = exc
        except sqlite3.Error as exc:
            log.error("group operation failed for %s: %s", ch.conv, exc)
            self._seq.pop(ch.conv, None)
            res = TidingsError("internal", "storage error; the change was not applied")
        if isinstance(res, TidingsError):
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO grp")
                    conn.execute("RELEASE grp")
            return res
        conn.execute("RELEASE grp")
        return res

    def _group_apply(
        self, conn: sqlite3.Connection, ch: GroupChange, touched: Touched, readers: Readers
    ) -> GroupResult:
        now = self.clock.now_ms()
        first = conn.execute(
            "SELECT conv FROM messages WHERE sender=? AND cid=?", (ch.actor, ch.cid)
        ).fetchone()
        if first is not None:  # a retry: the first result, as it was
            if first[0] != ch.conv:
                raise TidingsError("conflict", f"cid {ch.cid!r} was already used elsewhere")
            rec = self._by_cid(conn, ch.actor, ch.cid)
            info = self._group_row(conn, ch.conv)
            if rec.type != GROUP_EVENT or info is None:
                raise TidingsError("conflict", f"cid {ch.cid!r} was already used for a message")
            return GroupResult(rec, info, dup=True)
        if ch.op == "create":
            return self._create_group(conn, ch, now, touched, readers)
        info = self._group_row(conn, ch.conv)
        if info is None:
            raise TidingsError("not_found", "no such group")
        actor = self._roles(conn, ch.conv, [ch.actor]).get(ch.actor)
        if ch.privileged and ch.op != "leave":  # the server API, but only owners hand over
            actor = SERVER
        check_manage(ch.op, actor, members_can_invite=info.members_can_invite)
        assert actor is not None
        body: dict[str, Any] = {"op": ch.op, "by": ch.actor}
        joined: tuple[str, ...] = ()
        left: tuple[str, ...] = ()
        users = list(dict.fromkeys(ch.users))
        if ch.op == "add":
            joined = self._add_members(conn, ch.conv, info, users, now)
            if not joined:
                return GroupResult(None, info)
            body.update(users=list(joined[:EVENT_USERS_SHOWN]), count=len(joined))
        elif ch.op in ("remove", "leave"):
            left = (ch.actor,) if ch.op == "leave" else tuple(users)
            if ch.op == "remove":
                roles = self._roles(conn, ch.conv, users)
                for uid in users:
                    check_over("remove", actor, roles.get(uid), uid == ch.actor)
            self._drop_members(conn, ch.conv, list(left), now)
            if ch.op == "remove":
                body.update(users=users, count=len(users))
        elif ch.op in ("role", "mute", "transfer"):
            roles = self._roles(conn, ch.conv, users)
            for uid in users:
                check_over(ch.op, actor, roles.get(uid), uid == ch.actor)
            if ch.op == "role":
                users = [u for u in users if roles[u] != ch.role]
                if not users:
                    return GroupResult(None, info)
                self._set(conn, ch.conv, users, "role", ch.role)
                body.update(users=users, role=role_name(ch.role))
            elif ch.op == "mute":
                self._set(conn, ch.conv, users, "muted_until", ch.until_ms)
                body.update(users=users, until=ch.until_ms)
            else:
                if len(users) != 1:
                    raise TidingsError("invalid", "transfer needs exactly one user")
                self._set(conn, ch.conv, [info.owner], "role", ADMIN)
                self._set(conn, ch.conv, users, "role", OWNER)
                conn.execute("UPDATE groups SET owner=? WHERE conv=?", (users[0], ch.conv))
                body.update(users=users, previous=info.owner)
        elif ch.op == "mute_all":
            on = bool(ch.fields.get("on"))
            if on == info.muted_all:
                return GroupResult(None, info)
            conn.execute("UPDATE groups SET muted_all=? WHERE conv=?", (int(on), ch.conv))
            body.update(on=on)
        elif ch.op == "profile":
            current = msgspec.structs.asdict(info)
            changed = {
                k: v for k, v in ch.fields.items() if k in PROFILE_FIELDS and current[k] != v
            }
            if not changed:
                return GroupResult(None, info)
            sets = ", ".join(f"{k}=?" for k in changed)
            conn.execute(
                f"UPDATE groups SET {sets} WHERE conv=?",
                (*(int(v) if isinstance(v, bool) else v for v in changed.values()), ch.conv),
            )
            body.update(changed)
        else:
            raise TidingsError("invalid", f"unknown group operation {ch.op[:32]!r}")
        return self._group_entry(conn, ch, body, joined, left, touched, readers)

    def _group_entry(
        self,
        conn: sqlite3.Connection,
        ch: GroupChange,
        body: dict[str, Any],
        joined: tuple[str, ...],
        left: tuple[str, ...],
        touched: Touched,
        readers: Readers,
    ) -> GroupResult:
        """Append the entry that records the operation (not counted toward unread)."""
        msg = NewMessage(
            conv=ch.conv,
            sender=ch.actor,
            dev=ch.dev,
            cid=ch.cid,
            type=GROUP_EVENT,
            body=body,
            body_bytes=_pack(body),
            members=(),
            counted=False,
            reads=not ch.privileged,
            privileged=ch.privileged,
        )
        res = self._append(conn, msg, touched, readers)
        if isinstance(res, TidingsError):
            raise res
        info = self._group_row(conn, ch.conv)
        assert info is not None
        return GroupResult(res.record, info, joined, left)

    def _set(self, conn: sqlite3.Connection, conv: str, users: list[str], col: str, v: int) -> None:
        conn.executemany(
            f"UPDATE members SET {col}=? WHERE conv=? AND uid=?", [(v, conv, u) for u in users]
        )

    def _create_group(
        self,
        conn: sqlite3.Connection,
        ch: GroupChange,
        now: int,
        touched: Touched,
        readers: Readers,
    ) -> GroupResult:
        if conn.execute("SELECT 1 FROM conversations WHERE id=?", (ch.conv,)).fetchone():
            raise TidingsError("conflict", "that group id is taken")
        users = list(dict.fromkeys((ch.actor, *ch.users)))
        if len(users) > ch.max_members:
            raise TidingsError("group_full", f"a group holds at most {ch.max_members} members")
        self._check_users(conn, users)
        conn.execute(
            "INSERT INTO conversations (id, kind, created_ms) VALUES (?,?,?)",
            (ch.conv, KIND_GROUP, now),
        )
        f = ch.fields
        conn.execute(
            "INSERT INTO groups (conv, owner, name, avatar, intro, announcement, "
            "members_can_invite, history_visible, max_members, member_count, created_ms) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                ch.conv,
                ch.actor,
                f.get("name", ""),
                f.get("avatar", ""),
                f.get("intro", ""),
                f.get("announcement", ""),
                int(f.get("members_can_invite", True)),
                int(ch.history_visible),
                ch.max_members,
                len(users),
                now,
            ),
        )
        conn.executemany(
            "INSERT INTO members (conv, uid, role, joined_ms) VALUES (?,?,?,?)",
            [(ch.conv, u, OWNER if u == ch.actor else MEMBER, now) for u in users],
        )
        others = users[1:]
        body: dict[str, Any] = {
            "op": "create",
            "by": ch.actor,
            "name": f.get("name", ""),
            "users": others[:EVENT_USERS_SHOWN],
            "count": len(others),
        }
        return self._group_entry(conn, ch, body, tuple(users), (), touched, readers)

    def _check_users(self, conn: sqlite3.Connection, users: list[str]) -> None:
        for part in _chunks(users):
            marks = ",".join("?" * len(part))
            found = {
                r[0] for r in conn.execute(f"SELECT uid FROM users WHERE uid IN ({marks})", part)
            }
            for uid in part:
                if uid not in found:
                    raise TidingsError("not_found", f"no such user {uid!r}")

    def _add_members(
        self, conn: sqlite3.Connection, conv: str, info: GroupInfo, users: list[str], now: int
    ) -> tuple[str, ...]:
        existing = self._roles(conn, conv, users)
        new = [u for u in users if u not in existing]
        if not new:
            return ()
        if info.member_count + len(new) > info.max_members:
            raise TidingsError("group_full", f"the group holds at most {info.max_members} members")
        self._check_users(conn, new)
        seq, counted = self._position(conn, conv)
        # They start with nothing unread; without visible history they see their own
        # add entry (seq + 1) onwards.
        floor = 0 if info.history_visible else seq
        conn.executemany(
            "INSERT INTO members (conv, uid, role, joined_seq, joined_ms, read_seq, read_counted, "
            "added_seq) VALUES (?,?,?,?,?,?,?,?)",
            [(conv, u, MEMBER, floor, now, seq, counted, seq) for u in new],
        )
        conn.execute(
            "UPDATE groups SET member_count = member_count + ? WHERE conv=?", (len(new), conv)
        )
        return tuple(new)

    def _drop_members(
        self, conn: sqlite3.Connection, conv: str, users: list[str], now: int
    ) -> None:
        seq = self._position(conn, conv)[0] + 1  # the entry that records it
        conn.executemany("DELETE FROM members WHERE conv=? AND uid=?", [(conv, u) for u in users])
        conn.execute(
            "UPDATE groups SET member_count = member_count - ? WHERE conv=?", (len(users), conv)
        )
        # Their devices learn it from sync too: the conversation is gone for them.
        conn.executemany(
            "INSERT INTO user_changes (uid, conv, kind, value, ts) VALUES (?,?,?,?,?)",
            [(u, conv, "left", seq, now) for u in users],
        )

    # ------------------------------------------------------------------ reads

    async def left_since(self, uid: str, after: int, upto: int) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT conv FROM user_changes WHERE uid=? AND version > ? "
                "AND version <= ? AND kind='left' ORDER BY conv",
                (uid, after, upto),
            )
            return [r[0] for r in rows]

        return await self._read(op) if upto > after else []

    async def group_info(self, conv: str) -> GroupInfo | None:
        def op(conn: sqlite3.Connection) -> GroupInfo | None:
            row = conn.execute(
                f"SELECT {_INFO_COLS}, c.last_seq FROM groups g "
                "JOIN conversations c ON c.id = g.conv WHERE g.conv=?",
                (conv,),
            ).fetchone()
            return None if row is None else _info(row, row[12])

        return await self._read(op)

    async def membership(self, conv: str, uid: str) -> MemberRecord | None:
        def op(conn: sqlite3.Connection) -> MemberRecord | None:
            row = conn.execute(
                f"SELECT {_MEMBER_COLS} FROM members WHERE conv=? AND uid=?", (conv, uid)
            ).fetchone()
            return None if row is None else MemberRecord(*row)

        return await self._read(op)

    async def members_page(self, conv: str, after: str, limit: int) -> list[MemberRecord]:
        def op(conn: sqlite3.Connection) -> list[MemberRecord]:
            rows = conn.execute(
                f"SELECT {_MEMBER_COLS} FROM members WHERE conv=? AND uid > ? ORDER BY uid LIMIT ?",
                (conv, after, limit),
            )
            return [MemberRecord(*r) for r in rows]

        return await self._read(op)

    async def member_snapshot(self, conv: str) -> tuple[int, list[tuple[str, int]]]:
        def op(conn: sqlite3.Connection) -> tuple[int, list[tuple[str, int]]]:
            conn.execute("BEGIN")  # one snapshot for both reads
            try:
                row = conn.execute("SELECT last_seq FROM conversations WHERE id=?", (conv,))
                found = row.fetchone()
                uids = [
                    (r[0], r[1])
                    for r in conn.execute(
                        "SELECT uid, added_seq FROM members WHERE conv=?", (conv,)
                    )
                ]
            finally:
                conn.execute("COMMIT")
            return (found[0] if found else 0), uids

        return await self._read(op)

    async def read_counts(self, conv: str, seqs: list[int], readers_up_to: int) -> list[ReadCount]:
        def op(conn: sqlite3.Connection) -> list[ReadCount]:
            size = conn.execute("SELECT member_count FROM groups WHERE conv=?", (conv,)).fetchone()
            listing = size is not None and size[0] <= readers_up_to
            out = []
            for seq in seqs:
                row = conn.execute(
                    "SELECT sender FROM messages WHERE conv=? AND seq=?", (conv, seq)
                ).fetchone()
                if row is None:
                    raise TidingsError("not_found", f"no entry {seq} in this conversation")
                (count,) = conn.execute(
                    "SELECT count(*) FROM members WHERE conv=? AND read_seq >= ? AND uid != ? "
                    "AND added_seq < ?",
                    (conv, seq, row[0], seq),
                ).fetchone()
                readers = None
                if listing:
                    readers = [
                        r[0]
                        for r in conn.execute(
                            "SELECT uid FROM members WHERE conv=? AND read_seq >= ? AND uid != ? "
                            "AND added_seq < ? ORDER BY uid",
                            (conv, seq, row[0], seq),
                        )
                    ]
                out.append(ReadCount(seq, count, readers))
            return out

        return await self._read(op)

    async def peek_read(self, uid: str, conv: str, seq: int) -> ReadState:
        # The committed view: the writer's in-memory counters are not the readers' to see.
        return await self._read(lambda conn: read_target(conn, uid, conv, seq, None))

    async def write_reads(self, reads: list[tuple[str, str, int]]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            now = self.clock.now_ms()
            for uid, conv, seq in reads:
                cur = conn.execute(
                    "UPDATE members SET read_seq=?, read_counted="
                    "(SELECT ctotal FROM messages WHERE conv=? AND seq=?) "
                    "WHERE conv=? AND uid=? AND read_seq < ?",
                    (seq, conv, seq, conv, uid, seq),
                )
                if cur.rowcount:
                    conn.execute(
                        "INSERT INTO user_changes (uid, conv, kind, value, ts) VALUES (?,?,?,?,?)",
                        (uid, conv, "read", seq, now),
                    )

        if reads:
            await self._write(op)
