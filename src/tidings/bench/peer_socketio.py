"""The python-socketio peer of `tidings bench compare`: room fan-out.

python-socketio is what a Python developer reaches for to "add chat". Its server
(``peer_socketio_server.py``, run by the socketio peer's own interpreter, pinned to the
server's cores) is the tutorial one: ``join`` enters a room, ``post`` emits the posted
dict as ``msg`` to the room. The room broadcast includes the poster (socketio's
default, no ``skip_sid``): the senders are in the room, as a chat's posters are, and
read what they get, but only the viewers' deliveries are counted.

The clients are as lean as those of `tidings bench room` (fanload.py): many viewers per
process on the client cores, plain sockets and epoll, each process connecting from its
own 127.x.y.z source address. They speak Engine.IO v4 / Socket.IO v5 over a WebSocket
directly (``/socket.io/?EIO=4&transport=websocket``): read the open packet ``0{...}``,
send ``40``, read ``40{"sid":..}``, send ``421["join",ROOM]`` and read its
acknowledgement ``431[...]`` (so a viewer is in the room before the posts start). Bulk
viewers then only count ``42["msg",`` in the bytes they read; a sample parses every
packet and times each post by the send timestamp in its body. Every client answers
Engine.IO's pings (``2`` with ``3``), so the server keeps socketio's default heartbeat.

The senders post ``rate`` posts/s in all, open loop, round robin. Afterwards the
viewers read until no post came for ``QUIET_S`` while the server was idle (at most
``DRAIN_CAP_S``): a server that fell behind delivers its backlog meanwhile (one far
behind can spend seconds between two writes: asyncio runs its queue of a task per
recipient first), and what never arrived is reported lost. The server's CPU is read
from its own /proc/<pid>/stat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, deque
from multiprocessing.connection import Connection
from typing import IO, Any, NamedTuple

import msgspec

from tidings.bench.fanload import SO_TIMESTAMPNS, join_figures, recv_stamped
from tidings.bench.hist import Histogram
from tidings.bench.observe import machine_cpu_s, proc_cpu_s
from tidings.bench.peers import http_ok, peer_python, start_pinned, stop_group, wait_ready
from tidings.bench.procs import Worker, pin, recv_from, rss_kb, spawn, stop_workers
from tidings.bench.wsraw import FrameReader, client_frame, open_ws

PEER = "python-socketio"
SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_socketio_server.py")
HOST = "127.0.0.1"
ROOM = "bench"
PER_PROC = 15_000  # viewers per process (the open-file limit is 20,000)
MAX_VIEWERS = 200_000
MAX_SENDERS = 1_000
MAX_RATE = 100_000.0
MAX_DURATION_S = 300.0
MAX_PROCS = 64
BATCH = 100  # connections set up at a time (aiohttp listens with a backlog of 128)
HANDSHAKE_TIMEOUT_S = 10.0  # one connection's set-up
CONNECT_PHASE_S = 180.0  # one process's whole connect phase
READY_TIMEOUT_S = 240.0
START_DELAY_S = 0.5  # "go" -> the first post
BULK_INTERVAL_S = 0.25  # bulk viewers are read this often while posts flow
BULK_SLICE = 200  # bulk reads between two looks at the timed viewers
QUIET_S = 0.5  # after posting: read until nothing came for this long (the server idle) ...
IDLE_SHARE = 0.2  # ... idle: under this share of a CPU
DRAIN_CAP_S = 30.0  # ... or this long at most
SEND_TIMEOUT_S = 5.0  # a sender whose post cannot be written in this time is dropped
LATE_STOP_S = 5.0  # senders stop posting this long after the posting period at most
SENDER_STOP_S = DRAIN_CAP_S + 30.0  # senders read until told to stop, this long at most
RESULT_TIMEOUT_S = DRAIN_CAP_S + 90.0  # results after the posting period, at most
TEXT = "hello everyone, how is it going?"

MSG = b'42["msg",'  # a Socket.IO event "msg" (JSON compact, ASCII: socketio's encoding)
# A one-byte text frame "2": an Engine.IO ping. The payloads are ASCII JSON, so 0x81
# (a final text frame's first byte) only ever starts a frame, and a length byte of 1
# belongs to a one-byte frame: the marker never matches inside a message.
PING = b"\x81\x012"
PONG = client_frame(b"3")
TAIL = 16  # bytes kept between reads so a marker split by a read is counted once


# ------------------------------------------------------------------ protocol


class Packet(NamedTuple):
    """An Engine.IO packet; ``sio`` etc. are set for messages (type ``4``)."""

    eio: str  # "0" open, "1" close, "2" ping, "3" pong, "4" message, "6" noop
    sio: str  # message: "0" connect, "1" disconnect, "2" event, "3" ack, "4" error
    ack: int | None  # the acknowledgement id, when there is one
    data: bytes  # what follows the header (JSON, or empty)


def parse_packet(payload: bytes) -> Packet:
    """One WebSocket frame's payload as an Engine.IO (and Socket.IO) packet."""
    if not payload:
        return Packet("", "", None, b"")
    eio = chr(payload[0])
    if eio != "4" or len(payload) < 2:
        return Packet(eio, "", None, payload[1:])
    sio, i, n = chr(payload[1]), 2, len(payload)
    if payload[i : i + 1] == b"/":  # a namespace other than "/": "/chat,"
        comma = payload.find(b",", i)
        i = n if comma < 0 else comma + 1
    j = i
    while j < n and 48 <= payload[j] <= 57:
        j += 1
    return Packet("4", sio, int(payload[i:j]) if j > i else None, payload[j:])


