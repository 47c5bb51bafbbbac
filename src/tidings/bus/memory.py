"""Single-process bus: events go straight to this process's hub."""

from __future__ import annotations

import logging

from tidings.bus.base import BusEvent, Handler

log = logging.getLogger(__name__)


class MemoryBus:
    def __init__(self) -> None:
        self._handler: Handler | None = None
        self.published = 0

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._handler = None

    def publish(self, event: BusEvent) -> None:
        self.published += 1
        handler = self._handler
        if handler is None:
            return
        try:
            handler(event)
        except Exception:  # a handler bug must not fail the publisher's send
            log.exception("bus handler failed")
