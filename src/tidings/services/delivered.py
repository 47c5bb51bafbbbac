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

from tidings.bus.base import Bus, DeliveredNotice
from tidings.services.reads import Flusher
from tidings.store.base import Store


class DeliveredCoalescer(Flusher[tuple[str, str], int]):
    """(conv, uid) -> the highest seq acked."""

    what = "delivered positions"

    def __init__(self, store: Store, bus: Bus, interval_s: float) -> None:
        super().__init__(interval_s)
        self.store = store
        self.bus = bus
        self.noted = 0  # statistics: acks noted
        self.moved = 0  # ... and positions that moved when written

    def note(self, conv: str, uid: str, seq: int) -> None:
        """A device of ``uid`` holds 1:1 conversation ``conv`` up to ``seq`` (unchecked:
        the flush caps it at the last seq and skips non-members)."""
        self._keep((conv, uid), seq)
        self.noted += 1

    def _keep(self, key: tuple[str, str], value: int) -> None:
        if value > self._pending.get(key, 0):
            self._pending[key] = value

    async def _write(self, batch: dict[tuple[str, str], int]) -> None:
        """Store the positions; tell the other members of those that moved."""
        moves = await self.store.write_delivered([(c, u, s) for (c, u), s in batch.items()])
        self.moved += len(moves)
        for m in moves:
            if m.tell is not None:
                self.bus.publish(DeliveredNotice(m.conv, m.uid, m.seq, (m.tell,)))
