"""Backpressure from the store to the sockets.

When the store's write queue is deeper than ``high``, each session that submits a send
stops reading from its socket; once the queue is back under ``low`` they all resume.
Clients then wait in their own socket buffers (TCP flow control) instead of the server
decoding sends it can only refuse: past capacity the server levels off rather than
collapsing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidings.store.base import Store

if TYPE_CHECKING:
    from tidings.session.session import Session


class WriteGate:
    def __init__(self, store: Store, high: int, low: int) -> None:
        self.store = store
        self.high = high
        self.low = low
        self.paused: set[Session] = set()
        self.pauses = 0  # statistics
        store.on_commit(self.after_commit)

    def after_submit(self, session: Session) -> None:
        if self.store.backlog() >= self.high and session not in self.paused:
            self.paused.add(session)
            self.pauses += 1
            session.link.pause_reading()

    def after_commit(self) -> None:
        if self.paused and self.store.backlog() <= self.low:
            sessions, self.paused = self.paused, set()
            for s in sessions:
                s.link.resume_reading()

    def forget(self, session: Session) -> None:
        self.paused.discard(session)
