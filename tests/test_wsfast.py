"""The WebSocket gateway spoken by hand (gateway/wsfast.py), byte by byte: the upgrade
and what is handed to aiohttp instead, subprotocols, fragments, control frames, the
protocol errors and their close codes, and the parser's unit pieces."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import aiohttp
import msgspec
import pytest

from tests.conftest import Harness
from tidings.gateway.wsfast import accept_key, origin_ok, parse_upgrade, unmask
from tidings.protocol import close

KEY = base64.b64encode(b"0123456789abcdef")


def head(path: str = "/v1/ws", protocol: str | None = "tidings.v1.json", **extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY.decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def masked(payload: bytes, op: int = 0x1, fin: bool = True, mask: bool = True) -> bytes:
    """A client frame (masked unless told otherwise)."""
    first = (0x80 if fin else 0) | op
    n = len(payload)
    if n < 126:
        hdr = bytes((first, (0x80 if mask else 0) | n))
    elif n < 65536:
        hdr = bytes((first, (0x80 if mask else 0) | 126)) + n.to_bytes(2, "big")
    else:
        hdr = bytes((first, (0x80 if mask else 0) | 127)) + n.to_bytes(8, "big")
    if not mask:
        return hdr + payload
    key = os.urandom(4)
    return hdr + key + unmask(payload, key)


class Wire:
    """A raw socket speaking WebSocket frames to the server."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w

    @classmethod
    async def open(cls, h: Harness, data: bytes | None = None) -> tuple[Wire, bytes]:
        r, w = await asyncio.open_connection("127.0.0.1", h.server.http_port)
        w.write(head() if data is None else data)
        answer = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        return cls(r, w), answer

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.r.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.r.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.r.readexactly(8), "big")
            assert not b1 & 0x80, "server frames are never masked"
            return b0 & 0x0F, await self.r.readexactly(n)

        return await asyncio.wait_for(read(), timeout)

    async def until(self, op: int) -> bytes:
        while True:
            got, payload = await self.frame()
            if got == op:
                return payload

    async def json(self) -> dict[str, Any]:
        return dict(msgspec.json.decode(await self.until(0x1)))

    def close(self) -> None:
        self.w.close()


def test_parse_upgrade_and_helpers() -> None:
    up = parse_upgrade(head(protocol="x, tidings.v1.msgpack, tidings.v1.json")[:-4])
    assert up is not None and up.protocol == "tidings.v1.msgpack" and up.key == KEY
    assert parse_upgrade(head("/v1/ws?x=1")[:-4]) is not None
    for bad in (
        head("/v1/other")[:-4],
        head()[:-4].replace(b"GET", b"POST"),
        head()[:-4].replace(b"Version: 13", b"Version: 8"),
        head()[:-4].replace(KEY, b"c2hvcnQ="),  # 5 bytes, not 16
        head()[:-4].replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        head()[:-4] + b"\r\nHost: twice",
        head()[:-4] + b"\r\nno colon here",
    ):
        assert parse_upgrade(bad) is None, bad
    assert parse_upgrade(head(protocol=None)[:-4]).protocol is None  # type: ignore[union-attr]
    # RFC 6455's own example of the accept key.
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert unmask(unmask(b"hello world", b"abcd"), b"abcd") == b"hello world"
    assert unmask(b"", b"abcd") == b""
    up = parse_upgrade(head(Origin="http://evil.example")[:-4])
    assert up is not None and not origin_ok(up, []) and origin_ok(up, ["*"])
    up = parse_upgrade(head(Origin="http://127.0.0.1")[:-4])
    assert up is not None and origin_ok(up, [])


async def test_upgrade_and_a_login_over_raw_bytes(harness: Harness) -> None:
    """The 101 answer with the accept key and the chosen subprotocol; the hello, a
    hello frame split over three writes with a ping between its fragments, and the
    answers; the client's close is echoed."""
    await harness.user("alice")
    token = await harness.token("alice")
    wire, answer = await Wire.open(harness)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: " + accept_key(KEY) in answer
    assert b"Sec-WebSocket-Protocol: tidings.v1.json" in answer
    assert (await wire.json())["t"] == "hello"
    body = msgspec.json.encode({"t": "hello", "v": 1, "token": token, "id": 1})
    a, b = body[:10], body[10:]
    wire.w.write(masked(a, op=0x1, fin=False))
    wire.w.write(masked(b"are you there", op=0x9))  # a ping between fragments
    await wire.w.drain()
    middle = masked(b[:5], op=0x0, fin=False)
    wire.w.write(middle[:3])  # a frame split across writes
    await asyncio.sleep(0.05)
    wire.w.write(middle[3:] + masked(b[5:], op=0x0))
    assert await wire.until(0xA) == b"are you there"
    ready = await wire.json()
    assert ready["t"] == "ready" and ready["user"] == "alice"
    wire.w.write(masked(close.NORMAL.to_bytes(2, "big") + b"bye", op=0x8))
    assert await wire.until(0x8) == close.NORMAL.to_bytes(2, "big")
    assert await asyncio.wait_for(wire.r.read(), 5) == b""  # the server ended it
    wire.close()


