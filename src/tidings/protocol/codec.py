"""Codecs: bytes <-> typed frames, for JSON and MessagePack.

``decode_client`` never raises anything but :class:`FrameError`, which carries the
error code to report and the request id when the frame had a usable one.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from tidings.protocol.frames import CLIENT_TYPES, ClientFrame, ServerFrame

CodecName = Literal["json", "msgpack"]
JSON: Final = "json"
MSGPACK: Final = "msgpack"


class FrameError(Exception):
    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def _request_id(loose: Any) -> int:
    if isinstance(loose, dict):
        rid = loose.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**63:
            return rid
    return 0


class Codec:
    """One wire codec: typed decode of client frames, encode of server frames."""

    def __init__(self, name: CodecName) -> None:
        self.name: CodecName = name
        self.binary = name == MSGPACK
        self._client: Any
        self._server: Any
        self._loose: Any
        if name == JSON:
            self._client = msgspec.json.Decoder(ClientFrame)
            self._server = msgspec.json.Decoder(ServerFrame)
            self._loose = msgspec.json.Decoder()
            self.encode = msgspec.json.Encoder().encode
        else:
            self._client = msgspec.msgpack.Decoder(ClientFrame)
            self._server = msgspec.msgpack.Decoder(ServerFrame)
            self._loose = msgspec.msgpack.Decoder()
            self.encode = msgspec.msgpack.Encoder().encode

    def decode_client(self, data: bytes) -> ClientFrame:
        try:
            frame: ClientFrame = self._client.decode(data)
            return frame
        except msgspec.ValidationError as exc:
            raise self._classify(data, exc) from None
        except (msgspec.DecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise FrameError("bad_frame", f"malformed {self.name}: {exc}") from None

    def decode_server(self, data: bytes) -> ServerFrame:
        frame: ServerFrame = self._server.decode(data)
        return frame

    def decode_any(self, data: bytes) -> Any:
        return self._loose.decode(data)

    def _classify(self, data: bytes, exc: msgspec.ValidationError) -> FrameError:
        try:
            loose = self._loose.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, ValueError, RecursionError):
            return FrameError("bad_frame", f"malformed {self.name}")
        rid = _request_id(loose)
        if not isinstance(loose, dict):
            return FrameError("bad_frame", "a frame must be an object", rid)
        kind = loose.get("t")
        if not isinstance(kind, str):
            return FrameError("invalid", "missing or non-string frame type `t`", rid)
        if kind not in CLIENT_TYPES:
            return FrameError("unknown_type", f"unknown frame type {kind[:40]!r}", rid)
        return FrameError("invalid", str(exc), rid)


CODECS: dict[str, Codec] = {JSON: Codec(JSON), MSGPACK: Codec(MSGPACK)}


def check_json_model(value: Any, depth: int = 0) -> bool:
    """True when ``value`` is in the JSON data model (no bytes, ext types, or deep nesting)."""
    if depth > 32:
        return False
    if value is None or isinstance(value, str | bool | int | float):
        return not isinstance(value, int) or -(2**63) <= value < 2**64
    if isinstance(value, list):
        return all(check_json_model(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and check_json_model(v, depth + 1) for k, v in value.items())
    return False


def encode_server(codec: Codec, frame: ServerFrame) -> bytes:
    return codec.encode(frame)