class PacketReader:
    """Splits the server's WebSocket frames, however the reads cut them, into packets."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = FrameReader()

    def feed(self, data: bytes) -> list[Packet]:
        return [parse_packet(p) for p in self.frames.feed(data)]

    @property
    def pending(self) -> bytes:
        """Bytes of a frame not complete yet."""
        return bytes(self.frames.buf)


class MarkerCounter:
    """The bulk viewers' reading: ``msg`` events and pings counted in the raw bytes."""

    __slots__ = ("tail",)

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, data: bytes) -> tuple[int, int]:
        tail = self.tail
        chunk = tail + data
        msgs = chunk.count(MSG) - tail.count(MSG)
        pings = chunk.count(PING) - tail.count(PING)
        self.tail = chunk[-TAIL:]
        return msgs, pings


class _Body(msgspec.Struct):
    t0: int = 0


_decode_event = msgspec.json.Decoder(tuple[str, _Body]).decode


def event_t0(packet: Packet) -> int | None:
    """The send time (µs) in a ``msg`` event's body; None for any other packet."""
    if packet.eio != "4" or packet.sio != "2" or not packet.data.startswith(b'["msg",'):
        return None
    try:
        return _decode_event(packet.data)[1].t0
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def event_frame(event: str, data: Any, ack: int | None = None) -> bytes:
    """A client's WebSocket frame carrying Socket.IO event ``event`` with ``data``."""
    body = json.dumps([event, data], separators=(",", ":"))
    return client_frame(f"42{'' if ack is None else ack}{body}".encode())


# ------------------------------------------------------------------ connections


def _open(port: int, source: str | None, timeout: float) -> socket.socket:
    """Connect and send the WebSocket upgrade of Engine.IO's websocket transport."""
    path = "/socket.io/?EIO=4&transport=websocket"
    return open_ws(HOST, port, source, timeout, path=path, protocol=None, rcvbuf=None)


class Handshake:
    """One connection's set-up, a step at a time (a batch's steps interleave)."""

    __slots__ = ("head", "reader", "rest", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = PacketReader()
        self.head: bytes | None = b""  # the HTTP answer until it is complete, then None
        self.rest: list[Packet] = []  # packets read past the last one expected

    def expect(self, eio: str, sio: str, deadline: float) -> Packet:
        """Read until packet ``eio``/``sio`` arrives (pings are answered meanwhile)."""
        while True:
            while self.rest:
                p = self.rest.pop(0)
                if p.eio == "2":
                    self.sock.sendall(PONG)
                elif p.eio == eio and p.sio == sio:
                    return p
                elif p.eio == "1" or (p.eio == "4" and p.sio in ("1", "4")):
                    raise ConnectionError(f"refused: {p!r}"[:200])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no packet {eio}{sio} in time")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before packet {eio}{sio}")
            if self.head is not None:
                head = self.head + data
                if b"\r\n\r\n" not in head:
                    if len(head) > 16384:
                        raise ConnectionError("no end of the HTTP answer")
                    self.head = head
                    continue
                status, _, data = head.partition(b"\r\n\r\n")
                if b" 101 " not in status.split(b"\r\n", 1)[0]:
                    raise ConnectionError(f"upgrade refused: {status[:200]!r}")
                self.head = None
            self.rest += self.reader.feed(data)


