"""Raw TCP transport: preface + version, then 4-byte length-prefixed MessagePack frames."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from tidings.gateway.bounded import BoundedWriter
from tidings.protocol import PROTOCOL_VERSION, close
from tidings.protocol.codec import CODECS, MSGPACK
from tidings.protocol.frames import Close
from tidings.protocol.framing import FramingError, TcpFrameDecoder, preface, tcp_frame
from tidings.session.context import ServerContext
from tidings.session.session import Session

log = logging.getLogger(__name__)


class TcpLink(BoundedWriter, asyncio.Protocol):
    framing = "tcp"

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.codec = CODECS[MSGPACK]
        self.peer = ""
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.max_buffer = ctx.settings.send_buffer_bytes
        self._decoder = TcpFrameDecoder(
            ctx.settings.max_frame_bytes,
            expect_preface=True,
            versions=frozenset({PROTOCOL_VERSION}),
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer: Any = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        # Unauthenticated sockets that never send a preface still hit the auth timeout.
        self._preface_timer = asyncio.get_running_loop().call_later(
            self.ctx.settings.auth_timeout_ms / 1000, self._preface_timeout
        )

    def _preface_timeout(self) -> None:
        if self.session is None and self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FramingError as exc:
            self._framing_error(exc)
            return
        session = self.session
        if session is None:
            if self._decoder.version is None:
                return
            self._preface_timer.cancel()
            assert self.transport is not None
            self.transport.write(preface(PROTOCOL_VERSION))
            session = self.session = Session(self, self.ctx)
            session.start()
        for payload in frames:
            session.on_frame(payload)
            if self.session is None or session.state == "closed":
                return

    def _framing_error(self, exc: FramingError) -> None:
        t = self.transport
        if t is None:
            return
        if exc.kind == "preface":
            t.abort()
            return
        if exc.kind == "version":
            t.write(preface(PROTOCOL_VERSION))
            self._write_close(close.UNSUPPORTED_VERSION, str(exc))
            t.close()
            return
        if self.session is not None:
            self.session.close(close.TOO_BIG, str(exc))
        else:
            self.close(close.TOO_BIG, str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.on_lost()
        self.transport = None

    # Link

    def frame(self, payload: bytes) -> bytes:
        return tcp_frame(payload)

    def _write_close(self, code: int, reason: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(tcp_frame(self.codec.encode(Close(code, reason[:120]))))

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self, code: int, reason: str) -> None:
        t = self.transport
        if t is None or self.abort_if_overfull():
            return
        self._write_close(code, reason)
        t.close()
