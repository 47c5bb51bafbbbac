"""Message appends on PostgreSQL, a mixin of `PostgresStore` (see its module's notes):
the queues per conversation, the batching writers, the batch function's fast path and
the general path (a savepoint per write) for what it leaves."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from tidings.clock import Clock
from tidings.domain.groups import MEMBER, check_post, is_group
from tidings.domain.ids import MessageIdGenerator
from tidings.protocol.errors import TidingsError
from tidings.store.base import (
    GROUP_EVENT,
    Amend,
    AppendResult,
    GroupChange,
    GroupResult,
    MessageRecord,
    NewMessage,
)
from tidings.store.pgconn import DOWN, RETRY, Answer, Db
from tidings.store.rows import (
    AMEND_TARGET_COLS,
    EMPTY_BODY,
    MSG_COLS,
    READ_COLS,
    amend_refusal,
    appended,
    pack,
    record,
)

log = logging.getLogger("tidings.store.postgres")
T = TypeVar("T")
KIND_DIRECT = 1


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
        and row[10] == (pack(list(msg.mentions)) if msg.mentions else None)
        and row[11] == msg.reply_to
    )
    if not same:
        return TidingsError("conflict", f"cid {msg.cid!r} was already used for a different message")
    return AppendResult(record(row), True)


class PgAppend:
    if TYPE_CHECKING:
        clock: Clock
        max_pending: int
        max_batch: int
        max_writers: int
        linger_s: float
        batched: int
        _ids: MessageIdGenerator | None
        _pool: asyncpg.Pool | None
        _loop: asyncio.AbstractEventLoop | None
        _closed: bool
        _pending: int
        _queues: dict[str, collections.deque[tuple[Any, asyncio.Future[Any]]]]
        _ready: dict[str, None]
        _busy: set[str]
        _writers: set[asyncio.Task[None]]
        _waking: bool
        _queued: int
        _flying: dict[int, float]
        _late: asyncio.TimerHandle | None

        async def _tx(
            self,
            fn: Callable[[Db], Awaitable[T]],
            *,
            counted: bool = True,
            tx: bool = True,
            writer: bool = False,
        ) -> T: ...

        def _unavailable(self, exc: BaseException) -> TidingsError: ...

        async def _group(self, db: Db, ch: GroupChange) -> GroupResult: ...

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
            data += (m.body_bytes, pack(list(m.mentions)) if m.mentions else None)
            bits = m.counted | m.reads << 1 | m.privileged << 2
            num += (index[m.conv], mid, m.flags, m.reply_to, bits)
        try:
            rows = await db.conn.fetch(_APPEND_BATCH, convs, text, data, num, now)
        except RETRY:
            raise
        except asyncpg.PostgresError as exc:
            if isinstance(exc, DOWN):
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
                out.append(AppendResult(appended(msg, row[1], mid, now, row[2]), False))
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
                f"SELECT {READ_COLS} FROM messages WHERE (sender, cid) IN "
                "(SELECT * FROM unnest(?::text[], ?::text[]))",
                [m.sender for m in msgs],
                [m.cid for m in msgs],
            )
        except DOWN as exc:  # the batch is committed: only these go unanswered
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
            except RETRY:
                raise  # the whole batch again
            except asyncpg.PostgresError as exc:
                if isinstance(exc, DOWN):
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
        row = await db.one(
            "SELECT last_seq, counted, last_mid FROM conversations WHERE id=? FOR UPDATE",
            msg.conv,
        )
        if msg.type != GROUP_EVENT and is_group(msg.conv):
            # After the lock: a removal or mute committed elsewhere is seen, not raced.
            await self._check_group_post(db, msg)
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
            f"INSERT INTO messages ({MSG_COLS}, ctotal, target, edit_version) "
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
            pack(list(msg.mentions)) if msg.mentions else None,
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
        return AppendResult(appended(msg, seq + 1, mid, now, ctotal, edit_version), False)

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
                f"SELECT {AMEND_TARGET_COLS} FROM messages WHERE conv=? AND seq=?",
                msg.conv,
                amend.target_seq,
            )
        refused = amend_refusal(row, msg, amend, now)
        if refused is not None:
            raise refused
        if amend.action == "recall":
            await db.exe(
                "UPDATE messages SET recalled=1, body=? WHERE conv=? AND seq=?",
                EMPTY_BODY,
                msg.conv,
                amend.target_seq,
            )
            # Earlier edit entries carry content too: a recall removes it from them.
            await db.exe(
                "UPDATE messages SET body=? WHERE conv=? AND target=? AND type='edit'",
                pack({"seq": amend.target_seq}),
                msg.conv,
                amend.target_seq,
            )
            return 0
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
            f"SELECT {READ_COLS} FROM messages WHERE sender=? AND cid=?", sender, cid
        )
        assert row is not None
        return record(row)

    async def _duplicate(self, db: Db, msg: NewMessage) -> AppendResult:
        row = await db.one(
            f"SELECT {READ_COLS} FROM messages WHERE sender=? AND cid=?", msg.sender, msg.cid
        )
        if row is None:  # pragma: no cover - the conflict came from elsewhere
            raise TidingsError("internal", "client id conflict without a row")
        res = _dup_answer(msg, row)
        if isinstance(res, TidingsError):
            raise res
        return res
