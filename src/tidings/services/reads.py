"""Coalesced read positions for groups (ARCHITECTURE.md invariant 5): a member's read
position is kept in memory (the highest wins) and written about once per interval, in
one write for every member who read meanwhile, however many times each did.

What a crash can lose is at most one interval of read positions (never a message): the
devices that read already hold them, and the next read re-marks them.
"""

from __future__ import annotations

import asyncio
import logging

from tidings.store.base import Store

log = logging.getLogger(__name__)


class Flusher:
    """Runs ``flush`` every ``interval_s`` on the loop, and once more on ``stop``: the
    timer of a coalesced write. A failed flush is logged by ``flush`` and retried at the
    next round."""

    interval_s: float
    what = "positions"  # for the shutdown log line
    _task: asyncio.Task[None] | None = None

    async def flush(self) -> None:
        raise NotImplementedError

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


class ReadCoalescer(Flusher):
    what = "read positions"

    def __init__(self, store: Store, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._pending: dict[tuple[str, str], tuple[int, int]] = {}  # (uid, conv) -> (seq, n)
        self._flushing: asyncio.Lock | None = None
        self.noted = 0  # statistics: reads taken
        self.written = 0  # ... and read positions written

    def pending(self, uid: str, conv: str) -> tuple[int, int] | None:
        """The position (seq, counted entries up to it) waiting to be written, if any."""
        return self._pending.get((uid, conv))

    def note(self, uid: str, conv: str, seq: int, read_n: int) -> None:
        key = (uid, conv)
        old = self._pending.get(key)
        if old is None or seq > old[0]:
            self._pending[key] = (seq, read_n)
        self.noted += 1

    async def flush(self) -> None:
        """Write every pending position now (the highest per member)."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                await self.store.write_reads([(u, c, s) for (u, c), (s, _) in batch.items()])
            except Exception:
                log.exception("writing %d read positions failed; will retry", len(batch))
                for (uid, conv), (seq, n) in batch.items():
                    self.note(uid, conv, seq, n)
                raise
            self.written += len(batch)
