"""SQLite store: WAL, ``synchronous=FULL``, one writer thread with group commit.

Writes (messages and everything else) go through a queue to a single writer thread.
It takes every write waiting (up to ``max_batch``, optionally lingering ``linger_ms``
for more), runs them in one transaction and commits once: that commit's fsync makes the
whole batch durable, and only then are the callers' futures resolved. Per-conversation
seqs are kept in the writer's memory (it is the only writer) and written back to
``conversations`` once per batch. A failed statement rolls back only itself (SQLite's
statement atomicity), so a bad row burns no seq and fails no neighbour.

Reads run on a small thread pool, each thread with its own connection; WAL checkpoints
run on their own thread, never on the commit path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from tidings.clock import Clock
from tidings.domain.groups import check_post, is_group
from tidings.domain.ids import MAX_WORKER, MessageIdGenerator, direct_members
from tidings.protocol.errors import TidingsError
from tidings.store.base import (
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
    amend_target,
    tombstone,
)
from tidings.store.migrations import apply_sqlite
from tidings.store.rows import (
    AMEND_TARGET_COLS,
    EMPTY_BODY,
    MSG_COLS,
    READ_COLS,
    SUMMARY_COLS,
    amend_refusal,
    appended,
    conv_summary,
    deletions,
    record,
)
from tidings.store.sqlite_groups import SqliteGroups, not_member, read_target

READS_PER_THREAD = 16  # reads of one turn of the loop handed to one reader thread
log = logging.getLogger(__name__)
T = TypeVar("T")

_STOP = object()
_pack = msgspec.msgpack.Encoder().encode
KIND_DIRECT = 1


class _MsgOp:
    __slots__ = ("fut", "msg")

    def __init__(self, msg: NewMessage, fut: asyncio.Future[Any]) -> None:
        self.msg = msg
        self.fut = fut


class _GroupOp:
    __slots__ = ("change", "fut")

    def __init__(self, change: GroupChange, fut: asyncio.Future[Any]) -> None:
        self.change = change
        self.fut = fut


class _FnOp:
    __slots__ = ("fn", "fut")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], fut: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.fut = fut


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


class SqliteStore(SqliteGroups):
    sync_slack_ms = 0  # one writer: message ids commit in order

    def __init__(
        self,
        path: str,
        clock: Clock,
        *,
        readers: int = 2,
        max_batch: int = 1000,
        linger_ms: float = 0.0,
        max_pending: int = 50_000,
        checkpoint_interval_s: float = 0.1,
        wal_restart_bytes: int = 8 << 20,
    ) -> None:
        self.path = path
        self.clock = clock
        self.max_batch = max_batch
        self.linger_s = linger_ms / 1000.0
        self.max_pending = max_pending
        self.checkpoint_interval_s = checkpoint_interval_s
        self.wal_restart_bytes = wal_restart_bytes
        self._readers_n = readers
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._seq: dict[str, tuple[int, int]] = {}  # conv -> (last seq, counted total)
        self._blocks: set[tuple[str, str]] | None = None
        self._ids: MessageIdGenerator | None = None
        self._pending = 0
        self._max_mid = 0
        self._commit_listeners: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoint = threading.Event()
        self._local = threading.local()
        # Reader threads, each with its own connection, fed batches of reads through one
        # queue (no executor: its futures and semaphores cost more than these reads).
        self._read_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_threads: list[threading.Thread] = []
        self._reads_closed = False
        self._reads: list[tuple[Callable[[sqlite3.Connection], Any], Any]] = []
        self._reads_scheduled = False
        self._wconn: sqlite3.Connection | None = None
        self._closed = False
        self.wal_restarts = 0
        self.checkpoints = 0  # statistics: checkpoint rounds run
        self.batches = 0  # statistics: committed batches
        self.batched_ops = 0
        self.rows_written = 0  # statistics: rows inserted, updated or deleted by commits

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = _connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={self.wal_restart_bytes}")
        conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: the hot index pages stay cached
        apply_sqlite(conn)
        self._max_mid = int(
            conn.execute("SELECT max(last_mid) FROM conversations").fetchone()[0] or 0
        )
        self._wconn = conn
        self._read_threads = [
            threading.Thread(target=self._reader_main, name=f"sqlite-read-{i}", daemon=True)
            for i in range(self._readers_n)
        ]
        for t in self._read_threads:
            t.start()
        self._writer = threading.Thread(target=self._writer_main, name="sqlite-writer", daemon=True)
        self._writer.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_main, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def set_worker_id(self, worker_id: int) -> None:
        self._ids = MessageIdGenerator(worker_id, after=self._max_mid)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            await loop.run_in_executor(None, self._writer.join)
        # Resolve anything the writer handed back before it stopped.
        await asyncio.sleep(0)
        self._stop_checkpoint.set()
        if self._checkpointer is not None:
            await loop.run_in_executor(None, self._checkpointer.join)
        self._reads_closed = True
        for _ in self._read_threads:
            self._read_q.put(_STOP)
        for t in self._read_threads:
            await loop.run_in_executor(None, t.join)
        if self._wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._wconn.close()

    def backlog(self) -> int:
        return self._pending

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._commit_listeners.append(listener)

    # ------------------------------------------------------------------ writer side

    def _submit(self, op: _MsgOp | _FnOp | _GroupOp) -> None:
        if self._closed:
            op.fut.set_exception(TidingsError("unavailable", "server is shutting down"))
            return
        if self._pending >= self.max_pending and isinstance(op, _MsgOp):
            # Only message appends are shed: account and admin writes are rare and small.
            op.fut.set_exception(
                TidingsError("unavailable", "write queue full", retry_after_ms=200)
            )
            return
        self._pending += 1
        self._queue.put(op)

    def append_message(self, msg: NewMessage) -> asyncio.Future[AppendResult]:
        assert self._loop is not None
        fut: asyncio.Future[AppendResult] = self._loop.create_future()
        self._submit(_MsgOp(msg, fut))
        return fut

    def apply_group(self, change: GroupChange) -> asyncio.Future[GroupResult]:
        assert self._loop is not None
        fut: asyncio.Future[GroupResult] = self._loop.create_future()
        self._submit(_GroupOp(change, fut))
        return fut

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._submit(_FnOp(fn, fut))
        return await fut

    def _writer_main(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        stopping = False
        while not stopping:
            op = get()
            if op is _STOP:
                break
            batch = [op]
            if self.linger_s > 0:
                deadline = self.clock.monotonic() + self.linger_s
                while len(batch) < self.max_batch:
                    remaining = deadline - self.clock.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stopping = True
                        break
                    batch.append(nxt)
            while len(batch) < self.max_batch and not stopping:
                try:
                    nxt = get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                results = self._run_batch(batch)
            except Exception:  # never let the writer die: every later write would hang
                log.exception("write batch failed")
                assert self._wconn is not None
                results = self._fail_batch(self._wconn, len(batch), "storage error")
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch, results)
            except RuntimeError:  # loop closed: nobody is waiting any more
                return

    def _deliver(self, batch: list[_MsgOp | _FnOp | _GroupOp], results: list[Any]) -> None:
        self._pending -= len(batch)
        for op, res in zip(batch, results, strict=True):
            fut = op.fut
            if fut.cancelled():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
        for listener in self._commit_listeners:
            listener()

    def _run_batch(self, batch: list[_MsgOp | _FnOp | _GroupOp]) -> list[Any]:
        conn = self._wconn
        assert conn is not None
        results: list[Any] = []
        changes_before = conn.total_changes
        touched: dict[str, tuple[int, int, int, int]] = {}
        readers: dict[tuple[str, str], tuple[int, int]] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.error("cannot begin write transaction: %s", exc)
            err = TidingsError("unavailable", "storage unavailable", retry_after_ms=500)
            return [err] * len(batch)
        for op in batch:
            if isinstance(op, _MsgOp):
                results.append(self._append(conn, op.msg, touched, readers))
            elif isinstance(op, _GroupOp):
                results.append(self._group(conn, op.change, touched, readers))
            else:
                results.append(self._call(conn, op.fn))
            if not conn.in_transaction:
                # SQLite rolled the whole transaction back (disk full, I/O error): nothing
                # of this batch is stored, including what looked fine so far.
                return self._fail_batch(conn, len(batch), "storage write failed")
        try:
            if touched:
                conn.executemany(
                    "UPDATE conversations SET last_seq=?, last_mid=?, last_ts=?, counted=? "
                    "WHERE id=?",
                    [(s, m, t, n, c) for c, (s, m, t, n) in touched.items()],
                )
            if readers:  # sending advances the sender's read position
                conn.executemany(
                    "UPDATE members SET read_seq=?, read_counted=? "
                    "WHERE conv=? AND uid=? AND read_seq < ?",
                    [(s, n, c, u, s) for (c, u), (s, n) in readers.items()],
                )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("group commit failed: %s", exc)
            return self._fail_batch(conn, len(batch), "storage commit failed")
        self.batches += 1
        self.batched_ops += len(batch)
        self.rows_written += conn.total_changes - changes_before
        if len(self._seq) > 200_000:
            self._seq.clear()
        return results

    def _block_set(self, conn: sqlite3.Connection) -> set[tuple[str, str]]:
        """All (blocker, blocked) pairs, kept by the writer (the only one that changes
        them) so a send costs no extra query; reloaded after a failed batch."""
        if self._blocks is None:
            self._blocks = {(r[0], r[1]) for r in conn.execute("SELECT uid, blocked FROM blocks")}
        return self._blocks

    def _fail_batch(self, conn: sqlite3.Connection, n: int, why: str) -> list[Any]:
        """Roll back whatever is left of the transaction and fail every op of the batch.
        The seq counters may hold values of rolled-back rows: drop them."""
        log.error("%s; the batch of %d is refused", why, n)
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        self._seq.clear()
        self._blocks = None
        return [TidingsError("unavailable", why, retry_after_ms=500)] * n

    def _call(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            conn.execute("SAVEPOINT op")
            try:
                res = fn(conn)
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                if isinstance(exc, TidingsError):
                    return exc
                log.exception("store operation failed")
                return TidingsError("internal", "storage operation failed")
            conn.execute("RELEASE op")
            return res
        except sqlite3.Error as exc:  # the savepoint itself failed (e.g. disk full)
            log.error("store operation failed: %s", exc)
            return TidingsError("unavailable", "storage write failed", retry_after_ms=500)

    def _append(
        self,
        conn: sqlite3.Connection,
        msg: NewMessage,
        touched: dict[str, tuple[int, int, int, int]],
        readers: dict[tuple[str, str], tuple[int, int]],
    ) -> AppendResult | TidingsError:
        savepoint = False
        try:
            if msg.blocker is not None and (msg.blocker, msg.sender) in self._block_set(conn):
                # A retry of a message stored before the block still gets its answer.
                if conn.execute(
                    "SELECT 1 FROM messages WHERE sender=? AND cid=?", (msg.sender, msg.cid)
                ).fetchone():
                    return self._duplicate(conn, msg)
                return TidingsError("blocked", "the recipient does not accept your messages")
            if msg.type != GROUP_EVENT and is_group(msg.conv):
                refused = self._check_group_post(conn, msg)
                if refused is not None:
                    return refused
            if msg.amend is not None:
                # Everything an event does (conversation creation included) is undone
                # together if any part of it is refused or fails.
                conn.execute("SAVEPOINT amend")
                savepoint = True
            cached = self._seq.get(msg.conv)
            if cached is None:
                row = conn.execute(
                    "SELECT last_seq, counted FROM conversations WHERE id=?", (msg.conv,)
                ).fetchone()
                if row is None:
                    err = self._create_conversation(conn, msg)
                    if err is not None:
                        return self._undo(conn, savepoint, err)
                    cached = (0, 0)
                else:
                    cached = (row[0], row[1])
            seq, counted = cached
            ctotal = counted + 1 if msg.counted else counted
            edit_version = 0
            assert self._ids is not None, "worker id not leased"
            now = self.clock.now_ms()
            if msg.amend is not None:
                if conn.execute(
                    "SELECT 1 FROM messages WHERE sender=? AND cid=?", (msg.sender, msg.cid)
                ).fetchone():
                    self._undo(conn, savepoint, None)
                    return self._duplicate(conn, msg)
                amended = self._amend(conn, msg, msg.amend, now, seq)
                if isinstance(amended, TidingsError):
                    return self._undo(conn, savepoint, amended)
                edit_version = amended
            mid = self._ids.next(now)
            mentions = _pack(list(msg.mentions)) if msg.mentions else None
            cur = conn.execute(
                f"INSERT INTO messages ({MSG_COLS}, ctotal, target, edit_version) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(sender, cid) DO NOTHING",
                (
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
                    mentions,
                    msg.reply_to,
                    ctotal,
                    None if msg.amend is None else msg.amend.target_seq,
                    edit_version,
                ),
            )
            if savepoint:
                conn.execute("RELEASE amend")
                savepoint = False
            if cur.rowcount == 0:
                return self._duplicate(conn, msg)
        except sqlite3.Error as exc:
            log.error("append failed for %s: %s", msg.conv, exc)
            self._seq.pop(msg.conv, None)
            err = TidingsError("internal", "storage error; the message was not stored")
            return self._undo(conn, savepoint, err)
        self._seq[msg.conv] = (seq + 1, ctotal)
        touched[msg.conv] = (seq + 1, mid, now, ctotal)
        if msg.reads:
            readers[(msg.conv, msg.sender)] = (seq + 1, ctotal)
        return AppendResult(appended(msg, seq + 1, mid, now, ctotal, edit_version), False)

    def _check_group_post(self, conn: sqlite3.Connection, msg: NewMessage) -> TidingsError | None:
        row = conn.execute(
            "SELECT m.role, m.muted_until, g.muted_all FROM groups g "
            "LEFT JOIN members m ON m.conv = g.conv AND m.uid = ? WHERE g.conv = ?",
            (msg.sender, msg.conv),
        ).fetchone()
        if row is None:
            return TidingsError("not_found", "no such group")
        try:
            check_post(
                row[0], row[1] or 0, bool(row[2]), self.clock.now_ms(), privileged=msg.privileged
            )
        except TidingsError as exc:
            # A retry of a message stored before the sender left or was muted still gets
            # its original answer.
            if conn.execute(
                "SELECT 1 FROM messages WHERE sender=? AND cid=?", (msg.sender, msg.cid)
            ).fetchone():
                return None
            return exc
        return None

    @staticmethod
    def _undo(conn: sqlite3.Connection, savepoint: bool, err: TidingsError | None) -> TidingsError:
        """Roll an event's savepoint back (if the transaction still stands) and answer."""
        if savepoint and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK TO amend")
                conn.execute("RELEASE amend")
        return err if err is not None else TidingsError("internal", "undone")

    def _amend(
        self, conn: sqlite3.Connection, msg: NewMessage, amend: Amend, now: int, last_seq: int
    ) -> TidingsError | int:
        """Apply a recall or edit to its target entry (inside the event's savepoint); the
        target's edit version after it (stored on an edit entry too, so that devices apply
        each edit once whatever order they see things in)."""
        row = None
        if amend.target_seq <= last_seq:
            row = conn.execute(
                f"SELECT {AMEND_TARGET_COLS} FROM messages WHERE conv=? AND seq=?",
                (msg.conv, amend.target_seq),
            ).fetchone()
        refused = amend_refusal(row, msg, amend, now)
        if refused is not None:
            return refused
        if amend.action == "recall":
            conn.execute(
                "UPDATE messages SET recalled=1, body=? WHERE conv=? AND seq=?",
                (EMPTY_BODY, msg.conv, amend.target_seq),
            )
            # Earlier edit entries carry content too: a recall removes it from them.
            conn.execute(
                "UPDATE messages SET body=? WHERE conv=? AND target=? AND type='edit'",
                (_pack({"seq": amend.target_seq}), msg.conv, amend.target_seq),
            )
            return 0
        conn.execute(
            "UPDATE messages SET body=?, edit_version=edit_version+1 WHERE conv=? AND seq=?",
            (amend.new_body_bytes, msg.conv, amend.target_seq),
        )
        (version,) = conn.execute(
            "SELECT edit_version FROM messages WHERE conv=? AND seq=?",
            (msg.conv, amend.target_seq),
        ).fetchone()
        return int(version)

    def _create_conversation(
        self, conn: sqlite3.Connection, msg: NewMessage
    ) -> TidingsError | None:
        if not msg.members:
            return TidingsError("not_found", f"no conversation {msg.conv!r}")
        marks = ",".join("?" * len(msg.members))
        found = {
            r[0] for r in conn.execute(f"SELECT uid FROM users WHERE uid IN ({marks})", msg.members)
        }
        missing = [m for m in msg.members if m not in found]
        if missing:
            return TidingsError("not_found", f"no such user {missing[0]!r}")
        conn.execute(
            "INSERT INTO conversations (id, kind, created_ms) VALUES (?,?,?)",
            (msg.conv, KIND_DIRECT, self.clock.now_ms()),
        )
        conn.executemany(
            "INSERT OR IGNORE INTO members (conv, uid) VALUES (?,?)",
            [(msg.conv, m) for m in msg.members],
        )
        return None

    @staticmethod
    def _by_cid(conn: sqlite3.Connection, sender: str, cid: str) -> MessageRecord:
        row = conn.execute(
            f"SELECT {READ_COLS} FROM messages WHERE sender=? AND cid=?", (sender, cid)
        ).fetchone()
        return record(row)

    def _duplicate(self, conn: sqlite3.Connection, msg: NewMessage) -> AppendResult | TidingsError:
        row = conn.execute(
            f"SELECT {READ_COLS} FROM messages WHERE sender=? AND cid=?", (msg.sender, msg.cid)
        ).fetchone()
        if row is None:  # pragma: no cover - the conflict came from elsewhere
            return TidingsError("internal", "client id conflict without a row")
        same = (
            row[0] == msg.conv
            and row[6] == msg.type
            and row[7] == msg.body_bytes
            and row[9] == msg.flags
            and row[10] == (_pack(list(msg.mentions)) if msg.mentions else None)
            and row[11] == msg.reply_to
        )
        if not same:
            return TidingsError(
                "conflict", f"cid {msg.cid!r} was already used for a different message"
            )
        return AppendResult(record(row), True)

    def _checkpoint_main(self) -> None:
        """Backfill the WAL into the database often (PASSIVE: never blocks the writer),
        in the rounds after a commit (an idle server does not checkpoint).

        Under steady load a passive checkpoint never lets the WAL start over, so it would
        grow without bound (and appending to an ever larger file costs the writer). Once
        the WAL holds more than ``wal_restart_bytes`` a RESTART checkpoint makes the next
        commit reuse it from the start; it has little left to copy after the passive
        rounds, so the writer waits for it only briefly.
        """
        conn = _connect(self.path)
        try:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            seen = -1  # the writer's batch count at the last round
            while not self._stop_checkpoint.wait(self.checkpoint_interval_s):
                if self.batches == seen:  # nothing committed since: nothing to copy
                    continue
                seen = self.batches
                self.checkpoints += 1
                try:
                    _, wal_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if wal_frames * page_size > self.wal_restart_bytes:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)")
                        self.wal_restarts += 1
                except sqlite3.Error as exc:
                    log.warning("wal checkpoint failed: %s", exc)
        finally:
            conn.close()

    # ------------------------------------------------------------------ read side

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._read_soon(fn)

    def _read_soon(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Run ``fn`` on a reader thread; its result in the future. Reads asked for in the
        same turn of the loop go to the threads together (split over them), and come
        back with one wake-up per thread: under load (a login storm, heartbeats) the
        hand-over to and from a thread cost more than the small indexed reads
        themselves."""
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._reads.append((fn, fut))
        if not self._reads_scheduled:
            self._reads_scheduled = True
            self._loop.call_soon(self._submit_reads)
        return fut

    def _submit_reads(self) -> None:
        self._reads_scheduled = False
        batch, self._reads = self._reads, []
        if self._reads_closed or not self._read_threads:  # closing
            err = TidingsError("unavailable", "server is shutting down")
            self._resolve_reads([(fut, None, err) for _, fut in batch])
            return
        # A thread per READS_PER_THREAD reads at most: waking a second thread for a few
        # small reads costs more than it saves.
        n = min(self._readers_n, -(-len(batch) // READS_PER_THREAD))
        for i in range(n):
            self._read_q.put(batch[i::n])

    def _reader_main(self) -> None:
        """A reader thread: batches from the queue until told to stop."""
        while True:
            batch = self._read_q.get()
            if batch is _STOP:
                return
            self._run_reads(batch)

    def _run_reads(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], Any]]) -> None:
        """On a reader thread: each read of the batch in turn, each failing alone."""
        results: list[tuple[Any, Any, BaseException | None]] = []
        try:
            conn = self._reader()
        except (sqlite3.Error, OSError) as exc:  # cannot even open it (e.g. out of files)
            log.error("cannot open a read connection: %s", exc)
            err = TidingsError("unavailable", "storage read failed", retry_after_ms=500)
            results = [(fut, None, err) for _, fut in batch]
            batch = []
        for fn, fut in batch:
            try:
                results.append((fut, fn(conn), None))
            except sqlite3.Error as exc:
                log.error("read failed: %s", exc)
                err = TidingsError("unavailable", "storage read failed", retry_after_ms=500)
                results.append((fut, None, err))
            except Exception as exc:  # the caller's own error (e.g. TidingsError)
                results.append((fut, None, exc))
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._resolve_reads, results)

    @staticmethod
    def _resolve_reads(results: list[tuple[Any, Any, BaseException | None]]) -> None:
        for fut, value, exc in results:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

    # ------------------------------------------------------------------ users, devices

    async def put_user(
        self, uid: str, display: str, name: str, password_hash: str | None, now_ms: int
    ) -> tuple[UserRecord, bool]:
        def op(conn: sqlite3.Connection) -> tuple[UserRecord, bool]:
            existed = conn.execute("SELECT 1 FROM users WHERE uid=?", (uid,)).fetchone()
            if existed:
                conn.execute(
                    "UPDATE users SET name=?, password_hash=coalesce(?, password_hash) WHERE uid=?",
                    (name, password_hash, uid),
                )
            else:
                conn.execute(
                    "INSERT INTO users (uid, display, name, password_hash, created_ms) "
                    "VALUES (?,?,?,?,?)",
                    (uid, display, name, password_hash, now_ms),
                )
            row = conn.execute(
                "SELECT uid, display, name, password_hash, created_ms FROM users WHERE uid=?",
                (uid,),
            ).fetchone()
            return UserRecord(*row), not existed

        return await self._write(op)

    async def create_user(
        self, uid: str, display: str, name: str, password_hash: str | None, now_ms: int
    ) -> UserRecord:
        def op(conn: sqlite3.Connection) -> UserRecord:
            try:
                conn.execute(
                    "INSERT INTO users (uid, display, name, password_hash, created_ms) "
                    "VALUES (?,?,?,?,?)",
                    (uid, display, name, password_hash, now_ms),
                )
            except sqlite3.IntegrityError:
                raise TidingsError("conflict", "that user id is taken") from None
            return UserRecord(uid, display, name, password_hash, now_ms)

        return await self._write(op)

    async def get_user(self, uid: str) -> UserRecord | None:
        def op(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(
                "SELECT uid, display, name, password_hash, created_ms FROM users WHERE uid=?",
                (uid,),
            ).fetchone()
            return UserRecord(*row) if row else None

        return await self._read(op)

    async def users_exist(self, uids: list[str]) -> set[str]:
        def op(conn: sqlite3.Connection) -> set[str]:
            marks = ",".join("?" * len(uids))
            return {
                r[0] for r in conn.execute(f"SELECT uid FROM users WHERE uid IN ({marks})", uids)
            }

        return await self._read(op) if uids else set()

    async def upsert_device(self, uid: str, device: str, platform: str, now_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO devices (uid, device, platform, created_ms) VALUES (?,?,?,?) "
                "ON CONFLICT(uid, device) DO UPDATE SET platform=excluded.platform",
                (uid, device, platform, now_ms),
            )

        await self._write(op)

    async def revoke_device(self, uid: str, device: str, before_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE devices SET revoked_before=max(revoked_before, ?) WHERE uid=? AND device=?",
                (before_ms, uid, device),
            )

        await self._write(op)

    async def revoke_token(self, jti: str, uid: str, device: str, expires_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO revoked_tokens (jti, uid, device, expires_ms) "
                "VALUES (?,?,?,?)",
                (jti, uid, device, expires_ms),
            )
            conn.execute("DELETE FROM revoked_tokens WHERE expires_ms < ?", (self.clock.now_ms(),))

        await self._write(op)

    @staticmethod
    def _auth_state(conn: sqlite3.Connection, jti: str, uid: str, device: str) -> AuthState:
        revoked = conn.execute("SELECT 1 FROM revoked_tokens WHERE jti=?", (jti,)).fetchone()
        row = conn.execute(
            "SELECT revoked_before FROM devices WHERE uid=? AND device=?", (uid, device)
        ).fetchone()
        return AuthState(bool(revoked), row[0] if row else 0)

    async def auth_state(self, jti: str, uid: str, device: str) -> AuthState:
        return await self._read(lambda conn: self._auth_state(conn, jti, uid, device))

    def login_state(self, jti: str, uid: str, device: str) -> asyncio.Future[tuple[AuthState, int]]:
        def op(conn: sqlite3.Connection) -> tuple[AuthState, int]:
            revoked, before, wm = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM revoked_tokens WHERE jti=?), "
                "(SELECT revoked_before FROM devices WHERE uid=? AND device=?), "
                "(SELECT max(c.last_mid) FROM members m JOIN conversations c "
                " ON c.id = m.conv WHERE m.uid=?)",
                (jti, uid, device, uid),
            ).fetchone()
            return AuthState(bool(revoked), int(before or 0)), int(wm or 0)

        return self._read_soon(op)

    # ------------------------------------------------------------------ read state

    async def mark_read(self, uid: str, conv: str, seq: int) -> ReadState:
        def op(conn: sqlite3.Connection) -> ReadState:
            # The writer's counters: appends of this batch are not in the row yet.
            state = read_target(conn, uid, conv, seq, self._seq.get(conv))
            if not state.changed:
                return state
            target, ctotal = state.read_seq, state.read_n
            conn.execute(
                "UPDATE members SET read_seq=?, read_counted=? WHERE conv=? AND uid=?",
                (target, ctotal, conv, uid),
            )
            now = self.clock.now_ms()
            if conv.startswith("d:"):
                # The other member's state changes too ("read up to N"): log it for them.
                # (Groups show "read by N" on request instead: no row per member.)
                conn.execute(
                    "INSERT INTO user_changes (uid, conv, kind, value, ts) "
                    "SELECT uid, conv, 'peer_read', ?, ? FROM members WHERE conv=? AND uid != ?",
                    (target, now, conv, uid),
                )
            cur = conn.execute(
                "INSERT INTO user_changes (uid, conv, kind, value, ts) VALUES (?,?,?,?,?)",
                (uid, conv, "read", target, now),
            )
            return msgspec.structs.replace(state, version=int(cur.lastrowid or 0))

        return await self._write(op)

    async def write_delivered(self, positions: list[tuple[str, str, int]]) -> list[DeliveredMove]:
        def op(conn: sqlite3.Connection) -> list[DeliveredMove]:
            blocks = self._block_set(conn)
            now = self.clock.now_ms()
            moved = []
            for conv, uid, seq in positions:
                pair = direct_members(conv)
                if pair is None or pair[0] == pair[1] or uid not in pair:
                    continue
                peer = pair[1] if pair[0] == uid else pair[0]
                # Capped here, before binding: an ack may name any seq (even past 2^63).
                target = min(seq, self._position(conn, conv)[0])
                cur = conn.execute(
                    "UPDATE members SET delivered_seq=? "
                    "WHERE conv=? AND uid=? AND delivered_seq < ? AND read_seq < ?",
                    (target, conv, uid, target, target),
                )
                if not cur.rowcount:
                    continue  # not past what is delivered or read already (or no member)
                conn.execute(
                    "INSERT OR REPLACE INTO user_changes (uid, conv, kind, value, ts) "
                    "VALUES (?,?,'peer_delivered',?,?)",
                    (peer, conv, target, now),
                )
                tell = None if (peer, uid) in blocks else peer
                moved.append(DeliveredMove(conv, uid, target, tell))
            return moved

        return await self._write(op) if positions else []

    def _summaries(
        self, conn: sqlite3.Connection, uid: str, where: str, params: tuple[Any, ...], limit: int
    ) -> list[ConvSummary]:
        rows = conn.execute(
            f"SELECT {SUMMARY_COLS.format(greatest='max')} "
            "FROM members m JOIN conversations c ON c.id = m.conv "
            "LEFT JOIN groups g ON g.conv = c.id "
            f"WHERE m.uid=? AND c.last_seq > 0 {where} "
            "ORDER BY m.pinned DESC, c.last_ts DESC, c.id LIMIT ?",
            (uid, *params, limit),
        ).fetchall()
        out = []
        for row in rows:
            conv, last_seq = row[0], row[1]
            found = conn.execute(
                f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq=?", (conv, last_seq)
            ).fetchone()
            last = record(found) if found else None
            if last is not None:
                target = amend_target(last)
                if conn.execute(
                    "SELECT 1 FROM deleted_for WHERE uid=? AND conv=? AND seq IN (?, ?)",
                    (uid, conv, last_seq, -1 if target is None else target),
                ).fetchone():
                    last = tombstone(last)
            out.append(conv_summary(row, last))
        return out

    async def conversation_list(self, uid: str, limit: int) -> tuple[list[ConvSummary], int]:
        def op(conn: sqlite3.Connection) -> tuple[list[ConvSummary], int]:
            out = self._summaries(conn, uid, "AND c.last_seq > m.hidden_seq", (), limit)
            (badge,) = conn.execute(
                "SELECT coalesce(sum(c.counted - m.read_counted), 0) FROM members m "
                "JOIN conversations c ON c.id = m.conv WHERE m.uid=? AND m.muted = 0",
                (uid,),
            ).fetchone()
            return out, int(badge)

        return await self._read(op)

    async def conversation_states(self, uid: str, convs: list[str]) -> list[ConvSummary]:
        def op(conn: sqlite3.Connection) -> list[ConvSummary]:
            marks = ",".join("?" * len(convs))
            return self._summaries(conn, uid, f"AND c.id IN ({marks})", tuple(convs), len(convs))

        return await self._read(op) if convs else []

    async def user_changes_since(self, uid: str, version: int, limit: int) -> tuple[list[str], int]:
        def op(conn: sqlite3.Connection) -> tuple[list[str], int]:
            rows = conn.execute(
                "SELECT conv, max(version) FROM user_changes WHERE uid=? AND version > ? "
                "GROUP BY conv ORDER BY max(version) LIMIT ?",
                (uid, version, limit),
            ).fetchall()
            return [r[0] for r in rows], max((r[1] for r in rows), default=version)

        return await self._read(op)

    async def sync_point(self, uid: str) -> tuple[int, int]:
        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            (wm,) = conn.execute(
                "SELECT max(c.last_mid) FROM members m JOIN conversations c ON c.id = m.conv "
                "WHERE m.uid=?",
                (uid,),
            ).fetchone()
            (cv,) = conn.execute(
                "SELECT max(version) FROM user_changes WHERE uid=?", (uid,)
            ).fetchone()
            return int(wm or 0), int(cv or 0)

        return await self._read(op)

    async def user_version(self, uid: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT max(version) FROM user_changes WHERE uid=?", (uid,))
            return int(row.fetchone()[0] or 0)

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
        def op(conn: sqlite3.Connection) -> ConvSettings:
            row = conn.execute(
                "SELECT m.muted, m.pinned, m.hidden_seq, m.draft, c.last_seq FROM members m "
                "JOIN conversations c ON c.id = m.conv WHERE m.conv=? AND m.uid=?",
                (conv, uid),
            ).fetchone()
            if row is None:
                raise not_member(conn, conv)
            old_muted, old_pinned, hidden_seq, old_draft, last_seq = row
            cached = self._seq.get(conv)
            if cached is not None:
                last_seq = cached[0]
            if hidden is not None:
                hidden_seq = last_seq if hidden else 0
            new = (
                int(old_muted if muted is None else muted),
                int(old_pinned if pinned is None else pinned),
                hidden_seq,
                old_draft if draft is None else draft,
            )
            conn.execute(
                "UPDATE members SET muted=?, pinned=?, hidden_seq=?, draft=? "
                "WHERE conv=? AND uid=?",
                (*new, conv, uid),
            )
            cur = conn.execute(
                "INSERT INTO user_changes (uid, conv, kind, value, ts) VALUES (?,?,?,?,?)",
                (uid, conv, "settings", 0, self.clock.now_ms()),
            )
            hidden_now = new[2] >= last_seq > 0
            return ConvSettings(
                bool(new[0]),
                bool(new[1]),
                hidden_now,
                new[3],
                int(cur.lastrowid or 0),
                new[2] if hidden_now else 0,
            )

        return await self._write(op)

    async def delete_for(self, uid: str, conv: str, seqs: list[int]) -> list[int]:
        def op(conn: sqlite3.Connection) -> list[int]:
            row = conn.execute(
                "SELECT c.last_seq FROM members m JOIN conversations c ON c.id = m.conv "
                "WHERE m.conv=? AND m.uid=?",
                (conv, uid),
            ).fetchone()
            if row is None:
                raise not_member(conn, conv)
            cached = self._seq.get(conv)
            last_seq = cached[0] if cached is not None else row[0]
            done = []
            wanted = sorted(set(seqs))
            for seq in wanted:
                if not 1 <= seq <= last_seq:
                    raise TidingsError("not_found", f"no entry {seq} in this conversation")
            marks = ",".join("?" * len(wanted))
            # Recall and edit entries go with the entry they changed, not on their own.
            events = {
                r[0]
                for r in conn.execute(
                    f"SELECT seq FROM messages WHERE conv=? AND seq IN ({marks}) "
                    "AND type IN ('recall', 'edit')",
                    (conv, *wanted),
                )
            }
            for seq in wanted:
                if seq in events:
                    continue
                cur = conn.execute(
                    "INSERT OR IGNORE INTO deleted_for (uid, conv, seq) VALUES (?,?,?)",
                    (uid, conv, seq),
                )
                if cur.rowcount:
                    done.append(seq)
            # One log entry per seq, so a device that was away learns which ones.
            now = self.clock.now_ms()
            conn.executemany(
                "INSERT INTO user_changes (uid, conv, kind, value, ts) VALUES (?,?,?,?,?)",
                [(uid, conv, "deleted", seq, now) for seq in done],
            )
            return done

        return await self._write(op)

    async def deleted_in(self, uid: str, spans: dict[str, tuple[int, int]]) -> dict[str, set[int]]:
        def op(conn: sqlite3.Connection) -> dict[str, set[int]]:
            out: dict[str, set[int]] = {}
            for conv, (lo, hi) in spans.items():
                rows = conn.execute(
                    "SELECT seq FROM deleted_for WHERE uid=? AND conv=? AND seq BETWEEN ? AND ?",
                    (uid, conv, lo, hi),
                ).fetchall()
                if rows:
                    out[conv] = {r[0] for r in rows}
            return out

        return await self._read(op) if spans else {}

    async def deletions_since(
        self, uid: str, after: int, upto: int, limit: int
    ) -> tuple[dict[str, list[int]], int]:
        def op(conn: sqlite3.Connection) -> tuple[dict[str, list[int]], int]:
            rows = conn.execute(
                "SELECT conv, value, version FROM user_changes WHERE uid=? AND version > ? "
                "AND version <= ? AND kind='deleted' ORDER BY version LIMIT ?",
                (uid, after, upto, limit + 1),
            ).fetchall()
            return deletions(rows, limit, after, upto)

        return await self._read(op) if upto > after else ({}, upto)

    # ------------------------------------------------------------------ presence

    async def contacts(self, uid: str) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT p.uid FROM members m JOIN members p ON p.conv = m.conv "
                "WHERE m.uid=? AND p.uid != m.uid AND m.conv LIKE 'd:%'",
                (uid,),
            )
            return sorted({r[0] for r in rows})

        return await self._read(op)

    async def set_presence_hidden(self, uid: str, hidden: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET presence_hidden=? WHERE uid=?", (int(hidden), uid))

        await self._write(op)

    async def presence_info(self, uids: list[str]) -> dict[str, tuple[bool, int]]:
        def op(conn: sqlite3.Connection) -> dict[str, tuple[bool, int]]:
            marks = ",".join("?" * len(uids))
            rows = conn.execute(
                f"SELECT uid, presence_hidden, last_seen_ms FROM users WHERE uid IN ({marks})",
                uids,
            )
            return {r[0]: (bool(r[1]), int(r[2])) for r in rows}

        return await self._read(op) if uids else {}

    async def set_last_seen(self, uid: str, ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE users SET last_seen_ms=max(last_seen_ms, ?) WHERE uid=?", (ms, uid)
            )

        await self._write(op)

    # ------------------------------------------------------------------ block list

    async def set_block(self, uid: str, other: str, on: bool, now_ms: int) -> None:
        def op(conn: sqlite3.Connection) -> None:
            blocks = self._block_set(conn)
            if on:
                conn.execute(
                    "INSERT OR IGNORE INTO blocks (uid, blocked, created_ms) VALUES (?,?,?)",
                    (uid, other, now_ms),
                )
                blocks.add((uid, other))
            else:
                conn.execute("DELETE FROM blocks WHERE uid=? AND blocked=?", (uid, other))
                blocks.discard((uid, other))

        await self._write(op)

    async def blocked_by(self, uid: str) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT blocked FROM blocks WHERE uid=? ORDER BY blocked", (uid,))
            return [r[0] for r in rows]

        return await self._read(op)

    async def is_blocked(self, blocker: str, sender: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM blocks WHERE uid=? AND blocked=?", (blocker, sender)
            ).fetchone()
            return row is not None

        return await self._read(op)

    # ------------------------------------------------------------------ messages

    async def history(
        self, conv: str, before: int, limit: int, floor: int = 0
    ) -> list[MessageRecord]:
        def op(conn: sqlite3.Connection) -> list[MessageRecord]:
            rows = conn.execute(
                f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq<? AND seq>? "
                "ORDER BY seq DESC LIMIT ?",
                (conv, before if before > 0 else 2**63 - 1, floor, limit),
            ).fetchall()
            return [record(r) for r in reversed(rows)]

        return await self._read(op)

    async def messages_after(self, conv: str, after: int, limit: int) -> list[MessageRecord]:
        def op(conn: sqlite3.Connection) -> list[MessageRecord]:
            rows = conn.execute(
                f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq>? ORDER BY seq LIMIT ?",
                (conv, after, limit),
            ).fetchall()
            return [record(r) for r in rows]

        return await self._read(op)

    async def messages_in(self, spans: list[tuple[str, int, int]]) -> list[MessageRecord]:
        def op(conn: sqlite3.Connection) -> list[MessageRecord]:
            out: list[MessageRecord] = []
            sql = f"SELECT {READ_COLS} FROM messages WHERE conv=? AND seq>? AND seq<=? ORDER BY seq"
            for conv, after, upto in spans:
                out.extend(record(r) for r in conn.execute(sql, (conv, after, upto)))
            return out

        return await self._read(op) if spans else []

    async def changed_conversations(self, uid: str, since_mid: int, limit: int) -> list[ConvRow]:
        def op(conn: sqlite3.Connection) -> list[ConvRow]:
            rows = conn.execute(
                "SELECT c.id, c.last_seq, c.last_mid, c.last_ts, m.joined_seq FROM members m "
                "JOIN conversations c ON c.id = m.conv "
                "WHERE m.uid=? AND c.last_mid > ? ORDER BY c.last_mid LIMIT ?",
                (uid, since_mid, limit),
            ).fetchall()
            return [ConvRow(*r) for r in rows]

        return await self._read(op)

    async def watermark(self, uid: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT max(c.last_mid) FROM members m JOIN conversations c ON c.id = m.conv "
                "WHERE m.uid=?",
                (uid,),
            ).fetchone()
            return int(row[0] or 0)

        return await self._read(op)

    async def is_member(self, conv: str, uid: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM members WHERE conv=? AND uid=?", (conv, uid)
            ).fetchone()
            return row is not None

        return await self._read(op)

    async def conversation(self, conv: str) -> ConvRow | None:
        def op(conn: sqlite3.Connection) -> ConvRow | None:
            row = conn.execute(
                "SELECT id, last_seq, last_mid, last_ts FROM conversations WHERE id=?", (conv,)
            ).fetchone()
            return ConvRow(*row) if row else None

        return await self._read(op)

    async def lease_worker_id(self, holder: str, now_ms: int, ttl_ms: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM worker_leases WHERE expires_ms < ?", (now_ms,))
            row = conn.execute(
                "SELECT worker_id FROM worker_leases WHERE holder=?", (holder,)
            ).fetchone()
            if row:
                wid = int(row[0])
                conn.execute(
                    "UPDATE worker_leases SET expires_ms=? WHERE worker_id=?",
                    (now_ms + ttl_ms, wid),
                )
                return wid
            used = {r[0] for r in conn.execute("SELECT worker_id FROM worker_leases")}
            for wid in range(MAX_WORKER + 1):
                if wid not in used:
                    conn.execute(
                        "INSERT INTO worker_leases (worker_id, holder, expires_ms) VALUES (?,?,?)",
                        (wid, holder, now_ms + ttl_ms),
                    )
                    return wid
            raise TidingsError("unavailable", "no free worker id")

        return await self._write(op)
