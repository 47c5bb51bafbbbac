"""Client transports: WebSocket (aiohttp) and raw TCP, both speaking whole frames."""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from tidings.protocol import PROTOCOL_VERSION
from tidings.protocol.codec import CODECS, Codec
from tidings.protocol.frames import Close
from tidings.protocol.framing import PREFACE_LEN, preface, tcp_frame

WS_SUBPROTOCOL = {"json": "tidings.v1.json", "msgpack": "tidings.v1.msgpack"}


class ClientConn(Protocol):
    codec: Codec
    close_code: int | None
    close_reason: str

    async def recv(self) -> bytes | None:
        """The next frame's payload, or None once the connection is closed."""
        ...

    async def send(self, payload: bytes) -> None: ...

    async def close(self, code: int = 1000) -> None: ...

    def abort(self) -> None:
        """Break the connection now (the reader then sees it closed)."""
        ...

    async def dispose(self) -> None:
        """Release the connection without any closing handshake (it is presumed dead)."""
        ...


class WsConn:
    def __init__(
        self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, codec: Codec
    ) -> None:
        self._session = session
        self._ws = ws
        self.codec = codec
        self.close_code: int | None = None
        self.close_reason = ""
        self._closing: asyncio.Future[None] | None = None

    async def recv(self) -> bytes | None:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type is aiohttp.WSMsgType.TEXT:
                return str(msg.data).encode()
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                self.close_code = self._ws.close_code
                if msg.type is aiohttp.WSMsgType.CLOSE:
                    self.close_code = int(msg.data)
                    if isinstance(msg.extra, str):
                        self.close_reason = msg.extra
                await self._cleanup()
                return None

    async def send(self, payload: bytes) -> None:
        if self.codec.binary:
            await self._ws.send_bytes(payload)
        else:
            await self._ws.send_str(payload.decode())

    async def close(self, code: int = 1000) -> None:
        try:
            await asyncio.wait_for(self._ws.close(code=code), 2)
        except (TimeoutError, OSError):
            pass
        await self._cleanup()

    def abort(self) -> None:
        # aiohttp has no public abort for a client websocket: reach the transport of the
        # underlying connection, or else close the whole client session.
        conn = getattr(getattr(self._ws, "_response", None), "connection", None)
        transport = getattr(conn, "transport", None)
        if transport is not None:
            transport.abort()
        elif not self._session.closed:
            self._closing = asyncio.ensure_future(self._session.close())

    async def dispose(self) -> None:
        self.abort()
        await self._cleanup()

    async def _cleanup(self) -> None:
        if not self._session.closed:
            await self._session.close()


class TcpConn:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.codec = CODECS["msgpack"]
        self.close_code: int | None = None
        self.close_reason = ""
        self._max = max_frame

    async def recv(self) -> bytes | None:
        try:
            head = await self._reader.readexactly(4)
            size = int.from_bytes(head, "big")
            if size > self._max:
                raise ConnectionError(f"server frame of {size} bytes is over the limit")
            data = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            self._writer.close()
            return None
        frame = self.codec.decode_any(data)
        if isinstance(frame, dict) and frame.get("t") == "close":
            self.close_code = int(frame.get("code", 1000))
            self.close_reason = str(frame.get("reason", ""))
            self._writer.close()
            return None
        return data

    async def send(self, payload: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionError("connection closed")
        self._writer.write(tcp_frame(payload))
        await self._writer.drain()

    async def close(self, code: int = 1000) -> None:
        if not self._writer.is_closing():
            self._writer.write(tcp_frame(self.codec.encode(Close(code, ""))))
            self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 2)
        except (TimeoutError, OSError):
            pass

    def abort(self) -> None:
        self._writer.transport.abort()

    async def dispose(self) -> None:
        self.abort()


async def connect(
    url: str,
    codec: str = "msgpack",
    ssl_context: ssl.SSLContext | None = None,
    max_frame: int = 8 << 20,
    timeout: float = 10.0,
) -> ClientConn:
    """Open a transport by URL: ws://, wss://, tcp:// or tcps://host:port."""
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss"):
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=timeout))
        try:
            ws = await session.ws_connect(
                url,
                protocols=(WS_SUBPROTOCOL[codec],),
                compress=0,
                max_msg_size=max_frame,
                autoping=True,
                heartbeat=None,
                ssl=(ssl_context or True) if parts.scheme == "wss" else True,
            )
        except BaseException:
            await session.close()
            raise
        return WsConn(session, ws, CODECS[codec])
    if parts.scheme in ("tcp", "tcps"):
        if parts.hostname is None or parts.port is None:
            raise ValueError("tcp URL needs host and port")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                parts.hostname,
                parts.port,
                ssl=(ssl_context or ssl.create_default_context())
                if parts.scheme == "tcps"
                else None,
            ),
            timeout,
        )
        writer.write(preface(PROTOCOL_VERSION))
        got = await asyncio.wait_for(reader.readexactly(PREFACE_LEN), timeout)
        if got[:-1] != preface(PROTOCOL_VERSION)[:-1]:
            writer.close()
            raise ConnectionError("not a Tidings server")
        return TcpConn(reader, writer, max_frame)
    raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