def _setup_batch(
    socks: list[socket.socket], deadline: float, why: list[str]
) -> list[Handshake | None]:
    """Open, connect to the namespace and join the room, each step over the whole batch;
    a connection that fails is closed and left as None."""
    shakes: list[Handshake | None] = [Handshake(s) for s in socks]
    steps: list[tuple[str, str, bytes | None]] = [
        ("0", "", client_frame(b"40")),  # open -> connect to "/"
        ("4", "0", event_frame("join", ROOM, ack=1)),  # connected -> join (acknowledged)
        ("4", "3", None),  # joined
    ]
    for eio, sio, reply in steps:
        for i, h in enumerate(shakes):
            if h is None:
                continue
            try:
                h.expect(eio, sio, min(deadline, time.monotonic() + HANDSHAKE_TIMEOUT_S))
                if reply is not None:
                    h.sock.sendall(reply)
            except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
                if len(why) < 5:
                    why.append(f"handshake: {exc!r}"[:300])
                h.sock.close()
                shakes[i] = None
    return shakes


def _connect_all(
    count: int, port: int, source: str | None, deadline: float, why: list[str]
) -> tuple[list[Handshake], int]:
    """``count`` connections in the room, a batch at a time; (set up, failed)."""
    done: list[Handshake] = []
    failed = 0
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        if time.monotonic() >= deadline:
            failed += n
            if len(why) < 5:
                why.append("the connect phase ran out of time")
            continue
        socks: list[socket.socket] = []
        for _ in range(n):
            try:
                socks.append(_open(port, source, HANDSHAKE_TIMEOUT_S))
            except OSError as exc:
                failed += 1
                if len(why) < 5:
                    why.append(f"connect: {exc!r}"[:300])
        for h in _setup_batch(socks, deadline, why):
            if h is None:
                failed += 1
            else:
                done.append(h)
    return done, failed


# ------------------------------------------------------------------ viewers


class Viewer:
    __slots__ = ("alive", "counter", "delivered", "reader", "sampled", "sock")

    def __init__(self, h: Handshake, sampled: bool) -> None:
        self.sock = h.sock
        self.sampled = sampled
        self.reader = h.reader if sampled else None
        self.counter = None if sampled else MarkerCounter()
        self.delivered = 0
        self.alive = True


