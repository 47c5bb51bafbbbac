"""A userspace TCP proxy for weak-network tests: pass, delay, blackhole, cut.

``blackhole()`` keeps both sockets open but silently drops bytes in both directions,
which is what a dead NAT mapping or a pulled cable looks like to both ends (half-open
connections). ``cut()`` aborts every live connection (RST). Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib


class _Pipe:
    def __init__(self, proxy: Proxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = False
        self.replies_muted = False  # drop only what the server sends
        self.head = b""  # the first bytes the client sent (tells a WebSocket upgrade apart)

    @property
    def is_websocket(self) -> bool:
        return b"upgrade: websocket" in self.head.lower()

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                w.transport.abort()


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.pipes: set[_Pipe] = set()
        self.delay_s = 0.0
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0

    async def start(self, port: int = 0) -> Proxy:
        """Listen on ``port`` (0: a free one; the same port again after ``stop()``)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every live connection through the proxy."""
        for p in list(self.pipes):
            p.abort()
        self.pipes.clear()

    def blackhole(self, websockets_only: bool = False) -> None:
        """Silently drop all traffic of every live connection (with ``websockets_only``,
        of the WebSocket ones); sockets stay open."""
        for p in self.pipes:
            if not websockets_only or p.is_websocket:
                p.blackholed = True

    def mute_replies(self, websockets_only: bool = False) -> None:
        """Let every live connection's client bytes through to the server but drop the
        server's answers (a request that lands but whose answer is lost); with
        ``websockets_only``, only on WebSocket connections (a browser's page loads go on)."""
        for p in self.pipes:
            if not websockets_only or p.is_websocket:
                p.replies_muted = True

    def blackhole_one(self, index: int = 0) -> None:
        pipes = list(self.pipes)
        if pipes:
            pipes[index % len(pipes)].blackholed = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pipe = _Pipe(self, writer)
        self.connections += 1
        try:
            ureader, uwriter = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe.upstream = uwriter
        self.pipes.add(pipe)
        a = asyncio.ensure_future(self._pump(pipe, reader, uwriter))
        b = asyncio.ensure_future(self._pump(pipe, ureader, writer))
        await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
        if not pipe.blackholed:
            pipe.abort()
        else:
            # A blackholed connection stays half-open until the endpoints give up.
            await asyncio.wait([a, b])
        self.pipes.discard(pipe)

    async def _pump(
        self, pipe: _Pipe, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ConnectionError):
            while True:
                data = await src.read(65536)
                if not data:
                    if not pipe.blackholed:
                        return
                    await asyncio.sleep(3600)
                if not pipe.head and dst is not pipe.client:
                    pipe.head = data[:4096]
                if pipe.blackholed or (pipe.replies_muted and dst is pipe.client):
                    continue
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                dst.write(data)
                await dst.drain()
