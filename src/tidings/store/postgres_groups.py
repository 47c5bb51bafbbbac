"""Groups on PostgreSQL: each operation is one transaction that locks the group's
conversation row first (so it is in commit order with the group's messages), applies
the change and appends the entry that records it. A mixin of `PostgresStore`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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
from tidings.store.pgconn import Db

T = TypeVar("T")
KIND_GROUP = 2
_pack = msgspec.msgpack.Encoder().encode
_INFO_COLS = (
    "g.conv, g.owner, g.name, g.avatar, g.intro, g.announcement, g.muted_all, "
    "g.members_can_invite, g.history_visible, g.max_members, g.member_count, g.created_ms"
)
_MEMBER_COLS = "uid, role, muted_until, joined_seq, joined_ms, read_seq"


def _info(row: Any, last_seq: int) -> GroupInfo:
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


async def not_member(db: Db, conv: str) -> TidingsError:
    """The error for a request of a non-member: `not_found` if there is no such
    conversation at all, else `forbidden`."""
    if await db.one("SELECT 1 FROM conversations WHERE id=?", conv) is None:
        return TidingsError("not_found", "no such conversation")
    return TidingsError("forbidden", "not a member of this conversation")


async def read_target(db: Db, uid: str, conv: str, seq: int, *, lock: bool) -> ReadState:
    """Where reading ``conv`` up to ``seq`` puts ``uid``'s position (capped at the last
    seq, never backwards), nothing written: ``changed`` false if it stays. With ``lock``
    the member row is locked for the caller's update."""
    row = await db.one(
        "SELECT m.read_seq, m.read_counted, c.last_seq, c.counted FROM members m "
        "JOIN conversations c ON c.id = m.conv WHERE m.conv=? AND m.uid=?"
        + (" FOR UPDATE OF m" if lock else ""),
        conv,
        uid,
    )
    if row is None:
        raise await not_member(db, conv)
    read_seq, read_counted, last_seq, counted = row
    target = min(seq, last_seq)
    if target <= read_seq:
        return ReadState(conv, uid, read_seq, counted - read_counted, False, 0, read_counted)
    ctotal = await db.val("SELECT ctotal FROM messages WHERE conv=? AND seq=?", conv, target)
    return ReadState(conv, uid, target, counted - ctotal, True, 0, ctotal)


