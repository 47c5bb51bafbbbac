"""Delivered receipts of 1:1 conversations ("sent ✓ / delivered ✓✓ / read").

A member's delivered position is the highest seq any of its devices acknowledged. Acks
are the busiest client frame, so a session only notes (conversation, user, seq) here, in
memory (the highest wins); every interval one writer op stores them all (capped at each
conversation's last seq, never backwards) and the moves go out over the bus to the
other member's online devices. A device that was away reads the position from the
conversation list or its next sync (the store logs each move for the other member).

What a crash can lose is at most one interval of positions: the devices ack again on
their next push or sync. Groups have no delivered receipts (they count readers).
"""

from __future__ import annotations

import asyncio
import logging

from tidings.bus.base import Bus, DeliveredNotice
from tidings.services.reads import Flusher
from tidings.store.base import Store

log = logging.getLogger(__name__)


class DeliveredCoalescer(Flusher):
    what = "delivered positions"

    def __init__(self, store: Store, bus: Bus, interval_s: float) -> None:
        self.store = store
        self.bus = bus
        self.interval_s = interval_s
        self._pending: dict[tuple[str, str], int] = {}  # (conv, uid) -> seq
        self._flushing: asyncio.Lock | None = None
        self.noted = 0  # statistics: acks noted
        self.moved = 0  # ... and positions that moved when written

    def note(self, conv: str, uid: str, seq: int) -> None:
        """A device of ``uid`` holds 1:1 conversation ``conv`` up to ``seq`` (unchecked:
        the flush caps it at the last seq and skips non-members)."""
        key = (conv, uid)
        if seq > self._pending.get(key, 0):
            self._pending[key] = seq
        self.noted += 1

    async def flush(self) -> None:
        """Write every pending position now; tell the other members of those that moved."""
        if self._flushing is None:
            self._flushing = asyncio.Lock()
        async with self._flushing:
            if not self._pending:
                return
            batch, self._pending = self._pending, {}
            try:
                moves = await self.store.write_delivered([(c, u, s) for (c, u), s in batch.items()])
            except Exception:
                log.exception("writing %d delivered positions failed; will retry", len(batch))
                for (conv, uid), seq in batch.items():
                    self.note(conv, uid, seq)
                raise
            self.moved += len(moves)
            for m in moves:
                if m.tell is not None:
                    self.bus.publish(DeliveredNotice(m.conv, m.uid, m.seq, (m.tell,)))
