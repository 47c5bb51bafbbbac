"""A bare protocol client for tests that must send exactly the bytes they choose."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec

from tidings.protocol.framing import preface, tcp_frame


class Raw:
    def __init__(self) -> None:
        self.codec = "msgpack"
        self.close_code: int | None = None
        self.close_reason = ""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.server_preface = b""
        self.hello: dict[str, Any] = {}

    @classmethod
    async def ws(cls, url: str, codec: str = "json", **kw: Any) -> Raw:
        self = cls()
        self.codec = codec
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(
            url, protocols=(f"tidings.v1.{codec}",), max_msg_size=0, **kw
        )
        self.hello = await self.recv()
        return self

    @classmethod
    async def tcp(cls, port: int, pre: bytes | None = None, read_hello: bool = True) -> Raw:
        self = cls()
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer.write(preface(1) if pre is None else pre)
        if read_hello:
            self.server_preface = await self._reader.readexactly(8)
            self.hello = await self.recv()
        return self

    def encode(self, obj: Any) -> bytes:
        if self.codec == "json":
            return msgspec.json.encode(obj)
        return msgspec.msgpack.encode(obj)

    async def send(self, obj: Any) -> None:
        await self.send_bytes(self.encode(obj))

    async def send_bytes(self, data: bytes, text: bool | None = None) -> None:
        if self._ws is not None:
            if text if text is not None else self.codec == "json":
                await self._ws.send_str(data.decode(errors="replace"))
            else:
                await self._ws.send_bytes(data)
        else:
            assert self._writer is not None
            self._writer.write(tcp_frame(data))
            await self._writer.drain()

    async def send_raw(self, data: bytes) -> None:
        """TCP only: bytes with no framing added."""
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def recv(self, timeout: float = 5.0) -> Any:
        """The next frame as a dict, or None once closed (close_code is then set)."""
        return await asyncio.wait_for(self._recv(), timeout)

    async def _recv(self) -> Any:
        if self._ws is not None:
            msg = await self._ws.receive()
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                return (msgspec.json.decode if self.codec == "json" else msgspec.msgpack.decode)(
                    data
                )
            self.close_code = (
                int(msg.data) if msg.type is aiohttp.WSMsgType.CLOSE else self._ws.close_code
            )
            if isinstance(msg.extra, str):
                self.close_reason = msg.extra
            return None
        assert self._reader is not None
        try:
            head = await self._reader.readexactly(4)
            data = await self._reader.readexactly(int.from_bytes(head, "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        frame = msgspec.msgpack.decode(data)
        if isinstance(frame, dict) and frame.get("t") == "close":
            self.close_code = frame["code"]
            self.close_reason = frame.get("reason", "")
        return frame

    async def until(self, kind: str, timeout: float = 5.0) -> Any:
        """Read frames until one of type ``kind`` (pushes etc. in between are skipped)."""

        async def loop() -> Any:
            while True:
                f = await self._recv()
                if f is None:
                    raise AssertionError(f"closed ({self.close_code}) while waiting for {kind}")
                if f.get("t") == kind:
                    return f

        return await asyncio.wait_for(loop(), timeout)

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Read until the connection closes; return the close code."""

        async def loop() -> int | None:
            while True:
                f = await self._recv()
                if f is None or (isinstance(f, dict) and f.get("t") == "close"):
                    return self.close_code

        return await asyncio.wait_for(loop(), timeout)

    async def login(self, token: str, rid: int = 1) -> Any:
        await self.send({"t": "hello", "v": 1, "token": token, "id": rid})
        return await self.recv()

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._writer is not None:
            self._writer.close()