class PgGroups:
    if TYPE_CHECKING:
        clock: Clock

        async def _append(self, db: Db, msg: NewMessage) -> AppendResult: ...

        async def _by_cid(self, db: Db, sender: str, cid: str) -> MessageRecord: ...

        async def _log(
            self, db: Db, uid: str, conv: str, kind: str, value: int, now: int
        ) -> int: ...

        async def _log_many(
            self, db: Db, entries: list[tuple[str, str, str, int]], now: int, *, replace: bool
        ) -> None: ...

        async def _read(self, fn: Callable[[Db], Awaitable[T]]) -> T: ...

        async def _snapshot(self, fn: Callable[[Db], Awaitable[T]]) -> T: ...

        async def _tx(self, fn: Callable[[Db], Awaitable[T]], *, counted: bool = True) -> T: ...

    # ------------------------------------------------------------------ writes

    async def _position(self, db: Db, conv: str) -> tuple[int, int]:
        """(last seq, counted total) of a conversation, as of this transaction."""
        row = await db.one("SELECT last_seq, counted FROM conversations WHERE id=?", conv)
        return (row[0], row[1]) if row else (0, 0)

    async def _group_row(self, db: Db, conv: str) -> GroupInfo | None:
        row = await db.one(f"SELECT {_INFO_COLS} FROM groups g WHERE conv=?", conv)
        return None if row is None else _info(row, (await self._position(db, conv))[0])

    async def _roles(self, db: Db, conv: str, users: list[str]) -> dict[str, int]:
        rows = await db.all(
            "SELECT uid, role FROM members WHERE conv=? AND uid = ANY(?::text[])", conv, users
        )
        return {r[0]: r[1] for r in rows}

    async def _group(self, db: Db, ch: GroupChange) -> GroupResult:
        """Apply one group operation and append its entry (the caller's transaction rolls
        all of it back on a refusal)."""
        now = self.clock.now_ms()
        first = await db.one("SELECT conv FROM messages WHERE sender=? AND cid=?", ch.actor, ch.cid)
        if first is not None:  # a retry: the first result, as it was
            if first[0] != ch.conv:
                raise TidingsError("conflict", f"cid {ch.cid!r} was already used elsewhere")
            rec = await self._by_cid(db, ch.actor, ch.cid)
            info = await self._group_row(db, ch.conv)
            if rec.type != GROUP_EVENT or info is None:
                raise TidingsError("conflict", f"cid {ch.cid!r} was already used for a message")
            return GroupResult(rec, info, dup=True)
        if ch.op == "create":
            return await self._create_group(db, ch, now)
        # The group's order: queue behind its other writers before reading anything.
        if await db.one("SELECT 1 FROM conversations WHERE id=? FOR UPDATE", ch.conv) is None:
            raise TidingsError("not_found", "no such group")
        info = await self._group_row(db, ch.conv)
        if info is None:
            raise TidingsError("not_found", "no such group")
        actor = (await self._roles(db, ch.conv, [ch.actor])).get(ch.actor)
        if ch.privileged and ch.op != "leave":  # the server API, but only owners hand over
            actor = SERVER
        check_manage(ch.op, actor, members_can_invite=info.members_can_invite)
        assert actor is not None
        body: dict[str, Any] = {"op": ch.op, "by": ch.actor}
        joined: tuple[str, ...] = ()
        left: tuple[str, ...] = ()
        users = list(dict.fromkeys(ch.users))
        if ch.op == "add":
            joined = await self._add_members(db, ch.conv, info, users, now)
            if not joined:
                return GroupResult(None, info)
            body.update(users=list(joined[:EVENT_USERS_SHOWN]), count=len(joined))
        elif ch.op in ("remove", "leave"):
            left = (ch.actor,) if ch.op == "leave" else tuple(users)
            if ch.op == "remove":
                roles = await self._roles(db, ch.conv, users)
                for uid in users:
                    check_over("remove", actor, roles.get(uid), uid == ch.actor)
            await self._drop_members(db, ch.conv, list(left), now)
            if ch.op == "remove":
                body.update(users=users, count=len(users))
        elif ch.op in ("role", "mute", "transfer"):
            roles = await self._roles(db, ch.conv, users)
            for uid in users:
                check_over(ch.op, actor, roles.get(uid), uid == ch.actor)
            if ch.op == "role":
                users = [u for u in users if roles[u] != ch.role]
                if not users:
                    return GroupResult(None, info)
                await self._set(db, ch.conv, users, "role", ch.role)
                body.update(users=users, role=role_name(ch.role))
            elif ch.op == "mute":
                await self._set(db, ch.conv, users, "muted_until", ch.until_ms)
                body.update(users=users, until=ch.until_ms)
            else:
                if len(users) != 1:
                    raise TidingsError("invalid", "transfer needs exactly one user")
                await self._set(db, ch.conv, [info.owner], "role", ADMIN)
                await self._set(db, ch.conv, users, "role", OWNER)
                await db.exe("UPDATE groups SET owner=? WHERE conv=?", users[0], ch.conv)
                body.update(users=users, previous=info.owner)
        elif ch.op == "mute_all":
            on = bool(ch.fields.get("on"))
            if on == info.muted_all:
                return GroupResult(None, info)
            await db.exe("UPDATE groups SET muted_all=? WHERE conv=?", int(on), ch.conv)
            body.update(on=on)
        elif ch.op == "profile":
            current = msgspec.structs.asdict(info)
            changed = {
                k: v for k, v in ch.fields.items() if k in PROFILE_FIELDS and current[k] != v
            }
            if not changed:
                return GroupResult(None, info)
            sets = ", ".join(f"{k}=?" for k in changed)
            await db.exe(
                f"UPDATE groups SET {sets} WHERE conv=?",
                *(int(v) if isinstance(v, bool) else v for v in changed.values()),
                ch.conv,
            )
            body.update(changed)
        else:
            raise TidingsError("invalid", f"unknown group operation {ch.op[:32]!r}")
        return await self._group_entry(db, ch, body, joined, left)

    async def _group_entry(
        self,
        db: Db,
        ch: GroupChange,
        body: dict[str, Any],
        joined: tuple[str, ...],
        left: tuple[str, ...],
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
        res = await self._append(db, msg)
        info = await self._group_row(db, ch.conv)
        assert info is not None
        return GroupResult(res.record, info, joined, left)

    async def _set(self, db: Db, conv: str, users: list[str], col: str, v: int) -> None:
        await db.exe(
            f"UPDATE members SET {col}=? WHERE conv=? AND uid = ANY(?::text[])", v, conv, users
        )

    async def _create_group(self, db: Db, ch: GroupChange, now: int) -> GroupResult:
        users = list(dict.fromkeys((ch.actor, *ch.users)))
        if len(users) > ch.max_members:
            raise TidingsError("group_full", f"a group holds at most {ch.max_members} members")
        await self._check_users(db, users)
        if not await db.exe(
            "INSERT INTO conversations (id, kind, created_ms) VALUES (?,?,?) "
            "ON CONFLICT (id) DO NOTHING",
            ch.conv,
            KIND_GROUP,
            now,
        ):
            raise TidingsError("conflict", "that group id is taken")
        f = ch.fields
        await db.exe(
            "INSERT INTO groups (conv, owner, name, avatar, intro, announcement, "
            "members_can_invite, history_visible, max_members, member_count, created_ms) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
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
        )
        await self._insert_members(
            db, [(ch.conv, u, OWNER if u == ch.actor else MEMBER, 0, now, 0, 0, 0) for u in users]
        )
        others = users[1:]
        body: dict[str, Any] = {
            "op": "create",
            "by": ch.actor,
            "name": f.get("name", ""),
            "users": others[:EVENT_USERS_SHOWN],
            "count": len(others),
        }
        return await self._group_entry(db, ch, body, tuple(users), ())

    async def _insert_members(self, db: Db, rows: list[tuple[Any, ...]]) -> None:
        """Many member rows in one statement (a bulk add of 100,000 is one round trip)."""
        cols: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
        if not cols:
            return
        await db.exe(
            "INSERT INTO members (conv, uid, role, joined_seq, joined_ms, read_seq, "
            "read_counted, added_seq) SELECT * FROM unnest(?::text[], ?::text[], ?::int[], "
            "?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[], ?::bigint[])",
            *cols,
        )

    async def _check_users(self, db: Db, users: list[str]) -> None:
        found = {
            r[0] for r in await db.all("SELECT uid FROM users WHERE uid = ANY(?::text[])", users)
        }
        for uid in users:
            if uid not in found:
                raise TidingsError("not_found", f"no such user {uid!r}")

    async def _add_members(
        self, db: Db, conv: str, info: GroupInfo, users: list[str], now: int
    ) -> tuple[str, ...]:
        existing = await self._roles(db, conv, users)
        new = [u for u in users if u not in existing]
        if not new:
            return ()
        if info.member_count + len(new) > info.max_members:
            raise TidingsError("group_full", f"the group holds at most {info.max_members} members")
        await self._check_users(db, new)
        seq, counted = await self._position(db, conv)
        # They start with nothing unread; without visible history they see their own
        # add entry (seq + 1) onwards.
        floor = 0 if info.history_visible else seq
        await self._insert_members(
            db, [(conv, u, MEMBER, floor, now, seq, counted, seq) for u in new]
        )
        await db.exe(
            "UPDATE groups SET member_count = member_count + ? WHERE conv=?", len(new), conv
        )
        return tuple(new)

    async def _drop_members(self, db: Db, conv: str, users: list[str], now: int) -> None:
        seq = (await self._position(db, conv))[0] + 1  # the entry that records it
        await db.exe("DELETE FROM members WHERE conv=? AND uid = ANY(?::text[])", conv, users)
        await db.exe(
            "UPDATE groups SET member_count = member_count - ? WHERE conv=?", len(users), conv
        )
        # Their devices learn it from sync too: the conversation is gone for them.
        for uid in sorted(users):  # lock order: ascending user id
            await self._log(db, uid, conv, "left", seq, now)

    # ------------------------------------------------------------------ reads

    async def left_since(self, uid: str, after: int, upto: int) -> list[str]:
        async def op(db: Db) -> list[str]:
            rows = await db.all(
                "SELECT DISTINCT conv FROM user_changes WHERE uid=? AND version > ? "
                "AND version <= ? AND kind='left' ORDER BY conv",
                uid,
                after,
                upto,
            )
            return [r[0] for r in rows]

        return await self._read(op) if upto > after else []

    async def group_info(self, conv: str) -> GroupInfo | None:
        async def op(db: Db) -> GroupInfo | None:
            row = await db.one(
                f"SELECT {_INFO_COLS}, c.last_seq FROM groups g "
                "JOIN conversations c ON c.id = g.conv WHERE g.conv=?",
                conv,
            )
            return None if row is None else _info(row, row[12])

        return await self._read(op)

    async def membership(self, conv: str, uid: str) -> MemberRecord | None:
        async def op(db: Db) -> MemberRecord | None:
            row = await db.one(
                f"SELECT {_MEMBER_COLS} FROM members WHERE conv=? AND uid=?", conv, uid
            )
            return None if row is None else MemberRecord(*row)

        return await self._read(op)

    async def members_page(self, conv: str, after: str, limit: int) -> list[MemberRecord]:
        async def op(db: Db) -> list[MemberRecord]:
            rows = await db.all(
                f"SELECT {_MEMBER_COLS} FROM members WHERE conv=? AND uid > ? ORDER BY uid LIMIT ?",
                conv,
                after,
                limit,
            )
            return [MemberRecord(*r) for r in rows]

        return await self._read(op)

    async def member_snapshot(self, conv: str) -> tuple[int, list[tuple[str, int]]]:
        async def op(db: Db) -> tuple[int, list[tuple[str, int]]]:
            last = await db.val("SELECT last_seq FROM conversations WHERE id=?", conv)
            rows = await db.all("SELECT uid, added_seq FROM members WHERE conv=?", conv)
            return int(last or 0), [(r[0], r[1]) for r in rows]

        return await self._snapshot(op)

    async def read_counts(self, conv: str, seqs: list[int], readers_up_to: int) -> list[ReadCount]:
        async def op(db: Db) -> list[ReadCount]:
            size = await db.val("SELECT member_count FROM groups WHERE conv=?", conv)
            listing = size is not None and size <= readers_up_to
            out = []
            for seq in seqs:
                sender = await db.val(
                    "SELECT sender FROM messages WHERE conv=? AND seq=?", conv, seq
                )
                if sender is None:
                    raise TidingsError("not_found", f"no entry {seq} in this conversation")
                count = await db.val(
                    "SELECT count(*) FROM members WHERE conv=? AND read_seq >= ? AND uid <> ? "
                    "AND added_seq < ?",
                    conv,
                    seq,
                    sender,
                    seq,
                )
                readers = None
                if listing:
                    readers = [
                        r[0]
                        for r in await db.all(
                            "SELECT uid FROM members WHERE conv=? AND read_seq >= ? AND uid <> ? "
                            "AND added_seq < ? ORDER BY uid",
                            conv,
                            seq,
                            sender,
                            seq,
                        )
                    ]
                out.append(ReadCount(seq, int(count), readers))
            return out

        return await self._snapshot(op)

    async def peek_read(self, uid: str, conv: str, seq: int) -> ReadState:
        return await self._read(lambda db: read_target(db, uid, conv, seq, lock=False))

    async def write_reads(self, reads: list[tuple[str, str, int]]) -> None:
        async def op(db: Db) -> None:
            moved: list[tuple[str, str, str, int]] = []
            # Lock order (as appends and group operations take them): member rows in
            # (conversation, user) order, then users' rows in user order.
            for uid, conv, seq in sorted(reads, key=lambda r: (r[1], r[0])):
                if await db.exe(
                    "UPDATE members SET read_seq=?, read_counted="
                    "(SELECT ctotal FROM messages WHERE conv=? AND seq=?) "
                    "WHERE conv=? AND uid=? AND read_seq < ?",
                    seq,
                    conv,
                    seq,
                    conv,
                    uid,
                    seq,
                ):
                    moved.append((uid, conv, "read", seq))
            if moved:
                await self._log_many(db, sorted(moved), self.clock.now_ms(), replace=False)

        if reads:
            await self._tx(op)
