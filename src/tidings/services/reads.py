"""Coalesced read positions for groups (ARCHITECTURE.md invariant 5): a member's read
position is kept in memory (the highest wins) and written about once per interval, in
one write for every member who read meanwhile, however many times each did.

What a crash can lose is at most one interval of read positions (never a message): the
devices that read already hold them, and the next read re-marks them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Generic, TypeVar

from tidings.store.base import Store

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")


class Flusher(Generic[K, V]):
    """A coalesced write: ``_pending`` holds the highest value per key (``_keep``), and
    every ``interval_s`` (and once more on ``stop``) ``flush`` hands what is pending to
    ``_write`` in one batch. A failed write is logged, its batch is kept again for the
    next round (merged with what came meanwhile), and the error is raised to ``flush``'s
    caller."""

    what = "positions"  # for the log lines
    _task: asyncio.Task[None] | None = None

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._pending: dict[K, V] = {}
        self._flushing: asyncio.Lock | None = None

    def _keep(self, key: K, value: V) -> None:
        """Put ``value`` in ``_pending`` unless a higher one is there."""
        raise NotImplementedError

    async def _write(self, batch: dict[K, V]) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        """Write everything pending now, in one batch."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                await self._write(batch)
            except Exception:
                log.exception("writing %d %s failed; will retry", len(batch), self.what)
                for key, value in batch.items():
                    self._keep(key, value)
                raise

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:
                pass  # logged; what is pending stays for the next round

    async def stop(self) -> None:
        """Stop the timer and write what is pending."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.error("%s pending at shutdown were not written", self.what)


class ReadCoalescer(Flusher[tuple[str, str], tuple[int, int]]):
    """(uid, conv) -> (seq, counted entries up to it)."""

    what = "read positions"

    def __init__(self, store: Store, interval_s: float) -> None:
        super().__init__(interval_s)
        self.store = store
        self.noted = 0  # statistics: reads taken
        self.written = 0  # ... and read positions written

    def pending(self, uid: str, conv: str) -> tuple[int, int] | None:
        """The position (seq, counted entries up to it) waiting to be written, if any."""
        return self._pending.get((uid, conv))

    def note(self, uid: str, conv: str, seq: int, read_n: int) -> None:
        self._keep((uid, conv), (seq, read_n))
        self.noted += 1

    def _keep(self, key: tuple[str, str], value: tuple[int, int]) -> None:
        old = self._pending.get(key)
        if old is None or value[0] > old[0]:
            self._pending[key] = value

    async def _write(self, batch: dict[tuple[str, str], tuple[int, int]]) -> None:
        await self.store.write_reads([(u, c, s) for (u, c), (s, _) in batch.items()])
        self.written += len(batch)