class ViewerLoop:
    """Reads a process's viewers: the timed ones at once, the bulk every interval."""

    def __init__(self, viewers: list[Viewer]) -> None:
        self.viewers = viewers
        self.by_fd = {v.sock.fileno(): v for v in viewers}
        self.quick, self.bulk = select.epoll(), select.epoll()
        for fd, v in self.by_fd.items():
            (self.quick if v.sampled else self.bulk).register(fd, select.EPOLLIN)
        self.live = len(viewers)
        self.hist, self.khist = Histogram(), Histogram()
        self.timing = False  # record delays (only once the posts flow)
        self.last_msg_wall = 0.0  # when a post last arrived
        self.pongs = 0

    def close(self) -> None:
        self.quick.close()
        self.bulk.close()

    def _read(self, fd: int, ep: select.epoll) -> bool:
        """Read one viewer; whether posts came (pings do not count: the drain ends when
        the posts stop, not the heartbeat)."""
        v = self.by_fd[fd]
        got = recv_stamped(v.sock, v.sampled)
        if got is None:
            return False
        data, kernel_us = got
        if not data:
            v.alive = False
            self.live -= 1
            ep.unregister(fd)
            return False
        pings = 0
        if v.counter is not None:
            msgs, pings = v.counter.feed(data)
        else:
            assert v.reader is not None
            now_us, msgs = time.time_ns() // 1000, 0
            for p in v.reader.feed(data):
                if p.eio == "2":
                    pings += 1
                    continue
                t0 = event_t0(p)
                if t0 is None:
                    continue
                msgs += 1
                if self.timing and t0 > 0:
                    self.hist.record(now_us - t0)
                    if kernel_us:
                        self.khist.record(kernel_us - t0)
        if msgs:
            v.delivered += msgs
            self.last_msg_wall = time.time()
        for _ in range(min(pings, 4)):
            with contextlib.suppress(OSError):
                v.sock.send(PONG)
            self.pongs += 1
        return msgs > 0

    def run(self, until: float, bulk_interval_s: float) -> None:
        """Read until monotonic ``until`` (or no viewer is left)."""
        next_bulk = 0.0
        ready: list[int] = []
        while self.live > 0:
            now = time.monotonic()
            if now >= until:
                break
            for fd, _ in self.quick.poll(0 if ready else min(0.005, until - now)):
                self._read(fd, self.quick)
            if not ready and now >= next_bulk:
                next_bulk = now + bulk_interval_s
                ready = [fd for fd, _ in self.bulk.poll(0)]
            for fd in ready[-BULK_SLICE:]:
                if fd in self.by_fd and self.by_fd[fd].alive:
                    self._read(fd, self.bulk)
            del ready[-BULK_SLICE:]

    def drain(self, quiet_s: float, cap_s: float, server_pid: int | None) -> tuple[float, bool]:
        """Read everything until no post came for ``quiet_s`` while the server was idle
        (under ``IDLE_SHARE`` of a CPU: a server far behind works through its queue of
        sends for longer than that between two writes); (seconds, capped)."""
        t0 = time.monotonic()
        quiet_since, cap = t0, t0 + cap_s
        marks: deque[tuple[float, float]] = deque(maxlen=64)  # (time, server CPU s)
        next_mark = t0
        while self.live > 0:
            now = time.monotonic()
            if now >= cap:
                return now - t0, True
            if now >= next_mark:
                next_mark = now + 0.1
                cpu = proc_cpu_s(server_pid) if server_pid else None
                marks.append((now, sum(cpu) if cpu else -1.0))
            if now - quiet_since >= quiet_s:
                since = [m for m in marks if m[0] >= quiet_since - 0.05]
                t_cpu, t_now = since[0], marks[-1]
                busy = t_now[1] - t_cpu[1] if min(t_cpu[1], t_now[1]) >= 0 else 0.0
                if busy < IDLE_SHARE * max(t_now[0] - t_cpu[0], 0.1):
                    return now - t0, False
                quiet_since = now  # the server is still at work: wait on
            got = False
            for ep in (self.quick, self.bulk):
                for fd, _ in ep.poll(0.02):
                    got = self._read(fd, ep) or got
            if got:
                quiet_since = time.monotonic()
        return time.monotonic() - t0, False


