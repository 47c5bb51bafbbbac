"""Lean protocol clients for the benchmarks: one asyncio.Protocol per connection.

Not the SDK: no task per connection, no queue per frame. Bytes are parsed in
``data_received`` (WebSocket or raw TCP framing), decoded with msgspec into small Structs
holding only the fields the bench reads, and handed to ``on_frames`` in one batch per
read, so a recipient can answer a whole read with one cumulative ack.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time
from typing import Any, Literal

import msgspec

from tidings.protocol import PROTOCOL_VERSION
from tidings.protocol.framing import MAGIC, PREFACE_LEN, preface

Transport = Literal["ws", "tcp"]
CodecName = Literal["json", "msgpack"]
SUBPROTOCOL = {"json": "tidings.v1.json", "msgpack": "tidings.v1.msgpack"}
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_FRAME = 1 << 20  # what the bench accepts from the server
MAX_BUFFER = 64 << 20  # a client write buffer past this aborts the connection

# ------------------------------------------------------------------ server -> client


class SrvHello(msgspec.Struct, tag="hello", tag_field="t"):
    heartbeat_ms: int = 25_000


class SrvReady(msgspec.Struct, tag="ready", tag_field="t"):
    id: int = 0


class SrvSent(msgspec.Struct, tag="sent", tag_field="t"):
    id: int
    seq: int
    mid: str
    dup: bool = False


class BenchBody(msgspec.Struct):
    n: int = -1  # the message's number within its pair
    at: int = 0  # its scheduled send time, CLOCK_MONOTONIC microseconds


class SrvMessage(msgspec.Struct):
    conv: str
    seq: int
    mid: str
    cid: str
    body: BenchBody


class SrvPush(msgspec.Struct, tag="push", tag_field="t"):
    m: SrvMessage


class SrvError(msgspec.Struct, tag="error", tag_field="t"):
    code: str
    message: str = ""
    id: int = 0


class SrvPong(msgspec.Struct, tag="pong", tag_field="t"):
    id: int = 0


class SrvClose(msgspec.Struct, tag="close", tag_field="t"):
    code: int = 0
    reason: str = ""


class SrvOther(msgspec.Struct, tag_field="t"):
    """Frames the bench never asks for (synced, page): decoded and ignored."""


class SrvSynced(SrvOther, tag="synced"):
    pass


class SrvPage(SrvOther, tag="page"):
    pass


SrvFrame = (
    SrvHello | SrvReady | SrvSent | SrvPush | SrvError | SrvPong | SrvClose | SrvSynced | SrvPage
)

# ------------------------------------------------------------------ client -> server


class CliHello(msgspec.Struct, tag="hello", tag_field="t"):
    v: int
    token: str
    id: int
    client: str = "tidings-bench"


class SendBody(msgspec.Struct):
    text: str
    n: int
    at: int


class CliSend(msgspec.Struct, tag="send", tag_field="t"):
    id: int
    cid: str
    to: str
    body: SendBody


class CliAck(msgspec.Struct, tag="ack", tag_field="t"):
    conv: str
    seq: int


class CliPing(msgspec.Struct, tag="ping", tag_field="t"):
    id: int = 0


CliFrame = CliHello | CliSend | CliAck | CliPing

_LEN = struct.Struct(">I")
_WS_SHORT = struct.Struct(">BB4s")
_WS_MEDIUM = struct.Struct(">BBH4s")
_WS_LONG = struct.Struct(">BBQ4s")


class ProtocolFailure(Exception):
    pass


class LeanConn(asyncio.Protocol):
    """One device connection. Subclasses override ``on_frames``; ``ready`` resolves once
    the server answered the hello (or fails with the reason the connection died)."""

    def __init__(
        self, transport_kind: Transport, codec: CodecName, host: str, port: int, token: str
    ) -> None:
        self.kind = transport_kind
        self.codec = codec
        self.host = host
        self.port = port
        self.token = token
        if codec == "json":
            self._decode: Any = msgspec.json.Decoder(SrvFrame).decode
            self._encode: Any = msgspec.json.Encoder().encode
        else:
            self._decode = msgspec.msgpack.Decoder(SrvFrame).decode
            self._encode = msgspec.msgpack.Encoder().encode
        self._opcode = 0x1 if codec == "json" else 0x2
        self._mask = os.urandom(4)
        self._mask_cache: dict[int, int] = {}
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._state = "connecting"  # -> upgrade | preface -> hello -> ready -> closed
        self._ws_key = ""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.heartbeat_ms = 25_000
        self.close_code = 0
        self.close_reason = ""
        self.closed_by_us = False
        self.frames_in = 0
        self.bad_frames = 0

    # ------------------------------------------------------------------ hooks

    def on_frames(self, frames: list[Any], now: float) -> None:
        """Frames decoded from one read, after the handshake."""

    def on_closed(self) -> None:
        """The connection is gone (after or before ``ready``)."""

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = transport  # type: ignore[assignment]
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.kind == "ws":
            self._ws_key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET /v1/ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {self._ws_key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {SUBPROTOCOL[self.codec]}\r\n\r\n"
            )
            self._state = "upgrade"
            self.transport.write(request.encode())  # type: ignore[union-attr]
        else:
            self._state = "preface"
            self.transport.write(preface(PROTOCOL_VERSION))  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state != "closed":
            self._state = "closed"
            if not self.close_reason:
                self.close_reason = f"connection lost: {exc}" if exc else "connection lost"
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ProtocolFailure(self.close_reason))
        self.on_closed()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == "ready":
            payloads = self._split(data)
        elif state in ("upgrade", "preface"):
            self._buf += data
            if not self._handshake():
                return
            data, self._buf = bytes(self._buf), bytearray()
            payloads = self._split(data)
        elif state == "hello":
            payloads = self._split(data)
        else:
            return
        if not payloads:
            return
        decode = self._decode
        frames: list[Any] = []
        for p in payloads:
            try:
                frames.append(decode(p))
            except msgspec.MsgspecError:
                self.bad_frames += 1
        self.frames_in += len(frames)
        if self._state == "hello":
            frames = self._on_handshake_frames(frames)
            if not frames:
                return
        for f in frames:
            if type(f) is SrvClose:
                self.close_code = f.code
                self.close_reason = f.reason
        self.on_frames(frames, time.monotonic())

    # ------------------------------------------------------------------ handshake

    def _handshake(self) -> bool:
        buf = self._buf
        if self._state == "preface":
            if len(buf) < PREFACE_LEN:
                return False
            if bytes(buf[: len(MAGIC)]) != MAGIC:
                self._fail("bad server preface")
                return False
            del buf[:PREFACE_LEN]
            self._state = "hello"
            return True
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 16384:
                self._fail("oversized upgrade response")
            return False
        head = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        if len(head[0].split()) < 2 or head[0].split()[1] != "101":
            self._fail(f"upgrade refused: {head[0]}")
            return False
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._ws_key.encode() + WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            self._fail("bad Sec-WebSocket-Accept")
            return False
        if headers.get("sec-websocket-protocol") != SUBPROTOCOL[self.codec]:
            self._fail("server did not select the subprotocol")
            return False
        self._state = "hello"
        return True

    def _on_handshake_frames(self, frames: list[Any]) -> list[Any]:
        for i, f in enumerate(frames):
            kind = type(f)
            if kind is SrvHello:
                self.heartbeat_ms = f.heartbeat_ms
                self.send_frame(CliHello(PROTOCOL_VERSION, self.token, 1))
            elif kind is SrvReady:
                self._state = "ready"
                if not self.ready.done():
                    self.ready.set_result(None)
                return frames[i + 1 :]
            elif kind is SrvError or kind is SrvClose:
                reason = f"{f.code}: {getattr(f, 'message', '') or getattr(f, 'reason', '')}"
                self.close_reason = reason
                self._fail(reason)
                return []
        return []

    def _fail(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if not self.ready.done():
            self.ready.set_exception(ProtocolFailure(reason))
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ framing

    def _split(self, data: bytes) -> list[bytes]:
        """Complete frame payloads from ``data`` plus what an earlier read left over."""
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        if self.kind == "tcp":
            out, pos = self._split_tcp(data)
        else:
            out, pos = self._split_ws(data)
        if pos < len(data):
            self._buf += data[pos:]
        return out

    def _split_tcp(self, data: bytes) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        pos = 0
        end = len(data)
        unpack = _LEN.unpack_from
        while end - pos >= 4:
            (size,) = unpack(data, pos)
            if size > MAX_FRAME:
                self._fail(f"frame of {size} bytes")
                return out, end
            if end - pos - 4 < size:
                break
            out.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
        return out, pos

    def _split_ws(self, data: bytes) -> tuple[list[bytes], int]:
        out: list[bytes] = []
        pos = 0
        end = len(data)
        while end - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            size = b1 & 0x7F
            head = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif size == 127:
                if end - pos < 10:
                    break
                size = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:
                self._fail("masked frame from the server")
                return out, end
            if size > MAX_FRAME:
                self._fail(f"frame of {size} bytes")
                return out, end
            if end - pos - head < size:
                break
            start = pos + head
            pos = start + size
            opcode = b0 & 0x0F
            if not b0 & 0x80:
                self._fail("fragmented frame")
                return out, end
            if opcode == 0x1 or opcode == 0x2:
                out.append(data[start:pos])
            elif opcode == 0x8:
                if size >= 2:
                    self.close_code = int.from_bytes(data[start : start + 2], "big")
                    self.close_reason = data[start + 2 : pos].decode("utf-8", "replace")
                self._write_ws(data[start : start + 2], 0x8)
                if self.transport is not None:
                    self.transport.close()
                self._state = "closed"
                return out, end
            elif opcode == 0x9:
                self._write_ws(data[start:pos], 0xA)
        return out, pos

    # ------------------------------------------------------------------ sending

    def _write_ws(self, payload: bytes, opcode: int) -> None:
        """A masked client frame (RFC 6455 5.3), masked with one big-integer XOR."""
        t = self.transport
        if t is None:
            return
        n = len(payload)
        key = self._mask
        if n:
            mask = self._mask_cache.get(n)
            if mask is None:
                mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
                if len(self._mask_cache) < 4096:
                    self._mask_cache[n] = mask
            payload = (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")
        if n < 126:
            head = _WS_SHORT.pack(0x80 | opcode, 0x80 | n, key)
        elif n < 65536:
            head = _WS_MEDIUM.pack(0x80 | opcode, 0xFE, n, key)
        else:
            head = _WS_LONG.pack(0x80 | opcode, 0xFF, n, key)
        t.write(head + payload)

    def send_frame(self, frame: CliFrame) -> bool:
        """Encode and write one frame; False when the connection is gone."""
        t = self.transport
        if t is None or self._state == "closed":
            return False
        payload: bytes = self._encode(frame)
        if self.kind == "tcp":
            t.write(_LEN.pack(len(payload)) + payload)
        else:
            self._write_ws(payload, self._opcode)
        if t.get_write_buffer_size() > MAX_BUFFER:
            self.close_reason = "client write buffer over its limit"
            t.abort()
            return False
        return True

    @property
    def is_ready(self) -> bool:
        return self._state == "ready"

    def close(self) -> None:
        self.closed_by_us = True
        t = self.transport
        if t is None:
            return
        if self.kind == "ws" and self._state == "ready":
            self._write_ws((1000).to_bytes(2, "big"), 0x8)
        self._state = "closed"
        self.close_reason = self.close_reason or "closed by the bench"
        t.close()