async def test_a_character_split_between_fragments_is_whole_again(harness: Harness) -> None:
    """UTF-8 is checked on the whole text message: fragments may cut a character."""
    await harness.user("alice")
    await harness.user("bob")
    token = await harness.token("alice")
    wire, _ = await Wire.open(harness)
    assert (await wire.json())["t"] == "hello"
    wire.w.write(masked(msgspec.json.encode({"t": "hello", "v": 1, "token": token, "id": 1})))
    assert (await wire.json())["t"] == "ready"
    send = {"t": "send", "id": 2, "to": "bob", "cid": "c1", "body": {"text": "é!"}}
    body = msgspec.json.encode(send)
    cut = body.index("é".encode()) + 1  # between the character's two bytes
    wire.w.write(masked(body[:cut], fin=False) + masked(body[cut:], op=0x0))
    sent = await wire.json()
    assert sent["t"] == "sent" and sent["id"] == 2, sent
    wire.close()


async def test_a_frame_right_behind_the_head_is_read(harness: Harness) -> None:
    await harness.user("bob")
    token = await harness.token("bob")
    hello = masked(msgspec.json.encode({"t": "hello", "v": 1, "token": token, "id": 1}))
    wire, answer = await Wire.open(harness, head() + hello)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert (await wire.json())["t"] == "hello"
    assert (await wire.json())["t"] == "ready"
    wire.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (masked(b'{"t":"ping"}', mask=False), close.PROTOCOL_ERROR),  # not masked
        (bytes((0x80 | 0x40 | 0x1, 0x80)) + b"\0\0\0\0", close.PROTOCOL_ERROR),  # RSV1
        (masked(b"x" * 126, op=0x9), close.PROTOCOL_ERROR),  # control frame too long
        (masked(b"x", op=0x9, fin=False), close.PROTOCOL_ERROR),  # fragmented control
        (masked(b"x", op=0x0), close.PROTOCOL_ERROR),  # continuation with no start
        (masked(b"x", op=0x3), close.PROTOCOL_ERROR),  # reserved opcode
        (masked(b"\x81", op=0x2), close.UNSUPPORTED_DATA),  # binary on the json protocol
        (masked(b'{"t":"ping","id":1,"x":"\xff"}'), close.INVALID_DATA),  # not UTF-8
        (masked(b'{"t":"pi', fin=False) + masked(b'ng\xc3"}', op=0x0), close.INVALID_DATA),
    ],
)
async def test_protocol_violations_close_with_their_codes(
    harness: Harness, frame: bytes, code: int
) -> None:
    wire, _ = await Wire.open(harness)
    assert (await wire.json())["t"] == "hello"
    wire.w.write(frame)
    got = await wire.until(0x8)
    assert int.from_bytes(got[:2], "big") == code, got
    wire.w.write(masked(got[:2], op=0x8))  # answer the close: the server ends it at once
    assert await asyncio.wait_for(wire.r.read(), 5) == b""
    wire.close()


async def test_oversize_message_is_refused_on_its_length(make_server: Any) -> None:
    """A frame, or fragments adding up, over max_frame_bytes: 1009 from the length
    alone (the payload is never waited for)."""
    h = await make_server(max_frame_bytes=1024)
    wire, _ = await Wire.open(h)
    await wire.json()
    wire.w.write(bytes((0x81, 0x80 | 127)) + (10**9).to_bytes(8, "big"))  # no payload
    got = await wire.until(0x8)
    assert int.from_bytes(got[:2], "big") == close.TOO_BIG
    wire.close()
    wire, _ = await Wire.open(h)
    await wire.json()
    wire.w.write(masked(b"x" * 600, fin=False) + masked(b"y" * 600, op=0x0))
    got = await wire.until(0x8)
    assert int.from_bytes(got[:2], "big") == close.TOO_BIG
    wire.close()


