"""Raw WebSocket clients for the fan-out benches: plain sockets, no event loop.

Thousands of viewers in one process cost little this way: the handshake runs in
batches over blocking sockets, then every socket is read from an epoll loop that only
counts markers in the bytes (bulk viewers) or parses frames (sampled viewers and group
members, which must also acknowledge pushes). JSON codec only: the markers are JSON.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from typing import Any

SUBPROTOCOL = "tidings.v1.json"
HANDSHAKE_TIMEOUT_S = 60.0


def client_frame(payload: bytes) -> bytes:
    """A masked text frame (the zero mask: the payload goes out as is)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + b"\x00\x00\x00\x00" + payload


def send_json(sock: socket.socket, obj: Any) -> None:
    sock.sendall(client_frame(json.dumps(obj, separators=(",", ":")).encode()))


class FrameReader:
    """Splits the server's (unmasked) WebSocket frames out of a byte stream."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            if b1 < 126:
                head, n = 2, b1
            elif b1 == 126:
                if end - pos < 4:
                    break
                head, n = 4, struct.unpack_from("!H", buf, pos + 2)[0]
            else:
                if end - pos < 10:
                    break
                head, n = 10, struct.unpack_from("!Q", buf, pos + 2)[0]
            if end - pos < head + n:
                break
            if buf[pos] & 0x0F in (0x1, 0x2):
                out.append(bytes(buf[pos + head : pos + head + n]))
            pos += head + n
        del buf[:pos]
        return out


def open_ws(
    host: str,
    port: int,
    source: str | None = None,
    timeout: float = HANDSHAKE_TIMEOUT_S,
    *,
    path: str = "/v1/ws",
    protocol: str | None = SUBPROTOCOL,
    rcvbuf: int | None = 16384,
) -> socket.socket:
    """Connect and send the upgrade request (the answer is read by ``login``, or by the
    caller); the socket is closed if that fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        offer = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{offer}\r\n"
            ).encode()
        )
    except BaseException:
        sock.close()
        raise
    return sock


def read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> None:
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    while marker not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} from the server")
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {marker!r}: {bytes(buf[-200:])!r}")
        buf += data


def login(sock: socket.socket, token: str) -> bytearray:
    """Finish the upgrade and authenticate; what came after `ready` is returned (the
    start of the frame stream)."""
    buf = bytearray()
    read_until(sock, buf, b"\r\n\r\n")
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    buf = bytearray(rest)
    send_json(sock, {"t": "hello", "id": 1, "v": 1, "token": token})
    read_until(sock, buf, b'"t":"ready"')
    return _after(buf, b'"t":"ready"')


def _after(buf: bytearray, marker: bytes) -> bytearray:
    """The bytes after the frame holding ``marker`` (frames are parsed, not guessed)."""
    reader = FrameReader()
    frames = reader.feed(bytes(buf))
    for i, f in enumerate(frames):
        if marker in f:
            rest = bytearray()
            for g in frames[i + 1 :]:
                rest += _server_frame(g)
            rest += reader.buf
            return rest
    raise ConnectionError(f"{marker!r} not in a frame")


def _server_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def join(sock: socket.socket, room: str, pending: bytearray) -> bytearray:
    """Enter a room; returns the stream after the `joined` answer."""
    send_json(sock, {"t": "join", "id": 2, "room": room})
    read_until(sock, pending, b'"t":"joined"')
    return _after(pending, b'"t":"joined"')