def viewers_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """A viewer process: connect, report ready, read (answering pings) until "go",
    read the posting period, drain, report."""
    try:
        pin(cfg["cores"])
        t0 = time.monotonic()
        why: list[str] = []
        shakes, failed = _connect_all(
            cfg["count"], cfg["port"], cfg["source"], t0 + CONNECT_PHASE_S, why
        )
        every = cfg["sample_every"]
        viewers = []
        for i, h in enumerate(shakes):
            v = Viewer(h, sampled=(cfg["first"] + i) % every == 0)
            if v.sampled:
                with contextlib.suppress(OSError):
                    v.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            v.sock.setblocking(False)
            for p in h.rest:  # nothing but pings is expected before the posts
                if p.eio == "2":
                    with contextlib.suppress(OSError):
                        v.sock.send(PONG)
            if v.counter is not None:
                v.counter.feed(h.reader.pending)
            viewers.append(v)
        setup_s = time.monotonic() - t0
        conn.send(("ready", {"connected": len(viewers), "failed": failed, "why": why}))
        loop = ViewerLoop(viewers)
        try:
            go_deadline = time.monotonic() + READY_TIMEOUT_S + 60
            while not conn.poll(0):  # keep answering pings while the others set up
                if time.monotonic() > go_deadline:
                    raise RuntimeError("no 'go' from the bench")
                loop.run(time.monotonic() + 0.05, 0.05)
                if loop.live == 0:
                    conn.poll(1.0)
            kind, start_wall, duration = conn.recv()
            assert kind == "go"
            loop.timing = True
            cpu0 = time.process_time()
            base = sum(v.delivered for v in viewers)  # 0: no post before "go"
            post_end = time.monotonic() + (start_wall + duration - time.time())
            loop.run(post_end, cfg["bulk_interval_s"])
            at_post_end = sum(v.delivered for v in viewers) - base
            drain_s, capped = loop.drain(QUIET_S, DRAIN_CAP_S, cfg.get("server_pid"))
        finally:
            loop.close()
        alive = [v for v in viewers if v.alive]
        conn.send(
            (
                "result",
                {
                    "connected": len(viewers),
                    "failed": failed,
                    "setup_s": setup_s,
                    "alive": len(alive),
                    "delivered": sum(v.delivered for v in viewers) - base,
                    "delivered_at_post_end": at_post_end,
                    "per_alive_viewer": dict(Counter(v.delivered for v in alive)),
                    "hist": loop.hist.to_dict(),
                    "kernel_hist": loop.khist.to_dict(),
                    "timed_viewers": sum(v.sampled for v in viewers),
                    "last_msg_wall": loop.last_msg_wall,
                    "drain_s": drain_s,
                    "drain_capped": capped,
                    "pongs": loop.pongs,
                    "cpu_s": time.process_time() - cpu0,
                },
            )
        )
        for v in viewers:
            v.sock.close()
    except Exception:
        conn.send(("error", traceback.format_exc()))


# ------------------------------------------------------------------ senders


def _sender_read(socks: list[socket.socket | None], counters: list[MarkerCounter]) -> int:
    """Read what the senders got (the room's posts), answering pings; posts counted."""
    got = 0
    for i, sock in enumerate(socks):
        if sock is None:
            continue
        for _ in range(64):
            try:
                data = sock.recv(1 << 18, socket.MSG_DONTWAIT)
            except OSError:  # nothing there (EAGAIN) or gone
                break
            if not data:
                break
            msgs, pings = counters[i].feed(data)
            got += msgs
            for _ in range(min(pings, 4)):
                with contextlib.suppress(OSError):
                    sock.sendall(PONG)
    return got