async def test_what_is_not_our_upgrade_goes_to_aiohttp(harness: Harness) -> None:
    """The HTTP API and the web app share the port; an upgrade this parser does not take
    is answered by aiohttp as before (a bad key: 400; a foreign Origin: 403 with the
    error body); a head split over writes still upgrades."""
    base = f"http://127.0.0.1:{harness.server.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/v1/ws") as resp:  # no upgrade at all
            assert resp.status in (400, 426)
    r, w = await asyncio.open_connection("127.0.0.1", harness.server.http_port)
    w.write(head().replace(KEY, b"c2hvcnQ="))
    answer = await asyncio.wait_for(r.read(4096), 5)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    w.close()
    r, w = await asyncio.open_connection("127.0.0.1", harness.server.http_port)
    w.write(head(Origin="http://evil.example"))
    answer = await asyncio.wait_for(r.read(4096), 5)
    assert answer.startswith(b"HTTP/1.1 403") and b"origin not allowed" in answer
    w.close()
    r, w = await asyncio.open_connection("127.0.0.1", harness.server.http_port)
    data = head()
    for i in range(0, len(data), 7):
        w.write(data[i : i + 7])
        await w.drain()
        await asyncio.sleep(0.001)
    answer = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert answer.startswith(b"HTTP/1.1 101 ")
    w.close()


async def test_server_close_waits_for_the_clients_answer(make_server: Any) -> None:
    """The auth timeout closes with 4001; the connection stays until the client answers
    the close (or the close timeout), then ends."""
    h = await make_server(auth_timeout_ms=200)
    wire, _ = await Wire.open(h)
    await wire.json()
    got = await wire.until(0x8)
    assert int.from_bytes(got[:2], "big") == close.AUTH_TIMEOUT
    await asyncio.sleep(0.1)
    assert not wire.r.at_eof()
    wire.w.write(masked(got[:2], op=0x8))
    assert await asyncio.wait_for(wire.r.read(), 5) == b""
    wire.close()


async def test_a_head_that_never_ends_is_cut(make_server: Any) -> None:
    """A connection that starts a request head and never finishes it (slow loris) is
    cut after the auth timeout; so is one that sends nothing."""
    h = await make_server(auth_timeout_ms=300)
    for first in (b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n", b""):
        r, w = await asyncio.open_connection("127.0.0.1", h.server.http_port)
        w.write(first)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()


async def test_pings_from_a_client_that_never_reads_are_bounded(make_server: Any) -> None:
    """Pongs go through the bounded writer: a client flooding pings without reading is
    disconnected once its unread pongs pass send_buffer_bytes, not buffered forever."""
    h = await make_server(send_buffer_bytes=65_536)
    wire, _ = await Wire.open(h)
    ping = masked(b"p" * 125, op=0x9) * 512  # 64 KB of pings a write
    ended = False
    for _ in range(2_000):  # at most 128 MB
        try:
            wire.w.write(ping)
            await asyncio.wait_for(wire.w.drain(), 5)
        except (ConnectionError, TimeoutError):
            ended = True
            break
        if wire.r.at_eof():
            ended = True
            break
    assert ended, "the server kept answering a client that never read"
    wire.close()


async def test_close_codes_echoed_and_a_failed_connection_still_says_why(
    make_server: Any,
) -> None:
    """A client's close is echoed with its code when it is one a client may send, 1002
    otherwise; a message in too many fragments is refused (1009); an oversize frame whose
    payload is sent anyway gets its 1009 close and then the end of the stream (the rest
    of the payload is never read as frames)."""
    h = await make_server(max_frame_bytes=1024)
    for sent, echoed in ((4000, 4000), (1005, 1002), (999, 1002)):
        wire, _ = await Wire.open(h)
        await wire.json()
        wire.w.write(masked(sent.to_bytes(2, "big"), op=0x8))
        assert int.from_bytes(await wire.until(0x8), "big") == echoed
        wire.close()
    wire, _ = await Wire.open(h)
    await wire.json()
    wire.w.write(masked(b"", fin=False) + masked(b"", op=0x0, fin=False) * 1100)
    assert int.from_bytes((await wire.until(0x8))[:2], "big") == close.TOO_BIG
    wire.close()
    wire, _ = await Wire.open(h)
    await wire.json()
    wire.w.write(masked(bytes((0x80 | 0x9,)) * 2000))  # looks like pings if misread
    got = await wire.until(0x8)
    assert int.from_bytes(got[:2], "big") == close.TOO_BIG
    assert await asyncio.wait_for(wire.r.read(), 5) == b""  # no pongs: then the end
    wire.close()


async def test_aiohttp_path_closes_on_text_that_is_not_utf8(harness: Harness) -> None:
    """An upgrade handed to aiohttp (here: a repeated header) is served by its handler,
    which keeps the same rule: a text message that is not UTF-8 closes with 1007."""
    data = head().replace(b"\r\n\r\n", b"\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n")
    wire, answer = await Wire.open(harness, data)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"aiohttp" in answer  # its Server header: not the hand-written gateway's 101
    assert (await wire.json())["t"] == "hello"
    wire.w.write(masked(b'{"t":"ping","id":1,"x":"\xff"}'))
    got = await wire.until(0x8)
    assert int.from_bytes(got[:2], "big") == close.INVALID_DATA, got
    wire.close()
