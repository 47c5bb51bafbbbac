"""PostgreSQL store (asyncpg): the same contract as SQLite's, for several processes and
nodes writing at once.

Every write is one transaction on a pooled connection. A message append locks its
conversation's row (``SELECT ... FOR UPDATE``) before it takes ``last_seq + 1``, so
writers of one conversation, on any node, queue on that row: seqs are gapless (a
refused or failed append rolls back and burns nothing) and increase in commit order.
PostgreSQL's own group commit batches the WAL flushes of concurrent transactions.

Two orders that SQLite's single writer gives for free are kept explicitly:

* A user's change-log versions come from a counter on the user's row, taken under its
  lock, so each user's versions are in commit order (a shared sequence is not).
* Message ids are time-ordered per process, not in commit order across conversations.
  Each conversation's ids still increase (an id at or below the conversation's last one
  is redrawn above it), and ``sync_slack_ms`` tells the sync to look again at
  conversations whose last id lies up to that much below a device's watermark, so an
  append that committed late with an earlier id is not missed.

Errors: a lost or refused connection, or a server that is down, is ``unavailable``
(retryable, nothing acknowledged); deadlocks and serialization failures are retried.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from tidings.clock import Clock
from tidings.domain.groups import check_post, is_group
from tidings.domain.ids import MAX_WORKER, MessageIdGenerator, direct_members
from tidings.protocol.errors import TidingsError
from tidings.store.base import (
    EVENT_TYPES,
    GROUP_EVENT,
    Amend,
    AppendResult,
    AuthState,
    ConvRow,
    ConvSettings,
    ConvSummary,
    DeliveredMove,
    GroupChange,
    GroupResult,
    MessageRecord,
    NewMessage,
    ReadState,
    UserRecord,
    tombstone,
)
from tidings.store.migrations import migration_scripts
from tidings.store.pgconn import Db
from tidings.store.postgres_groups import PgGroups, not_member, read_target

log = logging.getLogger(__name__)
T = TypeVar("T")

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
_MSG_COLS = "conv, seq, mid, sender, dev, cid, type, body, ts, flags, mentions, reply_to"
_READ_COLS = _MSG_COLS + ", edit_version, recalled, ctotal"
KIND_DIRECT = 1
_EMPTY_BODY = _pack({})
_MIGRATION_LOCK = 0x7469_6469  # pg_advisory_lock key: one process migrates at a time
_RETRIES = 6
# Connection-level failures: the database is down, restarting, unreachable or full.
_DOWN = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # The client's own state after the connection broke mid-transaction.
    asyncpg.InternalClientError,
)
_RETRY = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


def record(row: Any) -> MessageRecord:
    return MessageRecord(
        conv=row[0],
        seq=row[1],
        mid=row[2],
        sender=row[3],
        dev=row[4],
        cid=row[5],
        type=row[6],
        body=_unpack(row[7]),
        ts=row[8],
        flags=row[9],
        mentions=tuple(_unpack(row[10])) if row[10] else (),
        reply_to=row[11],
        size=len(row[7]),
        edit_version=row[12],
        recalled=bool(row[13]),
        n=row[14],
    )


class Answer(Exception):
    """Raised inside a transaction to roll it back and answer ``value`` (a duplicate)."""

    def __init__(self, value: Any) -> None:
        super().__init__("answer")
        self.value = value


class PostgresStore(PgGroups):
    def __init__(
        self,
        dsn: str,
        clock: Clock,
        *,
        pool_size: int = 10,
        max_pending: int = 50_000,
        max_batch: int = 200,
        sync_slack_ms: int = 5_000,
        acquire_timeout_s: float = 5.0,
        command_timeout_s: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.clock = clock
        self.pool_size = pool_size
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.sync_slack_ms = sync_slack_ms
        self.acquire_timeout_s = acquire_timeout_s
        self.command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._ids: MessageIdGenerator | None = None
        self._pending = 0
        self._queues: dict[str, list[tuple[Any, asyncio.Future[Any]]]] = {}
        self._writers: set[asyncio.Task[None]] = set()
        self._commit_listeners: list[Callable[[], None]] = []
        self._commit_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._down_logged = False
        self.commits = 0  # statistics: committed write transactions
        self.rows_written = 0  # statistics: rows inserted, updated or deleted by commits
        self.retries = 0  # statistics: transactions retried after a deadlock

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            command_timeout=self.command_timeout_s,
            server_settings={"application_name": "tidings"},
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
        deadline = asyncio.get_running_loop().time() + 10
        while self._pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except (TimeoutError, *_DOWN):
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

    async def _tx(self, fn: Callable[[Db], Awaitable[T]], *, counted: bool = True) -> T:
        """Run ``fn`` in a transaction (retried on deadlock); TidingsError on refusal."""
        if self._pool is None or (self._closed and counted):
            raise TidingsError("unavailable", "server is shutting down")
        self._pending += counted
        try:
            for attempt in range(_RETRIES):
                try:
                    async with (
                        self._pool.acquire(timeout=self.acquire_timeout_s) as conn,
                        conn.transaction(),
                    ):
                        db = Db(conn)
                        res = await fn(db)
                except Answer as answer:
                    return answer.value  # type: ignore[no-any-return]
                except _RETRY:
                    self.retries += 1
                    if attempt == _RETRIES - 1:
                        raise TidingsError(
                            "unavailable", "storage busy, try again", retry_after_ms=100
                        ) from None
                    await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))
                    continue
                except TidingsError:
                    raise
                except _DOWN as exc:
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
        except _DOWN as exc:
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

    # ------------------------------------------------------------------ messages: write

    def append_message(self, msg: NewMessage) -> asyncio.Future[AppendResult]:
        return self._enqueue(msg.conv, lambda db: self._append(db, msg), shed=True)

    def apply_group(self, change: GroupChange) -> asyncio.Future[GroupResult]:
        return self._enqueue(change.conv, lambda db: self._group(db, change), shed=False)

    def _enqueue(
        self, conv: str, fn: Callable[[Db], Awaitable[Any]], *, shed: bool
    ) -> asyncio.Future[Any]:
        """Queue a write of conversation ``conv``. One writer per conversation in this
        process takes everything queued for it (in submission order) into one transaction,
        each in a savepoint of its own: this process's writes of a conversation commit in
        the order they were submitted, and a refused one fails alone."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._closed or self._pool is None:
            fut.set_exception(TidingsError("unavailable", "server is shutting down"))
            return fut
        if shed and self._pending >= self.max_pending:
            fut.set_exception(TidingsError("unavailable", "write queue full", retry_after_ms=200))
            return fut
        self._pending += 1
        queue = self._queues.get(conv)
        if queue is None:
            queue = self._queues[conv] = []
            self._writers.add(asyncio.ensure_future(self._conv_writer(conv, queue)))
        queue.append((fn, fut))
        return fut

    async def _conv_writer(self, conv: str, queue: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            while queue:
                batch = queue[: self.max_batch]
                del queue[: self.max_batch]
                try:
                    results = await self._tx(
                        functools.partial(self._run_batch, batch=batch), counted=False
                    )
                except TidingsError as exc:
                    results = [exc] * len(batch)
                except Exception:  # never leave a caller hanging
                    log.exception("write batch failed")
                    results = [TidingsError("internal", "storage error")] * len(batch)
                self._pending -= len(batch)
                for (_, fut), res in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(res, BaseException):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
        finally:
            del self._queues[conv]
            task = asyncio.current_task()
            if task is not None:
                self._writers.discard(task)

    async def _run_batch(self, db: Db, batch: list[tuple[Any, asyncio.Future[Any]]]) -> list[Any]:
        results: list[Any] = []
        for fn, _ in batch:
            try:
                async with db.conn.transaction():  # a savepoint
                    results.append(await fn(db))
            except Answer as answer:
                results.append(answer.value)
            except TidingsError as exc:
                results.append(exc)
            except _RETRY:
                raise  # the whole batch again
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _DOWN):
                    raise
                log.error("write failed: %s: %s", type(exc).__name__, exc)
                results.append(TidingsError("internal", "storage error; nothing was written"))
        return results

    def _next_mid(self, now: int, last_mid: int) -> int:
        assert self._ids is not None, "worker id not leased"
        mid = self._ids.next(now)
        if mid <= last_mid:  # another process wrote this conversation with a later clock
            self._ids.bump(last_mid)
            mid = self._ids.next(now)
        return mid

    async def _append(self, db: Db, msg: NewMessage) -> AppendResult:
        """Append in the caller's transaction; raises TidingsError on refusal and
        `Answer` with the original for a duplicate."""
        if msg.blocker is not None and await db.one(
            "SELECT 1 FROM blocks WHERE uid=? AND blocked=?", msg.blocker, msg.sender
        ):
            # A retry of a message stored before the block still gets its answer.
            if await db.one("SELECT 1 FROM messages WHERE sender=? AND cid=?", msg.sender, msg.cid):
                raise Answer(await self._duplicate(db, msg))
            raise TidingsError("blocked", "the recipient does not accept your messages")
        if msg.type != GROUP_EVENT and is_group(msg.conv):
            await self._check_group_post(db, msg)
        row = await db.one(
            "SELECT last_seq, counted, last_mid FROM conversations WHERE id=? FOR UPDATE",
            msg.conv,
        )
        if row is None:
            await self._create_conversation(db, msg)
            row = await db.one(
                "SELECT last_seq, counted, last_mid FROM conversations WHERE id=? FOR UPDATE",
                msg.conv,
            )
            assert row is not None
        seq, counted, last_mid = row[0], row[1], row[2]
        ctotal = counted + 1 if msg.counted else counted
        edit_version = 0
        now = self.clock.now_ms()
        if msg.amend is not None:
            if await db.one("SELECT 1 FROM messages WHERE sender=? AND cid=?", msg.sender, msg.cid):
                raise Answer(await self._duplicate(db, msg))
            edit_version = await self._amend(db, msg, msg.amend, now, seq)
        mid = self._next_mid(now, last_mid)
        inserted = await db.exe(
            f"INSERT INTO messages ({_MSG_COLS}, ctotal, target, edit_version) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (sender, cid) DO NOTHING",
            msg.conv,
            seq + 1,
            mid,
            msg.sender,
            msg.dev,
            msg.cid,
            msg.type,
            msg.body_bytes,
            now,
            msg.flags,
            _pack(list(msg.mentions)) if msg.mentions else None,
            msg.reply_to,
            ctotal,
            None if msg.amend is None else msg.amend.target_seq,
            edit_version,
        )
        if not inserted:
            raise Answer(await self._duplicate(db, msg))
        await db.exe(
            "UPDATE conversations SET last_seq=?, last_mid=?, last_ts=?, counted=? WHERE id=?",
            seq + 1,
            mid,
            now,
            ctotal,
            msg.conv,
        )
        if msg.reads:  # sending advances the sender's read position
            await db.exe(
                "UPDATE members SET read_seq=?, read_counted=? "
                "WHERE conv=? AND uid=? AND read_seq < ?",
                seq + 1,
                ctotal,
                msg.conv,
                msg.sender,
                seq + 1,
            )
        rec = MessageRecord(
            conv=msg.conv,
            seq=seq + 1,
            mid=mid,
            sender=msg.sender,
            dev=msg.dev,
            cid=msg.cid,
            type=msg.type,
            body=msg.body,
            ts=now,
            flags=msg.flags,
            mentions=msg.mentions,
            reply_to=msg.reply_to,
            size=len(msg.body_bytes),
            edit_version=edit_version,
            n=ctotal,
        )
        return AppendResult(rec, False)

    async def _check_group_post(self, db: Db, msg: NewMessage) -> None:
        row = await db.one(
            "SELECT m.role, m.muted_until, g.muted_all FROM groups g "
            "LEFT JOIN members m ON m.conv = g.conv AND m.uid = ? WHERE g.conv = ?",
            msg.sender,
            msg.conv,
        )
        if row is None:
            raise TidingsError("not_found", "no such group")
        try:
            check_post(
                row[0], row[1] or 0, bool(row[2]), self.clock.now_ms(), privileged=msg.privileged
            )
        except TidingsError:
            # A retry of a message stored before the sender left or was muted still gets
            # its original answer.
            if await db.one("SELECT 1 FROM messages WHERE sender=? AND cid=?", msg.sender, msg.cid):
                raise Answer(await self._duplicate(db, msg)) from None
            raise

    async def _amend(self, db: Db, msg: NewMessage, amend: Amend, now: int, last_seq: int) -> int:
        """Apply a recall or edit to its target entry; the target's edit version after it."""
        row = None
        if amend.target_seq <= last_seq:
            row = await db.one(
                "SELECT sender, ts, recalled, type, dev FROM messages WHERE conv=? AND seq=?",
                msg.conv,
                amend.target_seq,
            )
        if row is None:
            raise TidingsError("not_found", f"no entry {amend.target_seq} in this conversation")
        sender, ts, recalled, mtype, dev = row
        if sender != msg.sender or mtype == "system" or dev == "server":
            raise TidingsError("forbidden", f"only the sender can {amend.action} a message")
        if mtype == GROUP_EVENT:
            raise TidingsError(
                "forbidden", f"a group's membership entries cannot be {amend.action}ed"
            )
        if mtype in EVENT_TYPES:
            raise TidingsError("invalid", f"an event entry cannot be {amend.action}ed")
        if recalled:
            raise TidingsError("conflict", "the message was recalled")
        if amend.action == "recall":
            if now - ts > amend.window_ms:
                raise TidingsError(
                    "forbidden", f"messages can be recalled within {amend.window_ms // 1000} s"
                )
            await db.exe(
                "UPDATE messages SET recalled=1, body=? WHERE conv=? AND seq=?",
                _EMPTY_BODY,
                msg.conv,
                amend.target_seq,
            )
            # Earlier edit entries carry content too: a recall removes it from them.
            await db.exe(
                "UPDATE messages SET body=? WHERE conv=? AND target=? AND type='edit'",
                _pack({"seq": amend.target_seq}),
                msg.conv,
                amend.target_seq,
            )
            return 0
        new_body = amend.new_body or {}
        if mtype == "text" and not (isinstance(new_body.get("text"), str) and new_body["text"]):
            raise TidingsError("invalid", "an edit of a text message needs a non-empty text")
        version = await db.val(
            "UPDATE messages SET body=?, edit_version=edit_version+1 WHERE conv=? AND seq=? "
            "RETURNING edit_version",
            amend.new_body_bytes,
            msg.conv,
            amend.target_seq,
        )
        return int(version)

    async def _create_conversation(self, db: Db, msg: NewMessage) -> None:
        if not msg.members:
            raise TidingsError("not_found", f"no conversation {msg.conv!r}")
        found = {
            r[0]
            for r in await db.all(
                "SELECT uid FROM users WHERE uid = ANY(?::text[])", list(msg.members)
            )
        }
        missing = [m for m in msg.members if m not in found]
        if missing:
            raise TidingsError("not_found", f"no such user {missing[0]!r}")
        # Two first messages at once (from both members, or two nodes): one row wins.
        await db.exe(
            "INSERT INTO conversations (id, kind, created_ms) VALUES (?,?,?) "
            "ON CONFLICT (id) DO NOTHING",
            msg.conv,
            KIND_DIRECT,
            self.clock.now_ms(),
        )
        await db.many(
            "INSERT INTO members (conv, uid) VALUES (?,?) ON CONFLICT DO NOTHING",
            [(msg.conv, m) for m in dict.fromkeys(msg.members)],
        )

    async def _by_cid(self, db: Db, sender: str, cid: str) -> MessageRecord:
        row = await db.one(
            f"SELECT {_READ_COLS} FROM messages WHERE sender=? AND cid=?", sender, cid
        )
        assert row is not None
        return record(row)

    async def _duplicate(self, db: Db, msg: NewMessage) -> AppendResult:
        row = await db.one(
            f"SELECT {_READ_COLS} FROM messages WHERE sender=? AND cid=?", msg.sender, msg.cid
        )
        if row is None:  # pragma: no cover - the conflict came from elsewhere
            raise TidingsError("internal", "client id conflict without a row")
        same = (
            row[0] == msg.conv
            and row[6] == msg.type
            and bytes(row[7]) == msg.body_bytes
            and row[9] == msg.flags
            and row[10] == (_pack(list(msg.mentions)) if msg.mentions else None)
            and row[11] == msg.reply_to
        )
        if not same:
            raise TidingsError(
                "conflict", f"cid {msg.cid!r} was already used for a different message"
            )
        return AppendResult(record(row), True)

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
        async def op(db: Db) -> list[DeliveredMove]:
            now = self.clock.now_ms()
            moved = []
            todo = []
            for conv, uid, seq in positions:
                pair = direct_members(conv)
                if pair is None or pair[0] == pair[1] or uid not in pair:
                    continue
                todo.append((pair[1] if pair[0] == uid else pair[0], conv, uid, seq))
            for peer, conv, uid, seq in sorted(todo):  # lock order: the logged user's id
                last = await db.val("SELECT last_seq FROM conversations WHERE id=?", conv)
                # Capped here, before binding: an ack may name any seq (even past 2^63).
                target = min(seq, int(last or 0))
                n = await db.exe(
                    "UPDATE members SET delivered_seq=? "
                    "WHERE conv=? AND uid=? AND delivered_seq < ? AND read_seq < ?",
                    target,
                    conv,
                    uid,
                    target,
                    target,
                )
                if not n:
                    continue  # not past what is delivered or read already (or no member)
                await db.exe(
                    "DELETE FROM user_changes WHERE uid=? AND conv=? AND kind='peer_delivered'",
                    peer,
                    conv,
                )
                await self._log(db, peer, conv, "peer_delivered", target, now)
                blocked = await db.one("SELECT 1 FROM blocks WHERE uid=? AND blocked=?", peer, uid)
                moved.append(DeliveredMove(conv, uid, target, None if blocked else peer))
            return moved

        return await self._tx(op) if positions else []

    async def _summaries(
        self, db: Db, uid: str, where: str, params: tuple[Any, ...], limit: int
    ) -> list[ConvSummary]:
        rows = await db.all(
            "SELECT c.id, c.last_seq, c.last_mid, c.last_ts, c.counted - m.read_counted, "
            "m.read_seq, CASE WHEN c.kind = 1 THEN (SELECT max(p.read_seq) FROM members p "
            "             WHERE p.conv = c.id AND p.uid <> m.uid) END, "
            "m.muted, m.pinned, m.hidden_seq, m.draft, g.name, g.member_count, m.joined_seq, "
            "CASE WHEN c.kind = 1 THEN (SELECT max(greatest(p.delivered_seq, p.read_seq)) "
            "             FROM members p WHERE p.conv = c.id AND p.uid <> m.uid) END, "
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
            conv, last_seq, last_mid, last_ts, unread, read_seq, peer_read = row[:7]
            muted, pinned, hidden_seq, draft, title, size, floor, peer_delivered = row[7:15]
            direct = title is None  # groups have no "read up to N" of a peer
            last = record(row[15:30]) if row[15] is not None else None
            if last is not None and row[31]:
                last = tombstone(last)
            settings = ConvSettings(bool(muted), bool(pinned), hidden_seq >= last_seq, draft)
            # Notes to self: the only member is the peer too (delivered as far as read).
            peer_read = peer_read if peer_read is not None else read_seq if direct else 0
            out.append(
                ConvSummary(
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
            )
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
                f"SELECT {_READ_COLS} FROM messages WHERE conv=? AND seq<? AND seq>? "
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
                f"SELECT {_READ_COLS} FROM messages WHERE conv=? AND seq>? ORDER BY seq LIMIT ?",
                conv,
                after,
                limit,
            )
            return [record(r) for r in rows]

        return await self._read(op)

    async def messages_in(self, spans: list[tuple[str, int, int]]) -> list[MessageRecord]:
        async def op(db: Db) -> list[MessageRecord]:
            out: list[MessageRecord] = []
            sql = (
                f"SELECT {_READ_COLS} FROM messages WHERE conv=? AND seq>? AND seq<=? ORDER BY seq"
            )
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
