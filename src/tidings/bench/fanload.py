"""Load-generator processes of `tidings bench room` and `tidings bench group`.

``viewers_main``: many connections in one process, plain sockets and epoll. Room viewers
join the room; in bulk they only count markers in the bytes they read every
``bulk_interval_s`` (deliveries: ``"from":``, high-priority posts: ``"kind":"gift"``),
so the load generator stays cheap; a sample of them (and every group member, which must
acknowledge pushes) read at once and parse frames to time each post.

``senders_main``: the posting connections, on a fixed open-loop schedule.

Both talk to the bench over a pipe: ("ready", info) once set up, then ("go", ...) in,
then ("result", figures) out.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import struct
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from tidings.bench.hist import Histogram
from tidings.bench.procs import pin
from tidings.bench.wsraw import FrameReader, join, login, open_ws, send_json

FROM = b'"from":'
HIGH = b'"kind":"gift"'
TAIL = 24  # bytes kept between reads so a marker split by a read is counted once
BATCH = 250  # connections set up at a time
SO_TIMESTAMPNS = 35  # Linux: receive timestamps in ns (not in the socket module)
ACK_EVERY_S = 0.5  # group members acknowledge pushes at most this often (cumulative)
PUSH_RE = re.compile(rb'"t":"push","m":\{"conv":"([^"]+)","seq":(\d+)')
PUSH_TAIL = 200  # bytes kept between reads (longer than a push's head)
GROUP = [False]  # this process's viewers are group members (pushes to acknowledge)


class _Body(msgspec.Struct, frozen=True):
    t0: int = 0


class _Entry(msgspec.Struct):
    conv: str
    seq: int
    body: _Body = _Body()


class _RoomMsg(msgspec.Struct):
    kind: str = ""
    body: _Body = _Body()


class _Frame(msgspec.Struct):
    t: str
    ts: int = 0
    m: _Entry | None = None
    msgs: list[_RoomMsg] = []
    dropped: int = 0


_decode = msgspec.json.Decoder(_Frame).decode
# Posts sent before this process started reading (its set-up reads nothing) would time
# the load generator, not the server: only later ones are timed.
TIMED_AFTER_US = [0]
QUEUED = Histogram()  # post sent -> its tick began (timed viewers, rooms)
WIRE = Histogram()  # tick began -> the frame arrived in the viewer's kernel
BULK_SLICE = 200  # bulk reads between two looks at the timed viewers
QUIET_S = 0.5  # the end: read until nothing came for this long ...
DRAIN_CAP_S = 15.0  # ... or this long at most
FINISH_CAP_S = 30.0  # senders wait at most this long for the server to read their posts


class Viewer:
    __slots__ = (
        "acks",
        "alive",
        "delivered",
        "dropped",
        "frames",
        "high",
        "reader",
        "sampled",
        "seqs",
        "sock",
        "tail",
    )

    def __init__(self, sock: socket.socket, sampled: bool) -> None:
        self.sock = sock
        self.sampled = sampled
        self.reader = FrameReader() if sampled else None
        self.tail = b""
        self.delivered = 0
        self.high = 0
        self.alive = True
        self.seqs: set[int] = set()
        self.acks: dict[str, int] = {}  # group: the highest seq to acknowledge next
        self.frames = 0  # room frames (timed viewers)
        self.dropped = 0  # chat posts the server sampled away (timed viewers)


def join_figures(
    ready: list[dict[str, Any]], join_s: float, rss_kb: tuple[int | None, int | None, int | None]
) -> dict[str, Any]:
    """The join phase of a room run, from the viewer processes' "ready" answers and the
    server's RSS (before the join, joined, at the end): the same report fields for
    Tidings and for every peer."""
    before, joined, end = rss_kb
    connected = sum(r["connected"] for r in ready)
    out: dict[str, Any] = {
        "connected": connected,
        "failed_connections": sum(r["failed"] for r in ready),
        "failures": [w for r in ready for w in r["why"]][:5],
        "join_s": round(join_s, 2),
        "joins_per_s": round(connected / join_s, 1) if join_s else None,
        "server_rss_kb": {"before_join": before, "joined": joined, "end": end},
    }
    if before and joined and connected:
        out["server_kb_per_connection"] = round((joined - before) / connected, 2)
    return out


def _setup(cfg: dict[str, Any], why: list[str]) -> tuple[list[Viewer], int, float]:
    """Connect, authenticate and (rooms) join, a batch at a time; the first reasons of
    failures go to ``why``."""
    t0 = time.monotonic()
    viewers: list[Viewer] = []
    failed = 0
    tokens: list[str] = cfg["tokens"]
    every = max(1, int(cfg["sample_every"]))
    for start in range(0, len(tokens), BATCH):
        batch: list[tuple[socket.socket, str, int]] = []
        for i, token in enumerate(tokens[start : start + BATCH], start):
            try:
                batch.append((open_ws(cfg["host"], cfg["port"], cfg.get("source")), token, i))
            except OSError as exc:
                failed += 1
                if len(why) < 5:
                    why.append(f"connect: {exc!r}")
        for sock, token, i in batch:
            try:
                rest = login(sock, token)
                if cfg.get("room"):
                    rest = join(sock, cfg["room"], rest)
            except (OSError, ConnectionError, TimeoutError) as exc:
                failed += 1
                if len(why) < 5:
                    why.append(f"login: {exc!r}"[:300])
                sock.close()
                continue
            v = Viewer(sock, sampled=i % every == 0)
            if v.sampled:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setblocking(False)
            if rest:
                _consume(v, bytes(rest), 0, None)
            viewers.append(v)
    return viewers, failed, time.monotonic() - t0


def _consume(
    v: Viewer,
    data: bytes,
    now_us: int,
    hist: Histogram | None,
    kernel_us: int = 0,
    khist: Histogram | None = None,
) -> None:
    if v.reader is None:
        chunk = v.tail + data
        if GROUP[0]:
            # Pushes: the (conv, seq) pairs, de-duplicated by seq; a pair cut by a read
            # boundary is found again with the tail (the set keeps it once).
            for conv, seq in PUSH_RE.findall(chunk):
                n = int(seq)
                if n not in v.seqs:
                    v.seqs.add(n)
                    v.delivered += 1
                key = conv.decode()
                if n > v.acks.get(key, 0):
                    v.acks[key] = n
            v.tail = chunk[-PUSH_TAIL:]
            return
        v.delivered += chunk.count(FROM) - v.tail.count(FROM)
        v.high += chunk.count(HIGH) - v.tail.count(HIGH)
        v.tail = chunk[-TAIL:]
        return
    for payload in v.reader.feed(data):
        frame = _decode(payload)
        if frame.t == "room":
            v.frames += 1
            v.dropped += frame.dropped
            if frame.ts and frame.msgs and hist is not None and khist is not None:
                # Where the time goes: post -> tick (queued at the server), tick -> arrival.
                for m in frame.msgs:
                    if m.body.t0 > TIMED_AFTER_US[0]:
                        QUEUED.record(max(0, frame.ts * 1000 - m.body.t0))
                if kernel_us:
                    WIRE.record(max(0, kernel_us - frame.ts * 1000))
            for m in frame.msgs:
                v.delivered += 1
                if m.kind == "gift":
                    v.high += 1
                if hist is not None and m.body.t0 > TIMED_AFTER_US[0]:
                    hist.record(max(0, now_us - m.body.t0))
                    if khist is not None and kernel_us:
                        khist.record(max(0, kernel_us - m.body.t0))
        elif frame.t == "push" and frame.m is not None:
            e = frame.m
            if e.seq not in v.seqs:
                v.seqs.add(e.seq)
                v.delivered += 1
                if hist is not None and e.body.t0 > TIMED_AFTER_US[0]:
                    hist.record(max(0, now_us - e.body.t0))
                    if khist is not None and kernel_us:
                        khist.record(max(0, kernel_us - e.body.t0))
            v.acks[e.conv] = max(v.acks.get(e.conv, 0), e.seq)


def _flush_acks(viewers: list[Viewer]) -> None:
    """Cumulative acks, one per conversation per connection, every ACK_EVERY_S."""
    for v in viewers:
        if v.acks and v.alive:
            for conv, seq in v.acks.items():
                with contextlib.suppress(OSError):
                    send_json(v.sock, {"t": "ack", "conv": conv, "seq": seq})
            v.acks.clear()


def recv_stamped(sock: socket.socket, stamped: bool) -> tuple[bytes, int] | None:
    """What ``sock`` has (b"" once it is closed or failed; None: nothing yet) and, if
    ``stamped``, the kernel's arrival time of it in µs (SO_TIMESTAMPNS; 0 if absent)."""
    kernel_us = 0
    try:
        if stamped:
            data, anc, _, _ = sock.recvmsg(1 << 18, 64)
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                    sec, nsec = struct.unpack_from("qq", raw)
                    kernel_us = sec * 1_000_000 + nsec // 1000
        else:
            data = sock.recv(1 << 18)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    return data, kernel_us


