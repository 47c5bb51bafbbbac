"""WebSocket at /v1/ws on the HTTP port, spoken by hand (RFC 6455) on the raw protocol.

Every connection to the HTTP port starts with :class:`HttpDispatch`. It reads the
request head. A well-formed WebSocket upgrade to ``/v1/ws`` is answered here (``101``)
and the connection becomes a :class:`WsConn`: frames are parsed in ``data_received`` and
handed to the session, as on the raw TCP transport. Anything else is handed, bytes and
all, to aiohttp, unchanged: the HTTP API, the web app, and the upgrade requests this
parser does not take (aiohttp's own ``/v1/ws`` handler answers them as before, errors
included).

Why not aiohttp's WebSocket here: a login storm spent about a third of the server's
loop in aiohttp's request and handshake machinery, and every received frame goes
through its reader and an ``async for``. See docs/architecture.md ("The WebSocket
gateway") for the measurements.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Callable
from typing import Any, cast

from tidings.gateway.bounded import BoundedWriter
from tidings.gateway.websocket import (
    SUBPROTOCOL_MSGPACK,
    SUBPROTOCOLS,
    is_utf8,
    origin_permitted,
)
from tidings.protocol import close
from tidings.protocol.codec import CODECS, JSON, MSGPACK, Codec
from tidings.protocol.framing import WS_BINARY, WS_TEXT, ws_frame
from tidings.session.context import ServerContext
from tidings.session.session import Session

log = logging.getLogger(__name__)

PATH = b"/v1/ws"
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD_BYTES = 8192  # a longer head is aiohttp's to refuse
CLOSE_TIMEOUT_S = 5.0  # how long a close (ours or the client's) waits for its end
MAX_FRAGMENTS = 1024  # a message in more pieces than this is refused
# Close codes a client may send (RFC 6455 7.4): anything else is answered with 1002.
VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011))
OP_CONT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x8, 0x9, 0xA


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + ACCEPT_GUID).digest())


def unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask`` (as one big integer: C speed)."""
    n = len(data)
    if not n:
        return b""
    key = (bytes(mask) * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class Upgrade:
    __slots__ = ("host", "key", "origin", "protocol")

    def __init__(self, key: bytes, origin: str | None, host: str, protocol: str | None) -> None:
        self.key = key
        self.origin = origin
        self.host = host
        self.protocol = protocol


def parse_upgrade(head: bytes) -> Upgrade | None:
    """The upgrade a request head asks for, or None when it is anything else (or not
    well formed: aiohttp then answers it)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1]
    if target != PATH and not target.startswith(PATH + b"?"):
        return None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            return None
        name = name.lower()
        if name in headers:  # repeated headers: leave the odd request to aiohttp
            return None
        headers[name] = value.strip()
    upgrade = headers.get(b"upgrade", b"").lower()
    tokens = {t.strip() for t in headers.get(b"connection", b"").lower().split(b",")}
    if upgrade != b"websocket" or b"upgrade" not in tokens:
        return None
    if headers.get(b"sec-websocket-version") != b"13":
        return None
    if b"transfer-encoding" in headers or b"content-length" in headers:
        return None  # a GET with a body: aiohttp's to answer
    key = headers.get(b"sec-websocket-key", b"")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
        origin = headers[b"origin"].decode() if b"origin" in headers else None
        host = headers.get(b"host", b"").decode()
        offered = [p.strip() for p in headers.get(b"sec-websocket-protocol", b"").split(b",")]
    except (ValueError, UnicodeDecodeError):
        return None
    chosen: str | None = None
    for p in offered:  # the client's order, as aiohttp chooses
        proto = p.decode("latin-1")
        if proto in SUBPROTOCOLS:
            chosen = proto
            break
    return Upgrade(key, origin, host, chosen)


def origin_ok(up: Upgrade, allowed: list[str]) -> bool:
    """The same Origin rule as aiohttp's handler (``websocket.origin_permitted``)."""
    return origin_permitted(up.origin, up.host, allowed)


class HttpDispatch(asyncio.Protocol):
    """The first protocol of a connection to the HTTP port (see the module's text)."""

    __slots__ = ("_buf", "_gateway", "_timer", "_transport")

    def __init__(self, gateway: WsGateway) -> None:
        self._gateway = gateway
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._gateway.pending.add(self)
        # A connection that never completes its request head is cut (aiohttp's own
        # keep-alive timer starts only once it has the connection).
        wait = self._gateway.ctx.settings.auth_timeout_ms / 1000
        self._timer = self._gateway.loop.call_later(wait, self.abort)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _done(self) -> asyncio.Transport:
        """The head is in: this protocol's part is over."""
        if self._timer is not None:
            self._timer.cancel()
        self._gateway.pending.discard(self)
        t = self._transport
        assert t is not None
        self._transport = None
        return t

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES or not buf.startswith(b"GET /v1/ws"[: len(buf)]):
                self._to_aiohttp(buf)
            else:
                self._buf = buf
            return
        up = parse_upgrade(buf[:end])
        gw = self._gateway
        if up is None or not origin_ok(up, gw.ctx.settings.allowed_origins):
            self._to_aiohttp(buf)  # aiohttp answers (403 for an origin, 400s, the API)
            return
        t = self._done()
        if gw.draining:  # the server is shutting down: no new sessions
            t.abort()
            return
        conn = WsConn(gw, t, up)
        t.set_protocol(conn)
        conn.start(buf[end + 4 :])

    def _to_aiohttp(self, buf: bytes) -> None:
        t = self._done()
        handler = self._gateway.fallback()
        t.set_protocol(handler)
        handler.connection_made(t)
        handler.data_received(buf)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._done()


class WsConn(BoundedWriter, asyncio.Protocol):
    """One upgraded connection: the session's link, and the frame parser."""

    framing = "ws"

    def __init__(self, gw: WsGateway, transport: asyncio.Transport, up: Upgrade) -> None:
        s = gw.ctx.settings
        self.gw = gw
        self.transport: asyncio.Transport | None = transport
        self.max_buffer = s.send_buffer_bytes
        self.max_frame = s.max_frame_bytes
        self.codec: Codec = CODECS[MSGPACK if up.protocol == SUBPROTOCOL_MSGPACK else JSON]
        self._opcode = WS_BINARY if self.codec.binary else WS_TEXT
        peer: Any = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        self.session: Session | None = None
        self._up = up
        self._buf = bytearray()
        self._frag_op = 0  # the opcode of a message arriving in fragments
        self._frags = bytearray()
        self._frag_count = 0
        self._closing = False  # a close frame went out (ours, or our echo of the client's)
        self._discard = False  # the connection failed: what still comes in is dropped
        self._close_timer: asyncio.TimerHandle | None = None
        self._head = b""  # the 101 answer, until the first frame carries it

    def start(self, rest: bytes) -> None:
        t = self.transport
        assert t is not None
        head = [
            b"HTTP/1.1 101 Switching Protocols",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Accept: " + accept_key(self._up.key),
        ]
        if self._up.protocol is not None:
            head.append(b"Sec-WebSocket-Protocol: " + self._up.protocol.encode())
        # The 101 goes out with the session's first frame (its hello): one segment.
        self._head = b"\r\n".join(head) + b"\r\n\r\n"
        self.gw.conns.add(self)
        session = self.session = Session(self, self.gw.ctx)
        session.start()
        if self._head:
            t.write(self._head)
            self._head = b""
        if rest:
            self.data_received(rest)

    def write(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        BoundedWriter.write(self, data)

    # ------------------------------------------------------------------ Link

    def frame(self, payload: bytes) -> bytes:
        return ws_frame(payload, self._opcode)

    def pause_reading(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def close(self, code: int, reason: str) -> None:
        """Send a close frame; the connection ends when the client answers it (or after
        CLOSE_TIMEOUT_S)."""
        t = self.transport
        if t is None or self._closing or self.abort_if_overfull():
            return
        self._closing = True
        self.resume_reading()  # the client's answer must be read, even if we paused
        # The reason cut to 120 bytes, never inside a UTF-8 character.
        text = reason.encode()[:120].decode("utf-8", "ignore").encode()
        t.write(ws_frame(code.to_bytes(2, "big") + text, OP_CLOSE))
        self._arm_abort()

    def _arm_abort(self) -> None:
        t = self.transport
        if t is not None and self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, t.abort)

    # ------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            size = b1 & 0x7F
            at = pos + 2
            if size == 126:
                if end - at < 2:
                    break
                size = int.from_bytes(buf[at : at + 2], "big")
                at += 2
            elif size == 127:
                if end - at < 8:
                    break
                size = int.from_bytes(buf[at : at + 8], "big")
                at += 8
            op = b0 & 0x0F
            if b0 & 0x70 or not b1 & 0x80:
                self._fail(close.PROTOCOL_ERROR, "reserved bits set or frame not masked")
                return
            if op >= 8:
                if size > 125 or not b0 & 0x80:
                    self._fail(close.PROTOCOL_ERROR, "bad control frame")
                    return
            elif size + len(self._frags) > self.max_frame:
                self._fail(close.TOO_BIG, f"message over {self.max_frame} bytes")
                return
            if end - at < 4 + size:
                break
            payload = unmask(buf[at + 4 : at + 4 + size], buf[at : at + 4])
            pos = at + 4 + size
            if not self._frame(b0 & 0x80, op, payload):
                buf.clear()  # the connection is over: nothing more is read
                return
        if pos:
            del buf[:pos]

    def _frame(self, fin: int, op: int, payload: bytes) -> bool:
        """One frame; False when the connection is done with."""
        if op >= 8:
            if op == OP_PING:
                if not self._closing:
                    self.write(ws_frame(payload, OP_PONG))  # bounded: pings cannot pile up
            elif op == OP_CLOSE:
                self._on_close(payload)
                return False
            elif op != OP_PONG:
                self._fail(close.PROTOCOL_ERROR, f"unknown opcode {op}")
                return False
            return True
        if op == OP_CONT:
            if not self._frag_op:
                self._fail(close.PROTOCOL_ERROR, "continuation without a first fragment")
                return False
            self._frags += payload
            self._frag_count += 1
            if not fin:
                if self._frag_count > MAX_FRAGMENTS:
                    self._fail(close.TOO_BIG, f"message in over {MAX_FRAGMENTS} fragments")
                    return False
                return True
            op, payload = self._frag_op, bytes(self._frags)
            self._frag_op, self._frags, self._frag_count = 0, bytearray(), 0
        elif op not in (WS_TEXT, WS_BINARY) or self._frag_op:
            self._fail(close.PROTOCOL_ERROR, f"unexpected opcode {op}")
            return False
        elif not fin:
            self._frag_op, self._frags, self._frag_count = op, bytearray(payload), 1
            return True
        session = self.session
        if session is None or self._closing:
            return True  # after our close frame only the client's close matters
        if (op == WS_BINARY) != self.codec.binary:
            kind = "binary frame on json" if op == WS_BINARY else "text frame on msgpack"
            self._fail(close.UNSUPPORTED_DATA, f"{kind} protocol")
            return False
        if op == WS_TEXT and not is_utf8(payload):  # checked on the whole message
            self._fail(close.INVALID_DATA, "text message is not UTF-8")
            return False
        session.on_frame(payload)
        return self.transport is not None

    def _on_close(self, payload: bytes) -> None:
        t = self.transport
        if t is None:
            return
        if not self._closing:  # the client closes first: echo its code, then end
            self._closing = True
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else close.NORMAL
            if len(payload) == 1 or not (code in VALID_CLOSE or 3000 <= code <= 4999):
                code = close.PROTOCOL_ERROR
            t.write(ws_frame(code.to_bytes(2, "big"), OP_CLOSE))
        t.close()
        self._arm_abort()  # a client that stops reading cannot hold the socket

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): our close frame, then our end of the TCP
        connection; whatever the client still sends is dropped until it closes (or the
        close timeout). The parser's place in the stream is lost, so nothing after the
        fault is read as frames."""
        log.debug("websocket from %s: %s", self.peer, reason)
        self._discard = True
        self._buf.clear()
        if self.session is not None:
            self.session.close(code, reason)
        else:
            self.close(code, reason)
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self._arm_abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        self.gw.conns.discard(self)
        self.transport = None
        if self.session is not None:
            self.session.on_lost()


class WsGateway:
    """The protocol factory of the HTTP port: WebSockets here, the rest to aiohttp."""

    def __init__(self, ctx: ServerContext, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.ctx = ctx
        self.fallback = fallback
        self.conns: set[WsConn] = set()
        self.pending: set[HttpDispatch] = set()  # connections still sending their head
        self.draining = False  # set when the server stops: no new WebSocket sessions
        self.loop = asyncio.get_running_loop()  # made by the running server, once

    def __call__(self) -> HttpDispatch:
        return HttpDispatch(self)

    def abort_all(self) -> None:
        """The end of a drain: connections whose clients never answered the close, and
        those that never finished their request head."""
        for d in list(self.pending):
            d.abort()
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.abort()
