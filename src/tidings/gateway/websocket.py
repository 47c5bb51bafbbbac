"""WebSocket transport at /v1/ws (aiohttp), subprotocols tidings.v1.json / .msgpack.

Pushes and replies are written as pre-built frames straight to the transport, so a
fan-out writes the same bytes to every connection; the send buffer is bounded and an
overfull one closes the connection as a slow consumer (it resyncs on reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import WSMsgType, web

from tidings.gateway.bounded import BoundedWriter
from tidings.protocol import close
from tidings.protocol.codec import CODECS, JSON, MSGPACK, Codec
from tidings.protocol.framing import WS_BINARY, WS_TEXT, ws_frame
from tidings.session.context import ServerContext
from tidings.session.session import Session

log = logging.getLogger(__name__)

SUBPROTOCOL_JSON = "tidings.v1.json"
SUBPROTOCOL_MSGPACK = "tidings.v1.msgpack"
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)


class WsLink(BoundedWriter):
    framing = "ws"

    def __init__(
        self, ws: web.WebSocketResponse, transport: Any, codec: Codec, peer: str, max_buffer: int
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.codec = codec
        self.peer = peer
        self.max_buffer = max_buffer
        self._opcode = WS_BINARY if codec.binary else WS_TEXT
        self.session: Session | None = None
        self._closing: asyncio.Task[Any] | None = None
        self.reading = asyncio.Event()
        self.reading.set()

    def frame(self, payload: bytes) -> bytes:
        return ws_frame(payload, self._opcode)

    def pause_reading(self) -> None:
        # The handler stops consuming; aiohttp's own flow control then stops the socket.
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def close(self, code: int, reason: str) -> None:
        self.reading.set()
        if self.abort_if_overfull():
            return
        if self._closing is None and not self.ws.closed:
            self._closing = asyncio.ensure_future(
                self.ws.close(code=code, message=reason.encode()[:120])
            )


def is_utf8(data: bytes) -> bool:
    """Whether a WebSocket text message is valid UTF-8 (RFC 6455: else close 1007)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def origin_permitted(origin: str | None, host: str, allowed: list[str]) -> bool:
    """No Origin (non-browser clients) passes; a browser Origin must be the server's own
    host or be on the configured list ("*" allows all)."""
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return origin in (f"http://{host}", f"https://{host}")


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    return origin_permitted(request.headers.get("Origin"), request.headers.get("Host", ""), allowed)


def make_handler(ctx: ServerContext) -> Any:
    s = ctx.settings

    async def handle(request: web.Request) -> web.StreamResponse:
        if not origin_allowed(request, s.allowed_origins):
            return web.json_response(
                {
                    "error": {
                        "code": "forbidden",
                        "message": "origin not allowed",
                        "retryable": False,
                    }
                },
                status=403,
            )
        ws = web.WebSocketResponse(
            protocols=SUBPROTOCOLS,
            compress=False,
            max_msg_size=s.max_frame_bytes,
            autoping=True,
            heartbeat=None,
            timeout=5.0,
            decode_text=False,
        )
        await ws.prepare(request)
        codec = CODECS[MSGPACK if ws.ws_protocol == SUBPROTOCOL_MSGPACK else JSON]
        peer = str(request.remote)
        link = WsLink(ws, request.transport, codec, peer, s.send_buffer_bytes)
        session = Session(link, ctx)
        link.session = session
        session.start()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    if codec.binary:
                        session.close(close.UNSUPPORTED_DATA, "text frame on msgpack protocol")
                        break
                    data = msg.data
                    data = data if isinstance(data, bytes) else data.encode()
                    if not is_utf8(data):
                        session.close(close.INVALID_DATA, "text message is not UTF-8")
                        break
                    session.on_frame(data)
                elif msg.type is WSMsgType.BINARY:
                    if not codec.binary:
                        session.close(close.UNSUPPORTED_DATA, "binary frame on json protocol")
                        break
                    session.on_frame(msg.data)
                elif msg.type is WSMsgType.ERROR:
                    log.debug("websocket error from %s: %s", peer, ws.exception())
                    break
                if not link.reading.is_set():
                    await link.reading.wait()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            session.on_lost()
            if link._closing is not None:
                with contextlib.suppress(Exception):
                    await link._closing
        return ws

    return handle
