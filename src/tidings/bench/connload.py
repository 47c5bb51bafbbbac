"""Load-generator processes of `tidings bench connections`.

Each process holds its share of the connections on non-blocking sockets and one epoll
loop (no task or buffer per connection beyond a few bytes of state):

1. the login storm: connect, upgrade to WebSocket, `hello`, until `ready`, with at most
   ``window`` connections in flight at once, as fast as the server answers; with
   ``wait`` "poll" the process polls its sockets without sleeping while logins are in
   flight (see `bench connections --client-wait`);
2. the idle hold: every connection sends a `ping` once per ``heartbeat_s`` (spread
   evenly) and reads its `pong`;
3. the restart: when the server goes away every connection notices (EOF), and each
   connects again (retrying while the port is closed), logs in and syncs.

It talks to the bench over a pipe: ("ready", {}) once started, then commands in and
results out, one per phase.
"""

from __future__ import annotations

import base64
import contextlib
import os
import selectors
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

from tidings.bench.wsraw import SUBPROTOCOL, FrameReader, client_frame

CONNECTING, UPGRADING, HELLO, SYNCING, READY, DOWN = range(6)
RETRY_S = 0.05  # a refused connect is tried again after this long (server restarting)
READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Conn:
    __slots__ = ("buf", "frames", "i", "pongs", "sock", "state", "t_done", "token")

    def __init__(self, i: int, token: str) -> None:
        self.i = i
        self.token = token
        self.sock: socket.socket | None = None
        self.state = DOWN
        self.buf = bytearray()
        self.frames = FrameReader()
        self.t_done = 0.0
        self.pongs = 0


