"""Sans-I/O framing for the raw TCP transport and for pre-built WebSocket frames.

Raw TCP: the client opens with the 8-byte preface ``b"TIDINGS"`` + version byte; the
server answers with its own preface, then both sides exchange frames of a 4-byte
big-endian length followed by that many bytes of MessagePack. The length is checked
against the limit before any of the payload is buffered.
"""

from __future__ import annotations

import struct

MAGIC = b"TIDINGS"
PREFACE_LEN = len(MAGIC) + 1
_LEN = struct.Struct(">I")


def preface(version: int) -> bytes:
    return MAGIC + bytes([version])


class FramingError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "preface", "version" or "too_large"


class TcpFrameDecoder:
    """Feed bytes, get complete frame payloads. Raises FramingError on violations."""

    def __init__(self, max_frame: int, *, expect_preface: bool, versions: frozenset[int]) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need_preface = expect_preface
        self._versions = versions
        self.version: int | None = None

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        if self._need_preface:
            if len(buf) < PREFACE_LEN:
                if not MAGIC.startswith(bytes(buf[: len(MAGIC)])):
                    raise FramingError("preface", "bad preface")
                return out
            if bytes(buf[: len(MAGIC)]) != MAGIC:
                raise FramingError("preface", "bad preface")
            self.version = buf[len(MAGIC)]
            del buf[:PREFACE_LEN]
            self._need_preface = False
            if self.version not in self._versions:
                raise FramingError("version", f"unsupported version {self.version}")
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > self.max_frame:
                raise FramingError("too_large", f"frame of {size} bytes over {self.max_frame}")
            if end - pos - 4 < size:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def tcp_frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


WS_TEXT = 0x1
WS_BINARY = 0x2


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """An unmasked, unfragmented server-to-client WebSocket frame (RFC 6455 section 5.2)."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, n))
    elif n < 65536:
        header = struct.pack(">BBH", first, 126, n)
    else:
        header = struct.pack(">BBQ", first, 127, n)
    return header + payload
