"""PostgreSQL store (asyncpg): the same contract as SQLite's, for several processes and
nodes writing at once.

Every write is one transaction on a pooled connection. A message append locks its
conversation's row (``SELECT ... FOR UPDATE``) before it takes ``last_seq + 1``, so
writers of one conversation, on any node, queue on that row: seqs are gapless (a
refused or failed append rolls back and burns nothing) and increase in commit order.
PostgreSQL's own group commit batches the WAL flushes of concurrent transactions.

Writes are batched across conversations: a writer takes everything queued (of any
number of conversations, up to ``max_batch``) at once; a conversation with a batch in
flight waits for it, so this process's writes of a conversation commit in submission
order. The plain messages of a batch are appended by one call of the function
``tidings_append_batch`` (migration 0002): one statement, one round trip and one commit,
the batch's conversations locked in ascending id (no deadlocks between processes), each
message answered on its own (appended, duplicate, refused). What it leaves (a
conversation's first message, recalls and edits, group operations, and whatever
follows them in the same conversation) runs after it as before, one savepoint each.
A commit costs both sides far more than the messages in it, so batches are made big:
one writer runs while batches commit promptly, and after a batch it waits
``linger_ms`` for more to join the next while only a few are waiting (never before a
writer's first batch: a lone message goes at once); more writers start when a batch
has been in flight for a while (``_more_writers``).

Two orders that SQLite's single writer gives for free are kept explicitly:

* A user's change-log versions come from a counter on the user's row, taken under its
  lock, so each user's versions are in commit order (a shared sequence is not).
* Message ids are time-ordered per process, not in commit order across conversations.
  Each conversation's ids still increase (an id at or below the conversation's last one
  is redrawn above it), and ``sync_slack_ms`` tells the sync to look again at
  conversations whose last id lies up to that much below a device's watermark, so an
  append that committed late with an earlier id is not missed.

Lock order, for every transaction that takes several: conversations, then member rows
(ascending conversation and user), then users' rows (ascending user id).

Errors: a lost or refused connection, or a server that is down, is ``unavailable``
(retryable, nothing acknowledged); deadlocks and serialization failures are retried.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from tidings.clock import Clock
from tidings.domain.ids import MAX_WORKER, MessageIdGenerator, direct_members
from tidings.protocol.errors import TidingsError
from tidings.store.base import (
    AuthState,
    ConvRow,
    ConvSettings,
    ConvSummary,
    DeliveredMove,
    MessageRecord,
    ReadState,
    UserRecord,
    tombstone,
)
from tidings.store.migrations import migration_scripts
from tidings.store.pgconn import DOWN, RETRY, Answer, Db, keep_session
from tidings.store.postgres_append import PgAppend
from tidings.store.postgres_groups import PgGroups, not_member, read_target
from tidings.store.rows import READ_COLS, SUMMARY_COLS, conv_summary, deletions, record

log = logging.getLogger(__name__)
T = TypeVar("T")

_MIGRATION_LOCK = 0x7469_6469  # pg_advisory_lock key: one process migrates at a time
_RETRIES = 6
# Connection-level failures: the database is down, restarting, unreachable or full.


class PostgresStore(PgAppend, PgGroups):
    def __init__(
        self,
        dsn: str,
        clock: Clock,
        *,
        pool_size: int = 10,
        max_pending: int = 50_000,
        max_batch: int = 200,
        max_writers: int = 3,
        linger_ms: float = 2.0,
        sync_slack_ms: int = 5_000,
        acquire_timeout_s: float = 5.0,
        command_timeout_s: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.clock = clock
        self.pool_size = pool_size
        self.max_pending = max_pending
        self.max_batch = max_batch
        # Batches in flight at most (see `_more_writers`); the pool keeps at least one
        # connection for reads.
        self.max_writers = max(1, min(max_writers, pool_size - 1))
        # After a batch, while fewer than _LINGER_UNTIL writes wait, a writer waits this
        # long for more to join the next batch (not before a writer's first batch).
        self.linger_s = linger_ms / 1000
        self.sync_slack_ms = sync_slack_ms
        self.acquire_timeout_s = acquire_timeout_s
        self.command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._ids: MessageIdGenerator | None = None
        self._pending = 0
        # Writes queued per conversation; `_ready` lists (oldest first) the conversations
        # with queued writes and none in flight, `_busy` those in a batch in flight.
        self._queues: dict[str, collections.deque[tuple[Any, asyncio.Future[Any]]]] = {}
        self._ready: dict[str, None] = {}
        self._busy: set[str] = set()
        self._writers: set[asyncio.Task[None]] = set()
        self._waking = False  # a writer task is started and has not taken a batch yet
        self._queued = 0  # writes queued, not yet in a batch
        self._flying: dict[int, float] = {}  # batches in flight: when each started
        self._late: asyncio.TimerHandle | None = None  # `_more_writers` to come
        self._held: list[asyncpg.Connection] = []  # the writers' connections between batches
        self._commit_listeners: list[Callable[[], None]] = []
        self._commit_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._down_logged = False
        self.commits = 0  # statistics: committed write transactions
        self.rows_written = 0  # statistics: rows inserted, updated or deleted by commits
        self.retries = 0  # statistics: transactions retried after a deadlock
        self.batched = 0  # statistics: messages appended by tidings_append_batch

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            command_timeout=self.command_timeout_s,
            server_settings={"application_name": "tidings"},
            reset=keep_session,
        )
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                current = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
                for version, script in migration_scripts("migrations_pg"):
                    if version <= current:
                        continue
                    async with conn.transaction():
                        await conn.execute(script)
                        await conn.execute("INSERT INTO schema_version VALUES ($1)", version)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    def set_worker_id(self, worker_id: int) -> None:
        self._ids = MessageIdGenerator(worker_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._late is not None:
            self._late.cancel()
        deadline = asyncio.get_running_loop().time() + 10
        while self._pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._pool is not None:
            held, self._held = self._held, []
            for conn in held:
                await self._pool.release(conn)
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except (TimeoutError, *DOWN):
                self._pool.terminate()

    def backlog(self) -> int:
        return self._pending

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._commit_listeners.append(listener)

    def _committed(self) -> None:
        self.commits += 1
        if self._commit_listeners and not self._commit_scheduled and self._loop is not None:
            self._commit_scheduled = True
            self._loop.call_soon(self._fire_commit)

    def _fire_commit(self) -> None:
        self._commit_scheduled = False
        for listener in self._commit_listeners:
            listener()

    # ------------------------------------------------------------------ transactions

    def _unavailable(self, exc: BaseException) -> TidingsError:
        if not self._down_logged:
            log.error("PostgreSQL unavailable: %s: %s", type(exc).__name__, exc)
            self._down_logged = True
        return TidingsError("unavailable", "storage unavailable", retry_after_ms=1000)

    @contextlib.asynccontextmanager
    async def _connection(self, writer: bool) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. The writers keep theirs between batches (up to one each,
        a pool's acquisition and release cost more than a batch's statement); one that
        saw an error goes back to the pool, which resets or replaces it."""
        assert self._pool is not None
        if writer and self._held:
            conn = self._held.pop()
        else:
            conn = await self._pool.acquire(timeout=self.acquire_timeout_s)
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok and writer and not self._closed and len(self._held) < self.max_writers:
                self._held.append(conn)
            else:
                await self._pool.release(conn)

    async def _tx(
        self,
        fn: Callable[[Db], Awaitable[T]],
        *,
        counted: bool = True,
        tx: bool = True,
        writer: bool = False,
    ) -> T:
        """Run ``fn`` in a transaction (retried on deadlock); TidingsError on refusal.
        With ``tx`` false ``fn`` runs on a connection outside a transaction block: each
        of its statements commits by itself (a single statement that writes all).
        ``writer``: on a connection the batch writers keep."""
        if self._pool is None or (self._closed and counted):
            raise TidingsError("unavailable", "server is shutting down")
        self._pending += counted
        try:
            for attempt in range(_RETRIES):
                try:
                    async with self._connection(writer) as conn:
                        db = Db(conn)
                        if tx:
                            async with conn.transaction():
                                res = await fn(db)
                        else:
                            res = await fn(db)
                except Answer as answer:
                    return answer.value  # type: ignore[no-any-return]
                except RETRY:
                    self.retries += 1
                    if attempt == _RETRIES - 1:
                        raise TidingsError(
                            "unavailable", "storage busy, try again", retry_after_ms=100
                        ) from None
                    await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                except TidingsError:
                    raise
                except DOWN as exc:
                    raise self._unavailable(exc) from exc
                except asyncpg.PostgresError as exc:
                    log.error("write failed: %s: %s", type(exc).__name__, exc)
                    raise TidingsError("internal", "storage error; nothing was written") from exc
                self._down_logged = False
                self.rows_written += db.written
                self._committed()
                return res
            raise AssertionError("unreachable")
        finally:
            self._pending -= counted

    async def _read(self, fn: Callable[[Db], Awaitable[T]]) -> T:
        if self._closed or self._pool is None:
            raise TidingsError("unavailable", "server is shutting down")
        try:
            async with self._pool.acquire(timeout=self.acquire_timeout_s) as conn:
                return await fn(Db(conn))
        except TidingsError:
            raise
        except DOWN as exc:
            raise self._unavailable(exc) from exc
        except asyncpg.PostgresError as exc:
            log.error("read failed: %s: %s", type(exc).__name__, exc)
            raise TidingsError("unavailable", "storage read failed", retry_after_ms=500) from exc

    async def _snapshot(self, fn: Callable[[Db], Awaitable[T]]) -> T:
        """A read of several statements from one snapshot."""

        async def run(db: Db) -> T:
            async with db.conn.transaction(isolation="repeatable_read", readonly=True):
                return await fn(db)

        return await self._read(run)

    # ------------------------------------------------------------------ change log

    async def _log(self, db: Db, uid: str, conv: str, kind: str, value: int, now: int) -> int:
        """Append to ``uid``'s change log; its new version (0 if there is no such user).
        Callers that log for several users do so in ascending user id (lock order)."""
        version = await db.val(
            "UPDATE users SET change_version = change_version + 1 WHERE uid=? "
            "RETURNING change_version",
            uid,
        )
        if version is None:
            return 0
        db.written += 1  # the user's row (its version counter)
        await db.exe(
            "INSERT INTO user_changes (uid, version, conv, kind, value, ts) VALUES (?,?,?,?,?,?)",
            uid,
            version,
            conv,
            kind,
            value,
            now,
        )
        return int(version)

    async def _log_many(
        self, db: Db, entries: list[tuple[str, str, str, int]], now: int, *, replace: bool
    ) -> None:
        """`_log` for many (uid, conv, kind, value) entries at once, in a few statements:
        each user's row is locked in ascending user id and its counter moved once for all
        of its entries (given in ascending user id). With ``replace`` an entry takes the
        place of the user's earlier entry of that conversation and kind."""
        counts = collections.Counter(e[0] for e in entries)
        uids = sorted(counts)
        await db.all(
            'SELECT 1 FROM users WHERE uid = ANY(?::text[]) ORDER BY uid COLLATE "C" FOR UPDATE',
            uids,
        )
        rows = await db.all(
            "UPDATE users u SET change_version = u.change_version + v.n "
            "FROM unnest(?::text[], ?::bigint[]) AS v(uid, n) WHERE u.uid = v.uid "
            "RETURNING u.uid, u.change_version",
            uids,
            [counts[u] for u in uids],
        )
        db.written += len(rows)  # the users' rows (their version counters)
        next_version = {r[0]: r[1] - counts[r[0]] + 1 for r in rows}
        logged = [e for e in entries if e[0] in next_version]  # else no such user
        if replace:
            await db.exe(
                "DELETE FROM user_changes c USING unnest(?::text[], ?::text[], ?::text[]) "
                "AS v(uid, conv, kind) WHERE c.uid = v.uid AND c.conv = v.conv "
                "AND c.kind = v.kind",
                [e[0] for e in logged],
                [e[1] for e in logged],
                [e[2] for e in logged],
            )
        versions = []
        for uid, _, _, _ in logged:
            versions.append(next_version[uid])
            next_version[uid] += 1
        await db.exe(
            "INSERT INTO user_changes (uid, version, conv, kind, value, ts) "
            "SELECT v.*, ?::bigint FROM unnest(?::text[], ?::bigint[], ?::text[], ?::text[], "
            "?::bigint[]) AS v",
            now,
            [e[0] for e in logged],
            versions,
            [e[1] for e in logged],
            [e[2] for e in logged],
            [e[3] for e in logged],
        )

    # ------------------------------------------------------------------ users, devices

    async def put_user(
        self, uid: str, display: str, name: str, password_hash: str | None, now_ms: int
    ) -> tuple[UserRecord, bool]:
        async def op(db: Db) -> tuple[UserRecord, bool]:
            row = await db.one(
                "INSERT INTO users (uid, display, name, password_hash, created_ms) "
                "VALUES (?,?,?,?,?) ON CONFLICT (uid) DO UPDATE SET name=excluded.name, "
                "password_hash=coalesce(excluded.password_hash, users.password_hash) "
                "RETURNING uid, display, name, password_hash, created_ms, (xmax = 0)",
                uid,
                display,
                name,
                password_hash,
                now_ms,
            )
            assert row is not None
            return UserRecord(*row[:5]), bool(row[5])

        return await self._tx(op)

    async def create_user(
        self, uid: str, display: str, name: str, password_hash: str | None, now_ms: int
    ) -> UserRecord:
        async def op(db: Db) -> UserRecord:
            inserted = await db.exe(
                "INSERT INTO users (uid, display, name, password_hash, created_ms) "
                "VALUES (?,?,?,?,?) ON CONFLICT (uid) DO NOTHING",
                uid,
                display,
                name,
                password_hash,
                now_ms,
            )
            if not inserted:
                raise TidingsError("conflict", "that user id is taken")
            return UserRecord(uid, display, name, password_hash, now_ms)

        return await self._tx(op)

    async def get_user(self, uid: str) -> UserRecord | None:
        async def op(db: Db) -> UserRecord | None:
            row = await db.one(
                "SELECT uid, display, name, password_hash, created_ms FROM users WHERE uid=?", uid
            )
            return UserRecord(*row) if row else None

        return await self._read(op)

    async def users_exist(self, uids: list[str]) -> set[str]:
        async def op(db: Db) -> set[str]:
            rows = await db.all("SELECT uid FROM users WHERE uid = ANY(?::text[])", uids)
            return {r[0] for r in rows}

        return await self._read(op) if uids else set()

    async def upsert_device(self, uid: str, device: str, platform: str, now_ms: int) -> None:
        async def op(db: Db) -> None:
            await db.exe(
                "INSERT INTO devices (uid, device, platform, created_ms) VALUES (?,?,?,?) "
                "ON CONFLICT (uid, device) DO UPDATE SET platform=excluded.platform "
                "WHERE devices.platform <> excluded.platform",
                uid,
                device,
                platform,
                now_ms,
            )

        await self._tx(op)

    async def revoke_device(self, uid: str, device: str, before_ms: int) -> None:
        async def op(db: Db) -> None:
            await db.exe(
                "UPDATE devices SET revoked_before=greatest(revoked_before, ?) "
                "WHERE uid=? AND device=?",
                before_ms,
                uid,
                device,
            )

        await self._tx(op)

    async def revoke_token(self, jti: str, uid: str, device: str, expires_ms: int) -> None:
        async def op(db: Db) -> None:
            await db.exe(
                "INSERT INTO revoked_tokens (jti, uid, device, expires_ms) VALUES (?,?,?,?) "
                "ON CONFLICT (jti) DO NOTHING",
                jti,
                uid,
                device,
                expires_ms,
            )
            await db.exe("DELETE FROM revoked_tokens WHERE expires_ms < ?", self.clock.now_ms())

        await self._tx(op)

    async def auth_state(self, jti: str, uid: str, device: str) -> AuthState:
        async def op(db: Db) -> AuthState:
            row = await db.one(
                "SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti=?), "
                "(SELECT revoked_before FROM devices WHERE uid=? AND device=?)",
                jti,
                uid,
                device,
            )
            assert row is not None
            return AuthState(bool(row[0]), int(row[1] or 0))

        return await self._read(op)

    def login_state(self, jti: str, uid: str, device: str) -> asyncio.Future[tuple[AuthState, int]]:
        assert self._loop is not None
        return self._loop.create_task(self._login_state(jti, uid, device))

    async def _login_state(self, jti: str, uid: str, device: str) -> tuple[AuthState, int]:
        async def op(db: Db) -> tuple[AuthState, int]:
            row = await db.one(
                "SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti=?), "
                "(SELECT revoked_before FROM devices WHERE uid=? AND device=?), "
                "(SELECT max(c.last_mid) FROM members m JOIN conversations c "
                " ON c.id = m.conv WHERE m.uid=?)",
                jti,
                uid,
                device,
                uid,
            )
            assert row is not None
            return AuthState(bool(row[0]), int(row[1] or 0)), int(row[2] or 0)

        return await self._read(op)

    # ------------------------------------------------------------------ read state

    async def mark_read(self, uid: str, conv: str, seq: int) -> ReadState:
        async def op(db: Db) -> ReadState:
            state = await read_target(db, uid, conv, seq, lock=True)
            if not state.changed:
                return state
            target, ctotal = state.read_seq, state.read_n
            await db.exe(
                "UPDATE members SET read_seq=?, read_counted=? WHERE conv=? AND uid=?",
                target,
                ctotal,
                conv,
                uid,
            )
            now = self.clock.now_ms()
            logs = [(uid, "read")]
            if conv.startswith("d:"):
                # The other member's state changes too ("read up to N"): log it for them.
                peers = await db.all("SELECT uid FROM members WHERE conv=? AND uid <> ?", conv, uid)
                logs += [(r[0], "peer_read") for r in peers]
            version = 0
            for who, kind in sorted(logs):  # lock order: ascending user id
                v = await self._log(db, who, conv, kind, target, now)
                if who == uid:
                    version = v
            return msgspec.structs.replace(state, version=version)

        return await self._tx(op)

    async def write_delivered(self, positions: list[tuple[str, str, int]]) -> list[DeliveredMove]:
        want: dict[tuple[str, str], tuple[str, int]] = {}
        for conv, uid, seq in positions:
            pair = direct_members(conv)
            if pair is None or pair[0] == pair[1] or uid not in pair:
                continue
            # Capped here, before binding: an ack may name any seq (even past 2^63).
            seq = min(seq, 2**63 - 1)
            peer = pair[1] if pair[0] == uid else pair[0]
            if seq > want.get((conv, uid), ("", 0))[1]:
                want[(conv, uid)] = (peer, seq)
        if not want:
            return []
        keys = sorted(want)

        async def op(db: Db) -> list[DeliveredMove]:
            # Member rows first, in ascending (conversation, user) as the append batches
            # take them; then the users' change logs, in ascending user id.
            await db.all(
                "SELECT 1 FROM members WHERE (conv, uid) IN "
                "(SELECT * FROM unnest(?::text[], ?::text[])) "
                'ORDER BY conv COLLATE "C", uid COLLATE "C" FOR UPDATE',
                [k[0] for k in keys],
                [k[1] for k in keys],
            )
            rows = await db.all(
                "UPDATE members m SET delivered_seq = v.target FROM ("
                "  SELECT w.conv, w.uid, least(w.seq, c.last_seq) AS target "
                "  FROM unnest(?::text[], ?::text[], ?::bigint[]) AS w(conv, uid, seq) "
                "  JOIN conversations c ON c.id = w.conv) AS v "
                "WHERE m.conv = v.conv AND m.uid = v.uid "
                "AND m.delivered_seq < v.target AND m.read_seq < v.target "
                "RETURNING m.conv, m.uid, v.target",
                [k[0] for k in keys],
                [k[1] for k in keys],
                [want[k][1] for k in keys],
            )
            db.written += len(rows)
            # Not past what is delivered or read already (or no member): nothing to tell.
            moved = sorted((want[(r[0], r[1])][0], r[0], r[1], r[2]) for r in rows)
            if not moved:
                return []
            await self._log_many(
                db,
                [(peer, conv, "peer_delivered", target) for peer, conv, _, target in moved],
                self.clock.now_ms(),
                replace=True,
            )
            blocks = await db.all(
                "SELECT uid, blocked FROM blocks WHERE (uid, blocked) IN "
                "(SELECT * FROM unnest(?::text[], ?::text[]))",
                [m[0] for m in moved],
                [m[2] for m in moved],
            )
            blocked = {(r[0], r[1]) for r in blocks}
            return [
                DeliveredMove(conv, uid, target, None if (peer, uid) in blocked else peer)
                for peer, conv, uid, target in moved
            ]

        return await self._tx(op)

    async def _summaries(
        self, db: Db, uid: str, where: str, params: tuple[Any, ...], limit: int
    ) -> list[ConvSummary]:
        rows = await db.all(
            f"SELECT {SUMMARY_COLS.format(greatest='greatest')}, "
            "msg.conv, msg.seq, msg.mid, msg.sender, msg.dev, msg.cid, msg.type, msg.body, "
            "msg.ts, msg.flags, msg.mentions, msg.reply_to, msg.edit_version, msg.recalled, "
            "msg.ctotal, msg.target, "
            "EXISTS (SELECT 1 FROM deleted_for d WHERE d.uid = m.uid AND d.conv = c.id "
            "        AND d.seq IN (c.last_seq, coalesce(msg.target, -1))) "
            "FROM members m JOIN conversations c ON c.id = m.conv "
            "LEFT JOIN groups g ON g.conv = c.id "
            "LEFT JOIN messages msg ON msg.conv = c.id AND msg.seq = c.last_seq "
            f"WHERE m.uid=? AND c.last_seq > 0 {where} "
            "ORDER BY m.pinned DESC, c.last_ts DESC, c.id LIMIT ?",
            uid,
            *params,
            limit,
        )
        out = []
        for row in rows:
            last = record(row[15:30]) if row[15] is not None else None
            if last is not None and row[31]:  # deleted for this user
                last = tombstone(last)
            out.append(conv_summary(row, last))
        return out

    async def conversation_list(self, uid: str, limit: int) -> tuple[list[ConvSummary], int]:
        async def op(db: Db) -> tuple[list[ConvSummary], int]:
            out = await self._summaries(db, uid, "AND c.last_seq > m.hidden_seq", (), limit)
            badge = await db.val(
                "SELECT coalesce(sum(c.counted - m.read_counted), 0) FROM members m "
                "JOIN conversations c ON c.id = m.conv WHERE m.uid=? AND m.muted = 0",
                uid,
            )
            return out, int(badge)

        return await self._snapshot(op)

    async def conversation_states(self, uid: str, convs: list[str]) -> list[ConvSummary]:
        async def op(db: Db) -> list[ConvSummary]:
            return await self._summaries(db, uid, "AND c.id = ANY(?::text[])", (convs,), len(convs))

        return await self._read(op) if convs else []

    async def user_changes_since(self, uid: str, version: int, limit: int) -> tuple[list[str], int]:
        async def op(db: Db) -> tuple[list[str], int]:
            rows = await db.all(
                "SELECT conv, max(version) FROM user_changes WHERE uid=? AND version > ? "
                "GROUP BY conv ORDER BY max(version) LIMIT ?",
                uid,
                version,
                limit,
            )
            return [r[0] for r in rows], max((r[1] for r in rows), default=version)

        return await self._read(op)

    async def sync_point(self, uid: str) -> tuple[int, int]:
        async def op(db: Db) -> tuple[int, int]:
            row = await db.one(
                "SELECT (SELECT max(c.last_mid) FROM members m JOIN conversations c "
                "        ON c.id = m.conv WHERE m.uid=?), "
                "(SELECT change_version FROM users WHERE uid=?)",
                uid,
                uid,
            )
            assert row is not None
            return int(row[0] or 0), int(row[1] or 0)

        return await self._read(op)

    async def user_version(self, uid: str) -> int:
        async def op(db: Db) -> int:
            return int(await db.val("SELECT change_version FROM users WHERE uid=?", uid) or 0)

        return await self._read(op)

    async def update_settings(
        self,
        uid: str,
        conv: str,
        muted: bool | None,
        pinned: bool | None,
        hidden: bool | None,
        draft: str | None,
    ) -> ConvSettings:
        async def op(db: Db) -> ConvSettings:
            row = await db.one(
                "SELECT m.muted, m.pinned, m.hidden_seq, m.draft, c.last_seq FROM members m "
                "JOIN conversations c ON c.id = m.conv WHERE m.conv=? AND m.uid=? "
                "FOR UPDATE OF m",
                conv,
                uid,
            )
            if row is None:
                raise await not_member(db, conv)
            old_muted, old_pinned, hidden_seq, old_draft, last_seq = row
            if hidden is not None:
                hidden_seq = last_seq if hidden else 0
            new = (
                int(old_muted if muted is None else muted),
                int(old_pinned if pinned is None else pinned),
                hidden_seq,
                old_draft if draft is None else draft,
            )
            await db.exe(
                "UPDATE members SET muted=?, pinned=?, hidden_seq=?, draft=? "
                "WHERE conv=? AND uid=?",
                *new,
                conv,
                uid,
            )
            version = await self._log(db, uid, conv, "settings", 0, self.clock.now_ms())
            hidden_now = new[2] >= last_seq > 0
            return ConvSettings(
                bool(new[0]), bool(new[1]), hidden_now, new[3], version, new[2] if hidden_now else 0
            )

        return await self._tx(op)

    async def delete_for(self, uid: str, conv: str, seqs: list[int]) -> list[int]:
        async def op(db: Db) -> list[int]:
            last_seq = await db.val(
                "SELECT c.last_seq FROM members m JOIN conversations c ON c.id = m.conv "
                "WHERE m.conv=? AND m.uid=?",
                conv,
                uid,
            )
            if last_seq is None:
                raise await not_member(db, conv)
            wanted = sorted(set(seqs))
            for seq in wanted:
                if not 1 <= seq <= last_seq:
                    raise TidingsError("not_found", f"no entry {seq} in this conversation")
            # Recall and edit entries go with the entry they changed, not on their own.
            events = {
                r[0]
                for r in await db.all(
                    "SELECT seq FROM messages WHERE conv=? AND seq = ANY(?::bigint[]) "
                    "AND type IN ('recall', 'edit')",
                    conv,
                    wanted,
                )
            }
            done = []
            for seq in wanted:
                if seq in events:
                    continue
                if await db.exe(
                    "INSERT INTO deleted_for (uid, conv, seq) VALUES (?,?,?) "
                    "ON CONFLICT DO NOTHING",
                    uid,
                    conv,
                    seq,
                ):
                    done.append(seq)
            # One log entry per seq, so a device that was away learns which ones.
            now = self.clock.now_ms()
            for seq in done:
                await self._log(db, uid, conv, "deleted", seq, now)
            return done

        return await self._tx(op)

    async def deleted_in(self, uid: str, spans: dict[str, tuple[int, int]]) -> dict[str, set[int]]:
        async def op(db: Db) -> dict[str, set[int]]:
            out: dict[str, set[int]] = {}
            for conv, (lo, hi) in spans.items():
                rows = await db.all(
                    "SELECT seq FROM deleted_for WHERE uid=? AND conv=? AND seq BETWEEN ? AND ?",
                    uid,
                    conv,
                    lo,
                    hi,
                )
                if rows:
                    out[conv] = {r[0] for r in rows}
            return out

        return await self._read(op) if spans else {}

    async def deletions_since(
        self, uid: str, after: int, upto: int, limit: int
    ) -> tuple[dict[str, list[int]], int]:
        async def op(db: Db) -> tuple[dict[str, list[int]], int]:
            rows = await db.all(
                "SELECT conv, value, version FROM user_changes WHERE uid=? AND version > ? "
                "AND version <= ? AND kind='deleted' ORDER BY version LIMIT ?",
                uid,
                after,
                upto,
                limit + 1,
            )
            return deletions(rows, limit, after, upto)

        return await self._read(op) if upto > after else ({}, upto)

    # ------------------------------------------------------------------ presence

    async def contacts(self, uid: str) -> list[str]:
        async def op(db: Db) -> list[str]:
            rows = await db.all(
                "SELECT DISTINCT p.uid FROM members m JOIN members p ON p.conv = m.conv "
                "WHERE m.uid=? AND p.uid <> m.uid AND m.conv LIKE 'd:%' ORDER BY p.uid",
                uid,
            )
            return [r[0] for r in rows]

        return await self._read(op)

    async def set_presence_hidden(self, uid: str, hidden: bool) -> None:
        async def op(db: Db) -> None:
            await db.exe("UPDATE users SET presence_hidden=? WHERE uid=?", int(hidden), uid)

        await self._tx(op)

    async def presence_info(self, uids: list[str]) -> dict[str, tuple[bool, int]]:
        async def op(db: Db) -> dict[str, tuple[bool, int]]:
            rows = await db.all(
                "SELECT uid, presence_hidden, last_seen_ms FROM users WHERE uid = ANY(?::text[])",
                uids,
            )
            return {r[0]: (bool(r[1]), int(r[2])) for r in rows}

        return await self._read(op) if uids else {}

    async def set_last_seen(self, uid: str, ms: int) -> None:
        async def op(db: Db) -> None:
            await db.exe(
                "UPDATE users SET last_seen_ms=? WHERE uid=? AND last_seen_ms < ?", ms, uid, ms
            )

        await self._tx(op)

    # ------------------------------------------------------------------ block list

    async def set_block(self, uid: str, other: str, on: bool, now_ms: int) -> None:
        async def op(db: Db) -> None:
            if on:
                await db.exe(
                    "INSERT INTO blocks (uid, blocked, created_ms) VALUES (?,?,?) "
                    "ON CONFLICT DO NOTHING",
                    uid,
                    other,
                    now_ms,
                )
            else:
                await db.exe("DELETE FROM blocks WHERE uid=? AND blocked=?", uid, other)

        await self._tx(op)

    async def blocked_by(self, uid: str) -> list[str]:
        async def op(db: Db) -> list[str]:
            rows = await db.all("SELECT blocked FROM blocks WHERE uid=? ORDER BY blocked", uid)
            return [r[0] for r in rows]

        return await self._read(op)

    async def is_blocked(self, blocker: str, sender: str) -> bool:
        async def op(db: Db) -> bool:
            row = await db.one("SELECT 1 FROM blocks WHERE uid=? AND blocked=?", blocker, sender)
            return row is not None

        return await self._read(op)

    # ------------------------------------------------------------------ messages: read

    async def history(
        self, conv: str, before: int, limit: int, floor: int = 0
    ) -> list[MessageRecord]:
        async def op(db: Db) -> list[MessageRecord]:
            rows = await db.all(
                f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq<? AND seq>? "
                "ORDER BY seq DESC LIMIT ?",
                conv,
                before if 0 < before < 2**63 else 2**63 - 1,
                floor,
                limit,
            )
            return [record(r) for r in reversed(rows)]

        return await self._read(op)

    async def messages_after(self, conv: str, after: int, limit: int) -> list[MessageRecord]:
        async def op(db: Db) -> list[MessageRecord]:
            rows = await db.all(
                f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq>? ORDER BY seq LIMIT ?",
                conv,
                after,
                limit,
            )
            return [record(r) for r in rows]

        return await self._read(op)

    async def messages_in(self, spans: list[tuple[str, int, int]]) -> list[MessageRecord]:
        async def op(db: Db) -> list[MessageRecord]:
            out: list[MessageRecord] = []
            sql = f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq>? AND seq<=? ORDER BY seq"
            for conv, after, upto in spans:
                out.extend(record(r) for r in await db.all(sql, conv, after, upto))
            return out

        return await self._read(op) if spans else []

    async def changed_conversations(self, uid: str, since_mid: int, limit: int) -> list[ConvRow]:
        async def op(db: Db) -> list[ConvRow]:
            rows = await db.all(
                "SELECT c.id, c.last_seq, c.last_mid, c.last_ts, m.joined_seq FROM members m "
                "JOIN conversations c ON c.id = m.conv "
                "WHERE m.uid=? AND c.last_mid > ? ORDER BY c.last_mid LIMIT ?",
                uid,
                since_mid,
                limit,
            )
            return [ConvRow(*r) for r in rows]

        return await self._read(op)

    async def watermark(self, uid: str) -> int:
        async def op(db: Db) -> int:
            wm = await db.val(
                "SELECT max(c.last_mid) FROM members m JOIN conversations c ON c.id = m.conv "
                "WHERE m.uid=?",
                uid,
            )
            return int(wm or 0)

        return await self._read(op)

    async def is_member(self, conv: str, uid: str) -> bool:
        async def op(db: Db) -> bool:
            return (
                await db.one("SELECT 1 FROM members WHERE conv=? AND uid=?", conv, uid) is not None
            )

        return await self._read(op)

    async def conversation(self, conv: str) -> ConvRow | None:
        async def op(db: Db) -> ConvRow | None:
            row = await db.one(
                "SELECT id, last_seq, last_mid, last_ts FROM conversations WHERE id=?", conv
            )
            return ConvRow(*row) if row else None

        return await self._read(op)

    async def lease_worker_id(self, holder: str, now_ms: int, ttl_ms: int) -> int:
        async def op(db: Db) -> int:
            # One leaser at a time (concurrent starts of several workers).
            await db.exe("LOCK TABLE worker_leases IN SHARE ROW EXCLUSIVE MODE")
            await db.exe("DELETE FROM worker_leases WHERE expires_ms < ?", now_ms)
            wid = await db.val(
                "UPDATE worker_leases SET expires_ms=? WHERE holder=? RETURNING worker_id",
                now_ms + ttl_ms,
                holder,
            )
            if wid is not None:
                return int(wid)
            wid = await db.val(
                "SELECT min(w) FROM generate_series(0, ?::int) w "
                "WHERE w NOT IN (SELECT worker_id FROM worker_leases)",
                MAX_WORKER,
            )
            if wid is None:
                raise TidingsError("unavailable", "no free worker id")
            await db.exe(
                "INSERT INTO worker_leases (worker_id, holder, expires_ms) VALUES (?,?,?)",
                wid,
                holder,
                now_ms + ttl_ms,
            )
            return int(wid)

        return await self._tx(op)