def senders_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """The posting connections (in the room too): ``rate`` posts/s in all, round robin,
    open loop from the wall time given with "go" for ``duration`` seconds; then they
    keep reading until "stop"."""
    try:
        pin(cfg["cores"])
        # The schedule must hold even when the viewers share this core.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        why: list[str] = []
        shakes, failed = _connect_all(
            cfg["senders"], cfg["port"], None, time.monotonic() + CONNECT_PHASE_S, why
        )
        if failed:
            raise RuntimeError(f"{failed} senders could not join: {why}")
        socks: list[socket.socket | None] = []
        for h in shakes:
            # Blocking (reads pass MSG_DONTWAIT), and a post is written whole within
            # SEND_TIMEOUT_S or the sender is dropped (the kernel's send timeout).
            h.sock.settimeout(None)
            timeval = struct.pack("ll", int(SEND_TIMEOUT_S), 0)
            h.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            socks.append(h.sock)
        counters = [MarkerCounter() for _ in socks]
        conn.send(("ready", {"senders": len(socks)}))
        kind, start_wall, duration = conn.recv()
        assert kind == "go"
        rate = cfg["rate"]
        n = int(rate * duration)
        start = time.monotonic() + (start_wall - time.time())
        stop_by = start + duration + LATE_STOP_S
        sent = errors = received = 0
        max_lag = 0.0
        for k in range(n):
            due = start + k / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now > stop_by:
                break
            else:
                max_lag = max(max_lag, now - due)
            i = k % len(socks)
            sock = socks[i]
            if sock is None:
                errors += 1
                continue
            body = {"room": ROOM, "text": TEXT, "k": k, "t0": time.time_ns() // 1000}
            try:
                sock.sendall(event_frame("post", body))
                sent += 1
            except OSError:  # timed out (a partial frame) or gone: this sender is done
                errors += 1
                socks[i] = None
                sock.close()
            if k % 16 == 0:
                received += _sender_read(socks, counters)
        conn.send(("posted", {"sent": sent}))
        end = time.monotonic() + SENDER_STOP_S
        while time.monotonic() < end and not conn.poll(0.05):
            received += _sender_read(socks, counters)
        conn.send(
            (
                "result",
                {
                    "sent": sent,
                    "errors": errors,
                    "received": received,
                    "max_lag_ms": round(max_lag * 1000, 1),
                },
            )
        )
        for s in socks:
            if s is not None:
                s.close()
    except Exception:
        conn.send(("error", traceback.format_exc()))


# ------------------------------------------------------------------ the run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _default_rss_cap_kb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 2
    except OSError:
        pass
    return 8 << 20


class _Watch:
    """The server process seen from outside: its RSS peak; killed if over the cap."""

    def __init__(self, server: subprocess.Popen[bytes], cap_kb: int) -> None:
        self.server, self.cap_kb = server, cap_kb
        self.peak_kb = 0
        self.aborted: str | None = None

    def look(self) -> None:
        if self.aborted or self.server.poll() is not None:
            if not self.aborted and self.server.returncode is not None:
                self.aborted = f"the server exited ({self.server.returncode}) during the run"
            return
        rss = rss_kb(self.server.pid) or 0
        self.peak_kb = max(self.peak_kb, rss)
        if rss > self.cap_kb:
            self.aborted = f"server RSS {rss} KB over the cap of {self.cap_kb} KB: killed"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.pid, 9)

    def sleep_until(self, wall: float) -> None:
        while True:
            left = wall - time.time()
            if left <= 0:
                return
            time.sleep(min(left, 0.25))
            self.look()

    def recv(self, conn: Connection, want: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        return recv_from(conn, deadline, want, poll_s=0.25, tick=self.look)


def _versions(python: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, sys; print(' '.join(m.version(p) for p in "
        "('python-socketio', 'python-engineio', 'aiohttp', 'uvloop')), sys.version.split()[0])"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30)
        sio, eio, aiohttp, uvloop, py = out.stdout.split()
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return {
        "python-socketio": sio,
        "python-engineio": eio,
        "aiohttp": aiohttp,
        "uvloop": uvloop,
        "python": py,
    }


def run_room(
    viewers: int,
    senders: int,
    rate: float,
    duration: float,
    *,
    server_cores: list[int],
    client_cores: list[int],
    sample: int = 200,
    procs: int | None = None,
    rss_cap_kb: int | None = None,
    ping_interval_s: float | None = None,
) -> dict[str, Any]:
    """Room fan-out through python-socketio: ``viewers`` in one room, ``senders`` (in
    it too) posting ``rate`` posts/s in all for ``duration`` s; the figures.

    The server is killed (the run reported ``aborted``) if its RSS passes
    ``rss_cap_kb`` (default: half the machine's memory). ``ping_interval_s`` changes
    Engine.IO's heartbeat (default: socketio's, 25 s; the clients answer pings)."""
    if not 1 <= viewers <= MAX_VIEWERS:
        raise ValueError(f"viewers: must be in [1, {MAX_VIEWERS}]")
    if not 1 <= senders <= MAX_SENDERS:
        raise ValueError(f"senders: must be in [1, {MAX_SENDERS}]")
    if not 0.1 <= rate <= MAX_RATE or not 1.0 <= duration <= MAX_DURATION_S:
        raise ValueError("rate or duration out of range")
    if rate * duration > 2_000_000:
        raise ValueError("rate x duration: at most 2,000,000 posts")
    need = math.ceil(viewers / PER_PROC)
    nprocs = max(need, min(procs or need, MAX_PROCS, viewers))
    sample = max(0, min(sample, viewers))
    python = peer_python("socketio")  # RuntimeError with the set-up hint if missing
    with tempfile.TemporaryFile() as log:
        return _run(
            python,
            viewers,
            senders,
            rate,
            duration,
            server_cores,
            client_cores,
            sample,
            nprocs,
            rss_cap_kb,
            ping_interval_s,
            log,
        )


def _run(
    python: str,
    viewers: int,
    senders: int,
    rate: float,
    duration: float,
    server_cores: list[int],
    client_cores: list[int],
    sample: int,
    nprocs: int,
    rss_cap_kb: int | None,
    ping_interval_s: float | None,
    log: IO[bytes],
) -> dict[str, Any]:
    port = _free_port()
    own_cores = os.sched_getaffinity(0)
    argv = [python, SERVER_SCRIPT, "--port", str(port)]
    if ping_interval_s is not None:
        argv += ["--ping-interval", str(ping_interval_s)]
    server = start_pinned(argv, server_cores, log=log)
    watch = _Watch(server, rss_cap_kb or _default_rss_cap_kb())
    workers: list[Worker] = []
    report: dict[str, Any] = {
        "peer": PEER,
        "viewers": viewers,
        "senders": senders,
        "rate": rate,
        "duration": duration,
        "procs": nprocs,
        "sampled_viewers": sample,
        "server_cores": server_cores,
        "client_cores": client_cores,
        "broadcast_includes_sender": True,
        "ping_interval_s": 25.0 if ping_interval_s is None else ping_interval_s,
    }
    try:
        wait_ready(server, PEER, lambda: http_ok(f"http://{HOST}:{port}/healthz"))
        report["versions"] = _versions(python)
        if client_cores:
            os.sched_setaffinity(0, set(client_cores))
        scfg = {
            "port": port,
            "senders": senders,
            "rate": rate,
            "cores": client_cores[-1:],
        }
        sender = spawn(senders_main, scfg)
        workers.append(sender)
        watch.recv(sender[1], "ready", READY_TIMEOUT_S)
        rss_before = rss_kb(server.pid)
        per = math.ceil(viewers / nprocs)
        block = (secrets.randbelow(250) + 1, secrets.randbelow(256))  # fresh per run
        every = max(1, viewers // sample) if sample else 10**12
        t_join = time.monotonic()
        for i in range(nprocs):
            first = i * per
            count = min(per, viewers - first)
            if count <= 0:
                break
            vcfg = {
                "port": port,
                "server_pid": server.pid,
                "source": f"127.{block[0]}.{block[1]}.{2 + i}",
                "count": count,
                "first": first,
                "sample_every": every,
                "bulk_interval_s": BULK_INTERVAL_S,
                "cores": [client_cores[i % len(client_cores)]] if client_cores else [],
            }
            workers.append(spawn(viewers_main, vcfg))
        views = workers[1:]
        ready = [watch.recv(c, "ready", READY_TIMEOUT_S) for _, c in views]
        join_s = time.monotonic() - t_join
        rss_joined = rss_kb(server.pid)
        start_wall = time.time() + START_DELAY_S
        sender[1].send(("go", start_wall, duration))
        for _, c in views:
            c.send(("go", start_wall, duration))
        watch.sleep_until(start_wall)
        cpu0, machine0 = proc_cpu_s(server.pid), machine_cpu_s()
        watch.sleep_until(start_wall + duration + 0.5)
        cpu_window, machine1 = proc_cpu_s(server.pid), machine_cpu_s()
        rss_end = rss_kb(server.pid)
        results = [watch.recv(c, "result", RESULT_TIMEOUT_S) for _, c in views]
        cpu_end = proc_cpu_s(server.pid)
        posted = watch.recv(sender[1], "posted", RESULT_TIMEOUT_S)
        sender[1].send(("stop", 0.0, 0.0))
        sent = watch.recv(sender[1], "result", 30)
        watch.look()
    finally:
        if client_cores:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, own_cores)
        stop_workers(workers, join_s=5.0)
        code = stop_group(server)
        log.seek(0)
        server_log = log.read()[-2000:].decode(errors="replace")
    report.update(join_figures(ready, join_s, (rss_before, rss_joined, rss_end)))
    report["server_rss_kb"]["peak"] = watch.peak_kb or None
    report.update(server_exit_code=code, aborted=watch.aborted)
    if machine0 and machine1:
        # Everything the machine ran meanwhile (all CPUs, %: 100 = one CPU busy): a
        # run on a machine busy with other work shows it here.
        span = duration + 0.5
        report["machine_busy_pct"] = round(100 * (machine1[0] - machine0[0]) / span, 1)
        report["machine_steal_pct"] = round(100 * (machine1[1] - machine0[1]) / span, 1)
    if watch.aborted or code not in (0, None, -15):
        report["server_log_tail"] = server_log
    _figures(report, results, posted["sent"], sent, start_wall, cpu0, cpu_window, cpu_end)
    return report


def _cpu(a: tuple[float, float] | None, b: tuple[float, float] | None) -> float | None:
    return sum(b) - sum(a) if a and b else None


def _figures(
    report: dict[str, Any],
    results: list[dict[str, Any]],
    posts: int,
    sent: dict[str, Any],
    start_wall: float,
    cpu0: tuple[float, float] | None,
    cpu_window: tuple[float, float] | None,
    cpu_end: tuple[float, float] | None,
) -> None:
    duration = float(report["duration"])
    hist, khist = Histogram(), Histogram()
    for r in results:
        hist.merge(Histogram.from_dict(r["hist"]))
        khist.merge(Histogram.from_dict(r["kernel_hist"]))
    delivered = sum(r["delivered"] for r in results)
    alive = sum(r["alive"] for r in results)
    per_viewer: Counter[int] = Counter()
    for r in results:
        per_viewer.update(r["per_alive_viewer"])
    lost = sum(n * max(0, posts - got) for got, n in per_viewer.items())
    at_post_end = sum(r["delivered_at_post_end"] for r in results)
    last = max((r["last_msg_wall"] for r in results), default=0.0)
    # Deliveries over the time they took: the posting period, or longer when the
    # server was still delivering its backlog afterwards.
    span = max(duration, last - start_wall) if last else duration
    window = _cpu(cpu0, cpu_window)  # the posting period + 0.5 s, as `bench room`
    total = _cpu(cpu0, cpu_end)  # ... through the viewers' drain: every delivery's CPU
    report.update(
        posts=posts,
        sender_errors=sent["errors"],
        sender_max_lag_ms=sent["max_lag_ms"],
        sender_deliveries=sent["received"],
        deliveries=delivered,
        expected_deliveries=posts * alive,
        delivery_span_s=round(span, 2),
        deliveries_per_s=round(delivered / span, 1),
        server_cpu_s=None if window is None else round(window, 3),
        server_cpu_pct=None if window is None else round(100 * window / (duration + 0.5), 1),
        server_cpu_s_through_drain=None if total is None else round(total, 3),
        deliveries_per_server_cpu_s=round(delivered / total) if total else None,
        server_cpu_us_per_delivery=(
            round(total * 1e6 / delivered, 3) if total and delivered else None
        ),
        p50_ms=round(hist.percentile(50) / 1000, 1) if hist.count else None,
        p99_ms=round(hist.percentile(99) / 1000, 1) if hist.count else None,
        max_ms=round(hist.percentile(100) / 1000, 1) if hist.count else None,
        timed_deliveries=hist.count,
        kernel_p50_ms=round(khist.percentile(50) / 1000, 1) if khist.count else None,
        kernel_p99_ms=round(khist.percentile(99) / 1000, 1) if khist.count else None,
        lost=lost,
        viewers_alive=alive,
        backlog_at_post_end=max(0, posts * alive - at_post_end),
        drain_s=round(max((r["drain_s"] for r in results), default=0.0), 2),
        drain_capped=any(r["drain_capped"] for r in results),
        viewer_cpu_s=round(sum(r["cpu_s"] for r in results), 2),
        pongs=sum(r["pongs"] for r in results),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m tidings.bench.peer_socketio``: one run, the figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--viewers", type=int, default=1000)
    p.add_argument("--senders", type=int, default=20)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--sample", type=int, default=200)
    p.add_argument("--procs", type=int)
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2
    report = run_room(
        args.viewers,
        args.senders,
        args.rate,
        args.duration,
        server_cores=cpus[:1] if pin else [],
        client_cores=cpus[1:] if pin else [],
        sample=args.sample,
        procs=args.procs,
    )
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["lost"] == 0 and not report["aborted"] else 1


if __name__ == "__main__":
    sys.exit(main())
