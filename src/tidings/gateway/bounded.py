"""Writes with a bounded send buffer, shared by the WebSocket and TCP links."""

from __future__ import annotations

import asyncio
from typing import Any

from tidings.protocol import close
from tidings.protocol.frames import ServerFrame
from tidings.session.context import Link
from tidings.session.session import Session


def encoded_for(frame: ServerFrame, link: Link, cache: dict[tuple[str, str], bytes]) -> bytes:
    """``frame`` framed for ``link``, encoded once per (codec, framing) in ``cache``."""
    key = (link.codec.name, link.framing)
    data = cache.get(key)
    if data is None:
        data = cache[key] = link.frame(link.codec.encode(frame))
    return data


class BoundedWriter:
    """Writes framed bytes straight to the transport; a buffer over ``max_buffer`` means
    the peer is not reading, and its session is closed as a slow consumer."""

    transport: Any  # asyncio.Transport or aiohttp's; None once the connection is gone
    max_buffer: int
    session: Session | None

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if t.get_write_buffer_size() > self.max_buffer and self.session is not None:
            self.session.close(close.SLOW_CONSUMER, "send buffer full")

    def abort_if_overfull(self) -> bool:
        """Abort a connection whose buffer is full (a close frame would only queue behind
        the data the peer is not reading). True if it was aborted."""
        t: asyncio.WriteTransport | None = self.transport
        if t is not None and t.get_write_buffer_size() > self.max_buffer:
            t.abort()
            return True
        return False
