"""Connection close codes (WebSocket close codes; the TCP `close` frame uses the same)."""

from __future__ import annotations

NORMAL = 1000
GOING_AWAY = 1001  # server shutting down: reconnect (to another node) and sync
PROTOCOL_ERROR = 1002  # reserved; a bad TCP preface is dropped without any answer
UNSUPPORTED_DATA = 1003  # a text frame on the msgpack subprotocol or vice versa
INVALID_DATA = 1007  # a WebSocket text message that is not UTF-8
TOO_BIG = 1009  # a frame over the limit, refused on its length before buffering
INTERNAL = 1011
TRY_AGAIN_LATER = 1013  # server overloaded: reconnect with backoff

AUTH_TIMEOUT = 4001  # no successful hello within the auth timeout
AUTH_FAILED = 4002  # the hello's token was refused (see the preceding error frame)
TOKEN_REVOKED = 4003  # the session's token or device was revoked while connected
KICKED = 4004  # a newer session replaced this one under the login policy
ACK_TIMEOUT = 4005  # pushes stayed unacknowledged after every retransmit: sync on reconnect
IDLE_TIMEOUT = 4006  # nothing received within the idle timeout
FLOOD = 4008  # the client kept sending far beyond its rate limit
SLOW_CONSUMER = 4009  # the client did not read its pushes fast enough: sync on reconnect
UNSUPPORTED_VERSION = 4010

MEANINGS: dict[int, str] = {
    NORMAL: "normal closure",
    GOING_AWAY: "server going away",
    PROTOCOL_ERROR: "protocol error",
    UNSUPPORTED_DATA: "unsupported data",
    INVALID_DATA: "invalid data",
    TOO_BIG: "frame too large",
    INTERNAL: "internal error",
    TRY_AGAIN_LATER: "try again later",
    AUTH_TIMEOUT: "authentication timeout",
    AUTH_FAILED: "authentication failed",
    TOKEN_REVOKED: "token revoked",
    KICKED: "kicked",
    ACK_TIMEOUT: "pushes not acknowledged",
    IDLE_TIMEOUT: "idle timeout",
    FLOOD: "flood",
    SLOW_CONSUMER: "slow consumer",
    UNSUPPORTED_VERSION: "unsupported protocol version",
}
