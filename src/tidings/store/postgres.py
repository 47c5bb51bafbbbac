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
import functools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from tidings.clock import Clock
from tidings.domain.groups import MEMBER, check_post, is_group
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
from tidings.store.pgconn import Db, keep_session
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


class _FastFailed(Exception):
    """`tidings_append_batch` failed (not for a deadlock or a lost database): the batch
    goes again by the general path, where a message that fails fails alone."""


_SLOW: Any = object()  # a write `tidings_append_batch` left to the general path
_STALE: Any = object()  # ... not appended: its message id was not above the last one
_STALE_TRIES = 3  # calls of tidings_append_batch for one batch before the general path
_LINGER_UNTIL = 16  # writes waiting that make a batch without lingering
_WRITER_LATE_S = 0.02  # a batch in flight this long while others wait: another writer
_APPEND_BATCH = "SELECT * FROM tidings_append_batch($1, $2, $3, $4, $5)"
_BLOCKED = "the recipient does not accept your messages"


def _clean(text: str) -> bool:
    """Text PostgreSQL takes (no NUL, valid UTF-8): else the whole batch statement would
    fail for one message."""
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _plain(what: Any) -> bool:
    """A message `tidings_append_batch` appends: no recall or edit, no group entry."""
    return (
        isinstance(what, NewMessage)
        and what.amend is None
        and what.type != GROUP_EVENT
        and _clean(what.cid)
        and _clean(what.dev)
        and _clean(what.sender)
        and _clean(what.type)
        and (what.blocker is None or _clean(what.blocker))
    )


def _appended(msg: NewMessage, seq: int, mid: int, ts: int, ctotal: int) -> MessageRecord:
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
        n=ctotal,
    )


def _refusal(status: str, aux: int | None, now: int, privileged: bool) -> TidingsError:
    """The error for a refusal `tidings_append_batch` answered (group rules worded by
    `check_post`, the rule the function applies)."""
    if status == "blocked":
        return TidingsError("blocked", _BLOCKED)
    try:
        if status == "not_member":
            check_post(None, 0, False, now, privileged=privileged)
        elif status == "muted":
            check_post(MEMBER, aux or 0, False, now, privileged=False)
        elif status == "muted_all":
            check_post(MEMBER, 0, True, now, privileged=False)
    except TidingsError as exc:
        return exc
    log.error("unexpected batch append answer %r", status)
    return TidingsError("internal", "storage error")