class Driver:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.host: str = cfg["host"]
        self.port: int = cfg["port"]
        self.source: str | None = cfg.get("source")
        self.window: int = cfg["window"]
        self.busy: bool = cfg.get("wait", "poll") == "poll"
        self.conns = [Conn(i, t) for i, t in enumerate(cfg["tokens"])]
        self.sel = selectors.DefaultSelector()
        self.why: list[str] = []
        self.failed = 0
        key = base64.b64encode(os.urandom(16)).decode()
        self.upgrade = (
            f"GET /v1/ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
        ).encode()

    def _fail(self, c: Conn, why: str) -> None:
        self.failed += 1
        if len(self.why) < 5:
            self.why.append(why[:300])
        self._drop(c)
        c.t_done = -1.0  # failed for good (not tried again in this phase)

    def _drop(self, c: Conn) -> None:
        if c.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
            c.sock.close()
            c.sock = None
        c.state = DOWN

    def _open(self, c: Conn) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        if self.source:
            sock.bind((self.source, 0))
        sock.setblocking(False)
        sock.connect_ex((self.host, self.port))
        c.sock, c.state, c.buf, c.frames = sock, CONNECTING, bytearray(), FrameReader()
        self.sel.register(sock, WRITE, c)

    def _on_event(self, c: Conn, mask: int, sync: bool, now: float) -> bool:
        """Advance ``c``; True when it just reached READY."""
        sock = c.sock
        assert sock is not None
        if c.state == CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop(c)  # refused (the server is restarting): tried again later
                return False
            sock.send(self.upgrade)
            c.state = UPGRADING
            self.sel.modify(sock, READ, c)
            return False
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._fail(c, f"recv: {exc!r}")
            return False
        if not data:  # the server closed it
            self._drop(c)
            return False
        if c.state == UPGRADING:
            c.buf += data
            head, sep, rest = bytes(c.buf).partition(b"\r\n\r\n")
            if not sep:
                return False
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self._fail(c, f"upgrade refused: {head[:200]!r}")
                return False
            sock.send(client_frame(b'{"t":"hello","id":1,"v":1,"token":"%s"}' % c.token.encode()))
            c.state = HELLO
            data = rest
        for frame in c.frames.feed(data):
            if c.state == HELLO and b'"t":"ready"' in frame:
                if sync:
                    sock.send(client_frame(b'{"t":"sync","id":2,"since":"0","limit":0}'))
                    c.state = SYNCING
                else:
                    c.state, c.t_done = READY, now
                    return True
            elif c.state == SYNCING and b'"t":"synced"' in frame:
                c.state, c.t_done = READY, now
                return True
            elif b'"t":"pong"' in frame:
                c.pongs += 1
            elif b'"t":"error"' in frame and c.state != READY:
                self._fail(c, f"refused: {frame[:200]!r}")
        return False

    def connect_all(self, deadline: float, sync: bool) -> dict[str, Any]:
        """Bring every DOWN connection to READY (``window`` in flight at most); returns
        when all are READY or failed, or at ``deadline``."""
        todo = [c for c in self.conns if c.state == DOWN]
        todo.reverse()
        flying = 0
        ready = 0
        first = time.monotonic()
        retry: list[tuple[float, Conn]] = []
        while (todo or flying or retry) and time.monotonic() < deadline:
            now = time.monotonic()
            while retry and retry[0][0] <= now:
                todo.append(retry.pop(0)[1])
            while todo and flying < self.window:
                try:
                    self._open(todo.pop())
                except OSError as exc:
                    self.failed += 1
                    if len(self.why) < 5:
                        self.why.append(f"connect: {exc!r}")
                    continue
                flying += 1
            # Polling never sleeps in epoll_wait, so the server's sends find no sleeping
            # process to wake (loopback delivers inside the sender's write).
            for key, mask in self.sel.select(0.0 if self.busy and flying else 0.05):
                c: Conn = key.data
                before = c.state
                if self._on_event(c, mask, sync, time.monotonic()):
                    ready += 1
                    flying -= 1
                elif c.state == DOWN and before != DOWN:
                    flying -= 1
                    if c.t_done == 0.0:  # refused or closed early: the server is away
                        retry.append((time.monotonic() + RETRY_S, c))
        done = [c.t_done for c in self.conns if c.state == READY]
        return {
            "ready": len(done),
            "failed": len(self.conns) - len(done),
            "first": first,
            "last": max(done, default=first),
            "why": self.why[:5],
        }

    def hold(self, seconds: float, heartbeat_s: float) -> dict[str, Any]:
        """Keep every connection, each sending a ping once per ``heartbeat_s``."""
        live = [c for c in self.conns if c.state == READY]
        for c in live:
            c.pongs = 0
        start = time.monotonic()
        end = start + seconds
        sent = 0
        rid = 10
        while True:
            now = time.monotonic()
            if now >= end:
                break
            due = int(len(live) * (now - start) / heartbeat_s)
            while sent < due:
                c = live[sent % len(live)]
                rid += 1
                if c.sock is not None:
                    with contextlib.suppress(OSError):
                        c.sock.send(client_frame(b'{"t":"ping","id":%d}' % rid))
                sent += 1
            for key, mask in self.sel.select(0.02):
                self._on_event(key.data, mask, False, now)
        # the last pongs
        t = time.monotonic() + 1.0
        while time.monotonic() < t and sum(c.pongs for c in live) < sent:
            for key, mask in self.sel.select(0.02):
                self._on_event(key.data, mask, False, time.monotonic())
        return {
            "pings": sent,
            "pongs": sum(c.pongs for c in live),
            "still_up": sum(1 for c in self.conns if c.state == READY),
        }

    def wait_down(self, deadline: float) -> int:
        """Read until every connection saw the server close it; how many did."""
        for c in self.conns:
            c.t_done = 0.0
        while any(c.state != DOWN for c in self.conns) and time.monotonic() < deadline:
            for key, mask in self.sel.select(0.05):
                self._on_event(key.data, mask, False, time.monotonic())
        return sum(1 for c in self.conns if c.state == DOWN)


def main(conn: Connection, cfg: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        if cfg.get("cores"):
            os.sched_setaffinity(0, set(cfg["cores"]))
    d = Driver(cfg)
    conn.send(("ready", {}))
    while True:
        cmd, arg = conn.recv()
        if cmd == "storm":
            time.sleep(max(0.0, arg["at"] - time.monotonic()))
            res = d.connect_all(time.monotonic() + arg["timeout_s"], sync=False)
            res["cpu_s"] = sum(os.times()[:2])
            conn.send(("stormed", res))
        elif cmd == "hold":
            conn.send(("held", d.hold(arg["seconds"], arg["heartbeat_s"])))
        elif cmd == "restart":
            down = d.wait_down(time.monotonic() + arg["timeout_s"])
            res = d.connect_all(time.monotonic() + arg["timeout_s"], sync=True)
            res["saw_close"] = down
            conn.send(("back", res))
        else:
            break