def _read(v: Viewer, hist: Histogram, khist: Histogram) -> bool:
    """Read what is there; False once the connection is gone. Timed viewers also get
    the kernel's arrival time of the data (SO_TIMESTAMPNS): the delay without this
    process's own scheduling delay on a busy load-generator core."""
    got = recv_stamped(v.sock, v.sampled)
    if got is None:
        return True
    data, kernel_us = got
    if not data:
        v.alive = False
        return False
    _consume(v, data, time.time_ns() // 1000, hist, kernel_us, khist)
    return True


def _loop(
    viewers: list[Viewer],
    until: float,
    bulk_interval_s: float,
    hist: Histogram,
    khist: Histogram,
) -> None:
    quick, bulk = select.epoll(), select.epoll()
    by_fd: dict[int, Viewer] = {}
    for v in viewers:
        fd = v.sock.fileno()
        by_fd[fd] = v
        (quick if v.sampled else bulk).register(fd, select.EPOLLIN)
    next_bulk = next_ack = 0.0
    ready: list[int] = []  # bulk connections with data, read a slice at a time
    try:
        while True:
            now = time.monotonic()
            if now >= until:
                break
            # The timed (sampled) viewers first and often, so their delays are the
            # server's, not this process's.
            for fd, _ in quick.poll(0 if ready else 0.005):
                if not _read(by_fd[fd], hist, khist):
                    quick.unregister(fd)
            if now >= next_ack:
                next_ack = now + ACK_EVERY_S
                _flush_acks(viewers)
            if not ready and now >= next_bulk:
                next_bulk = now + bulk_interval_s
                # Every ready connection: epoll's default is at most 1,023 events a call.
                ready = [fd for fd, _ in bulk.poll(0, len(by_fd))]
            for fd in ready[-BULK_SLICE:]:
                if not _read(by_fd[fd], hist, khist):
                    bulk.unregister(fd)
            del ready[-BULK_SLICE:]
        # Drain what is still on its way (the server may be behind), until quiet.
        quiet_since, cap = time.monotonic(), time.monotonic() + DRAIN_CAP_S
        while time.monotonic() - quiet_since < QUIET_S and time.monotonic() < cap:
            got = False
            for ep in (quick, bulk):
                for fd, _ in ep.poll(0.05, len(by_fd)):
                    got = True
                    if not _read(by_fd[fd], hist, khist):
                        ep.unregister(fd)
            if got:
                quiet_since = time.monotonic()
    finally:
        quick.close()
        bulk.close()


def viewers_main(conn: Connection, cfg: dict[str, Any]) -> None:
    try:
        pin(cfg.get("cores", []))
        GROUP[0] = not cfg.get("room")
        why: list[str] = []
        viewers, failed, setup_s = _setup(cfg, why)
        info = {"connected": len(viewers), "failed": failed, "setup_s": setup_s, "why": why}
        conn.send(("ready", info))
        kind, until_wall = conn.recv()
        assert kind == "go"
        hist, khist = Histogram(), Histogram()
        TIMED_AFTER_US[0] = time.time_ns() // 1000
        cpu0 = time.process_time()
        until = time.monotonic() + (until_wall - time.time())
        _loop(viewers, until, cfg["bulk_interval_s"], hist, khist)
        conn.send(
            (
                "result",
                {
                    "connected": len(viewers),
                    "failed": failed,
                    "setup_s": round(setup_s, 2),
                    "alive": sum(v.alive for v in viewers),
                    "delivered": sum(v.delivered for v in viewers),
                    "high_per_viewer": [v.high for v in viewers if v.alive],
                    "received_per_member": [len(v.seqs) for v in viewers if v.alive],
                    "hist": hist.to_dict(),
                    "kernel_hist": khist.to_dict(),
                    "queued_hist": QUEUED.to_dict(),
                    "wire_hist": WIRE.to_dict(),
                    "cpu_s": time.process_time() - cpu0,
                    "timed_frames": sum(v.frames for v in viewers if v.sampled),
                    "timed_dropped": sum(v.dropped for v in viewers if v.sampled),
                    "timed_delivered": sum(v.delivered for v in viewers if v.sampled),
                    "timed_viewers": sum(v.sampled for v in viewers),
                },
            )
        )
        for v in viewers:
            v.sock.close()
    except Exception:
        conn.send(("error", traceback.format_exc()))


def senders_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """Post ``rate`` messages a second in all, round robin over the senders, from the
    wall time given with "go" for ``duration`` seconds. Rooms: every ``high_every``-th
    post is a gift. Groups: a durable send each, its `sent` answers counted."""
    try:
        pin(cfg.get("cores", []))
        # The schedule must hold even when the viewers share this core: a late sender
        # posts in bursts, and a burst is sampled harder than the same posts spread out.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, -10)
        socks = []
        for token in cfg["tokens"]:
            sock = open_ws(cfg["host"], cfg["port"])
            login(sock, token)
            if cfg.get("room"):
                join(sock, cfg["room"], bytearray())
            sock.settimeout(None)  # blocking: a frame is never half sent; reads use DONTWAIT
            socks.append(sock)
        conn.send(("ready", {"senders": len(socks)}))
        kind, start_wall = conn.recv()
        assert kind == "go"
        counts = {"sent": 0, "high": 0, "answers": 0, "errors": 0}
        tails = [b""] * len(socks)
        rate, n = cfg["rate"], int(cfg["rate"] * cfg["duration"])
        start = time.monotonic() + (start_wall - time.time())
        for k in range(n):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            i = k % len(socks)
            body: dict[str, Any] = {"t0": time.time_ns() // 1000, "k": k}
            if cfg.get("room"):
                high = k % cfg["high_every"] == 0
                counts["high"] += high
                frame: dict[str, Any] = {"t": "rsend", "room": cfg["room"]}
                frame["kind"] = "gift" if high else "chat"
                frame["body"] = body
            else:
                body["text"] = "x"
                frame = {"t": "send", "id": k + 1, "cid": f"{cfg['nonce']}-{k}"}
                frame.update(conv=cfg["conv"], body=body)
            send_json(socks[i], frame)
            counts["sent"] += 1
            if k % 16 == 0:
                _drain(socks, tails, counts)
        end = time.monotonic() + cfg["drain_s"]
        while time.monotonic() < end:
            _drain(socks, tails, counts)
            time.sleep(0.05)
        _finish(socks, tails, counts)
        conn.send(("result", counts))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _finish(socks: list[socket.socket], tails: list[bytes], counts: dict[str, int]) -> None:
    """End the senders without losing posts: a socket closed with unread data sends a
    reset, and the server's kernel then drops what the server had not read yet (a
    server behind on a busy room would lose those posts). So: half-close, and read
    until the server has read everything and closed its end (bounded)."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    open_socks = list(range(len(socks)))
    deadline = time.monotonic() + FINISH_CAP_S
    while open_socks and time.monotonic() < deadline:
        _drain(socks, tails, counts)
        still = []
        for i in open_socks:
            try:
                data = socks[i].recv(1 << 16, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            except BlockingIOError:
                still.append(i)
                continue
            except OSError:
                continue
            if data:
                still.append(i)
        open_socks = still
        time.sleep(0.02)


def _drain(socks: list[socket.socket], tails: list[bytes], counts: dict[str, int]) -> None:
    """Read what the senders got (room frames, answers), counting answers and errors."""
    for i, sock in enumerate(socks):
        while True:
            try:
                data = sock.recv(1 << 18, socket.MSG_DONTWAIT)
            except OSError:  # nothing there (EAGAIN) or gone
                break
            if not data:
                break
            chunk = tails[i] + data
            for key, marker in (("answers", b'"t":"sent"'), ("errors", b'"t":"error"')):
                counts[key] += chunk.count(marker) - tails[i].count(marker)
            tails[i] = chunk[-TAIL:]