def _dup_answer(msg: NewMessage, row: Any) -> AppendResult | TidingsError:
    """The answer to a message whose (sender, cid) is stored already as ``row``."""
    same = (
        row[0] == msg.conv
        and row[6] == msg.type
        and bytes(row[7]) == msg.body_bytes
        and row[9] == msg.flags
        and row[10] == (_pack(list(msg.mentions)) if msg.mentions else None)
        and row[11] == msg.reply_to
    )
    if not same:
        return TidingsError("conflict", f"cid {msg.cid!r} was already used for a different message")
    return AppendResult(record(row), True)


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

    # ------------------------------------------------------------------ messages: write

    def append_message(self, msg: NewMessage) -> asyncio.Future[AppendResult]:
        return self._enqueue(msg.conv, msg, shed=True)

    def apply_group(self, change: GroupChange) -> asyncio.Future[GroupResult]:
        return self._enqueue(change.conv, change, shed=False)

    def _enqueue(
        self, conv: str, what: NewMessage | GroupChange, *, shed: bool
    ) -> asyncio.Future[Any]:
        """Queue a write of conversation ``conv``. A writer takes what is queued, of many
        conversations at once, into one batch (see `_write`); a conversation with a batch
        in flight waits for it to finish, so this process's writes of a conversation
        commit in the order they were submitted."""
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
            queue = self._queues[conv] = collections.deque()
        queue.append((what, fut))
        self._queued += 1
        if conv not in self._busy:
            self._ready[conv] = None
        if self._waking:
            pass  # a writer about to start takes it
        elif not self._writers:
            self._start_writer()
        elif len(self._writers) < self.max_writers and self._late is None:
            self._late = self._loop.call_later(_WRITER_LATE_S, self._more_writers)
        return fut

    def _start_writer(self) -> None:
        # It starts on the next turn of the loop: what is submitted until then joins.
        self._waking = True
        self._writers.add(asyncio.ensure_future(self._writer()))

    def _more_writers(self) -> None:
        """One writer (bigger batches, fewer commits) until a batch has been in flight
        for _WRITER_LATE_S while others wait (a lock held elsewhere, a big group
        operation, a slow disk): then another writer takes what waits."""
        self._late = None
        if not self._ready or self._waking or len(self._writers) >= self.max_writers:
            return
        assert self._loop is not None
        oldest = min(self._flying.values(), default=None)
        wait = 0.0 if oldest is None else oldest + _WRITER_LATE_S - self._loop.time()
        if wait <= 0:
            self._start_writer()
        else:
            self._late = self._loop.call_later(wait, self._more_writers)

    def _take(self) -> list[tuple[str, Any, asyncio.Future[Any]]]:
        """The next batch: the ready conversations' queued writes, oldest conversation
        first, at most ``max_batch``; those conversations are busy until it is done."""
        batch: list[tuple[str, Any, asyncio.Future[Any]]] = []
        while self._ready and len(batch) < self.max_batch:
            conv = next(iter(self._ready))
            del self._ready[conv]
            queue = self._queues[conv]
            for _ in range(min(len(queue), self.max_batch - len(batch))):
                what, fut = queue.popleft()
                batch.append((conv, what, fut))
                self._queued -= 1
            if not queue:
                del self._queues[conv]
            self._busy.add(conv)
        return batch

    async def _writer(self) -> None:
        task = asyncio.current_task()
        self._waking = False
        try:
            first = True  # a writer's first batch goes at once
            while True:
                if not first and self.linger_s > 0 and 0 < self._queued < _LINGER_UNTIL:
                    # Writes arrive while one batch is written: wait a moment for more
                    # to join the next (a commit costs more than the messages in it).
                    await asyncio.sleep(self.linger_s)
                first = False
                batch = self._take()
                if not batch:
                    break
                assert self._loop is not None
                self._flying[id(batch)] = self._loop.time()
                try:
                    results = await self._write(batch)
                except BaseException:  # cancelled: never leave a caller hanging
                    results = [TidingsError("unavailable", "server is shutting down")] * len(batch)
                    raise
                finally:
                    del self._flying[id(batch)]
                    self._pending -= len(batch)
                    for conv in dict.fromkeys(op[0] for op in batch):
                        self._busy.discard(conv)
                        if conv in self._queues:
                            self._ready[conv] = None
                    for (_, _, fut), res in zip(batch, results, strict=True):
                        if fut.done():
                            continue
                        if isinstance(res, BaseException):
                            fut.set_exception(res)
                        else:
                            fut.set_result(res)
        finally:
            if task is not None:
                self._writers.discard(task)

    async def _write(self, batch: list[tuple[str, Any, asyncio.Future[Any]]]) -> list[Any]:
        """Write a batch; its results in order (a result or a TidingsError each), never
        raising. Plain messages go through `tidings_append_batch` (migration 0002): one
        statement, one round trip and one commit for all of them; those whose message id
        was not above their conversation's last one go again with ids drawn above it.
        The rest (recall and edit, group operations, a conversation's first message) and
        every later write of the same conversations follow in a transaction of their
        own, each in a savepoint (`_slow_batch`)."""
        fast: list[int] = []
        slow: list[int] = []
        held: set[str] = set()  # conversations whose later writes take the slow path
        for i, (conv, what, _) in enumerate(batch):
            if conv not in held and _plain(what):
                fast.append(i)
            else:
                held.add(conv)
                slow.append(i)
        results: list[Any] = [None] * len(batch)
        todo = fast
        for _ in range(_STALE_TRIES):
            if not todo:
                break
            try:
                out = await self._tx(
                    functools.partial(self._fast_batch, msgs=[batch[i][1] for i in todo]),
                    counted=False,
                    tx=False,
                    writer=True,
                )
            except _FastFailed:
                out = [_SLOW] * len(todo)
            except Exception as exc:  # never leave a caller hanging
                if not isinstance(exc, TidingsError):
                    log.exception("write batch failed")
                    exc = TidingsError("internal", "storage error")
                # What is left of the batch fails with it (its order kept).
                return [exc if res is None else res for res in results]
            stale = []
            for i, res in zip(todo, out, strict=True):
                if res is _STALE:  # ids drawn again, above the conversation's last one
                    stale.append(i)
                elif res is _SLOW:
                    slow.append(i)
                else:
                    results[i] = res
            todo = stale
        slow = sorted(slow + todo)
        if slow:
            ops = [batch[i] for i in slow]
            try:
                done = await self._tx(
                    functools.partial(self._slow_batch, ops=ops), counted=False, writer=True
                )
            except TidingsError as exc:
                done = [exc] * len(ops)
            except Exception:  # never leave a caller hanging
                log.exception("write batch failed")
                done = [TidingsError("internal", "storage error")] * len(ops)
            for i, res in zip(slow, done, strict=True):
                results[i] = res
        return results

    async def _fast_batch(self, db: Db, msgs: list[NewMessage]) -> list[Any]:
        """Append plain messages with one call of `tidings_append_batch` (a statement of
        its own: it commits by itself); per message its result, a TidingsError, `_SLOW`
        (left to `_slow_batch`) or `_STALE` (to send again: the id generator is moved
        past the conversation's last id). Raises `_FastFailed` if the statement fails
        for another reason than a deadlock or a lost database."""
        assert self._ids is not None, "worker id not leased"
        now = self.clock.now_ms()
        convs = list(dict.fromkeys(m.conv for m in msgs))
        index = {conv: n for n, conv in enumerate(convs, start=1)}
        mids = [self._ids.next(now) for _ in msgs]
        text: list[str | None] = []
        data: list[bytes | None] = []
        num: list[int | None] = []
        for m, mid in zip(msgs, mids, strict=True):  # laid out as the function reads them
            text += (m.sender, m.dev, m.cid, m.type, m.blocker)
            data += (m.body_bytes, _pack(list(m.mentions)) if m.mentions else None)
            bits = m.counted | m.reads << 1 | m.privileged << 2
            num += (index[m.conv], mid, m.flags, m.reply_to, bits)
        try:
            rows = await db.conn.fetch(_APPEND_BATCH, convs, text, data, num, now)
        except _RETRY:
            raise
        except asyncpg.PostgresError as exc:
            if isinstance(exc, _DOWN):
                raise
            log.warning("batch append failed, each message again alone: %s: %s", type(exc), exc)
            raise _FastFailed from exc
        assert len(rows) == len(msgs) + 1 and rows[-1][0] == "written", "batch answer"
        db.written += rows[-1][1]
        out: list[Any] = []
        dups: list[int] = []
        for i, (msg, row, mid) in enumerate(zip(msgs, rows, mids, strict=False)):
            status = row[0]
            if status == "ok":
                self.batched += 1
                out.append(AppendResult(_appended(msg, row[1], mid, now, row[2]), False))
            elif status == "slow":
                out.append(_SLOW)
            elif status == "stale":
                self._ids.bump(row[3])  # another process's clock is ahead
                out.append(_STALE)
            elif status == "dup":
                dups.append(i)
                out.append(None)
            else:
                out.append(_refusal(status, row[3], now, msg.privileged))
        if dups:
            await self._dup_answers(db, [msgs[i] for i in dups], out, dups)
        return out

    async def _dup_answers(
        self, db: Db, msgs: list[NewMessage], out: list[Any], where: list[int]
    ) -> None:
        """The originals of duplicates (committed: `_fast_batch`'s statement saw them),
        or the error to answer each with, into ``out`` at ``where``."""
        try:
            rows = await db.all(
                f"SELECT {_READ_COLS} FROM messages WHERE (sender, cid) IN "
                "(SELECT * FROM unnest(?::text[], ?::text[]))",
                [m.sender for m in msgs],
                [m.cid for m in msgs],
            )
        except _DOWN as exc:  # the batch is committed: only these go unanswered
            err = self._unavailable(exc)
            for i in where:
                out[i] = err
            return
        except asyncpg.PostgresError as exc:
            log.error("duplicate read failed: %s: %s", type(exc).__name__, exc)
            for i in where:
                out[i] = TidingsError("internal", "storage read failed")
            return
        found = {(r[3], r[5]): r for r in rows}
        for i, msg in zip(where, msgs, strict=True):
            row = found.get((msg.sender, msg.cid))
            if row is None:  # pragma: no cover - the conflict came from elsewhere
                out[i] = TidingsError("internal", "client id conflict without a row")
            else:
                out[i] = _dup_answer(msg, row)

    async def _slow_batch(
        self, db: Db, ops: list[tuple[str, Any, asyncio.Future[Any]]]
    ) -> list[Any]:
        """Writes one by one, each in a savepoint of its own: a refused one fails alone."""
        convs = sorted({op[0] for op in ops})
        if len(convs) > 1:  # lock order: ascending id, as tidings_append_batch
            await db.all(
                'SELECT 1 FROM conversations WHERE id = ANY(?::text[]) ORDER BY id COLLATE "C" '
                "FOR UPDATE",
                convs,
            )
        results: list[Any] = []
        for _, what, _ in ops:
            try:
                async with db.conn.transaction():  # a savepoint
                    if isinstance(what, GroupChange):
                        results.append(await self._group(db, what))
                    else:
                        results.append(await self._append(db, what))
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
            raise TidingsError("blocked", _BLOCKED)
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
        res = _dup_answer(msg, row)
        if isinstance(res, TidingsError):
            raise res
        return res

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
