"""The Mosquitto peer of ``tidings bench compare``: an MQTT 3.1.1 broker measured the
way Tidings is, 1:1 (``MosquittoPeer``, a :class:`~tidings.bench.peers.DirectPeer`) and
in a room fan-out (:func:`run_room`).

The clients speak MQTT 3.1.1 through the small codec below (no MQTT library): CONNECT/
CONNACK, SUBSCRIBE/SUBACK, PUBLISH at QoS 0 and 1, PUBACK, PINGREQ/PINGRESP, DISCONNECT.

1:1: each pair is a sender client and a recipient client subscribed (at the peer's QoS)
to a topic of its own. Message ``k`` of a load generator is published at ``t0 + k / rate``
open loop to pair ``k % pairs`` as that pair's message ``n = k // pairs``; the payload
carries the run's tag, ``n`` and the scheduled time (µs, CLOCK_MONOTONIC), followed by
the text. At QoS 1 the broker's PUBACK to the sender is the ``sent`` answer (the ack
histogram: scheduled time -> PUBACK) and recipients PUBACK every PUBLISH they get. At
QoS 0 there is no answer: a message counts as answered when it is written to the socket
(the ack histogram is then scheduled time -> written). The results have the keys of
:func:`tidings.bench.worker._result`, so :func:`tidings.bench.report.summarise` merges
them.

Room: ``viewers`` clients subscribe to one topic, spread over processes on the client
cores (plain sockets and epoll, each process from its own 127.x source address); bulk
viewers only count the PUBLISH packets in the bytes they read (and at QoS 1 PUBACK each
one, which is part of QoS 1's cost); a sample of viewers parses every packet and times
each post from the wall-clock send time in its payload.

The broker runs with its own configuration file in a temporary directory, on a free
loopback port, pinned to the server's cores (Mosquitto is single-threaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import secrets
import select
import socket
import struct
import subprocess
import tempfile
import time
import traceback
import zlib
from array import array
from collections.abc import Callable
from multiprocessing.connection import Connection
from types import TracebackType
from typing import IO, Any, cast

from tidings.bench.fanload import join_figures
from tidings.bench.hist import Histogram
from tidings.bench.observe import machine_cpu_s, proc_cpu_s
from tidings.bench.peers import (
    DirectPeer,
    mosquitto_bin,
    port_open,
    start_pinned,
    stop_group,
    wait_ready,
)
from tidings.bench.procs import (
    Worker,
    pin,
    recv_from,
    rss_kb,
    run_async_worker,
    sleep_until,
    spawn,
    stop_workers,
)
from tidings.bench.report import summarise
from tidings.bench.worker import Clocks, Pair, Stats, _result

LOOPBACK = "127.0.0.1"

# ------------------------------------------------------------------ the codec

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

MAX_REMAINING = 268_435_455  # the largest remaining length four bytes can say
MAX_PACKET = 1 << 20  # the parser refuses packets larger than this (the bench's are tiny)
PINGREQ_PACKET = b"\xc0\x00"
PINGRESP_PACKET = b"\xd0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
PUBACK_HEAD = b"\x40\x02"
SUBACK_FAILURE = 0x80

Packet = tuple[int, int, bytes]  # packet type, the fixed header's flags, the body


class ProtocolError(Exception):
    """Bytes that are not MQTT 3.1.1 (or a packet over the parser's limit)."""


def encode_length(n: int) -> bytes:
    """The remaining-length varint: 7 bits a byte, low first, at most 4 bytes."""
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_length(buf: bytes, pos: int) -> tuple[int, int] | None:
    """The varint at ``buf[pos:]``: (value, position after it), or None while incomplete."""
    value = 0
    shift = 0
    end = len(buf)
    for j in range(4):
        if pos + j >= end:
            return None
        b = buf[pos + j]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos + j + 1
        shift += 7
    raise ProtocolError("remaining length longer than 4 bytes")


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_length(len(body)) + body


def _string(s: str) -> bytes:
    raw = s.encode()
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are at most 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _read_string(body: bytes, pos: int) -> tuple[str, int]:
    if len(body) < pos + 2:
        raise ProtocolError("truncated string length")
    n = int.from_bytes(body[pos : pos + 2], "big")
    if len(body) < pos + 2 + n:
        raise ProtocolError("truncated string")
    return body[pos + 2 : pos + 2 + n].decode(), pos + 2 + n


def _packet_id(pid: int) -> bytes:
    if not 1 <= pid <= 0xFFFF:
        raise ValueError(f"packet id out of range: {pid}")
    return pid.to_bytes(2, "big")


def connect(client_id: str, keepalive: int = 60, clean: bool = True) -> bytes:
    """CONNECT, protocol level 4 (3.1.1), no will, user name or password."""
    flags = 0x02 if clean else 0x00
    body = _string("MQTT") + bytes((4, flags)) + keepalive.to_bytes(2, "big") + _string(client_id)
    return _packet(CONNECT << 4, body)


def parse_connect(body: bytes) -> tuple[str, int, bool]:
    """(client id, keepalive, clean session) of a CONNECT body."""
    name, pos = _read_string(body, 0)
    if name != "MQTT" or len(body) < pos + 4 or body[pos] != 4:
        raise ProtocolError("not an MQTT 3.1.1 CONNECT")
    flags = body[pos + 1]
    keepalive = int.from_bytes(body[pos + 2 : pos + 4], "big")
    client_id, _ = _read_string(body, pos + 4)
    return client_id, keepalive, bool(flags & 0x02)


def connack(code: int = 0, session_present: bool = False) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, code))


def parse_connack(body: bytes) -> tuple[bool, int]:
    """(session present, return code); 0 is accepted."""
    if len(body) != 2:
        raise ProtocolError("CONNACK body must be 2 bytes")
    return bool(body[0] & 1), body[1]


def subscribe(packet_id: int, topics: list[tuple[str, int]]) -> bytes:
    if not topics:
        raise ValueError("SUBSCRIBE needs a topic")
    body = _packet_id(packet_id) + b"".join(_string(t) + bytes((q,)) for t, q in topics)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    if len(body) < 2:
        raise ProtocolError("truncated SUBSCRIBE")
    pid = int.from_bytes(body[:2], "big")
    topics = []
    pos = 2
    while pos < len(body):
        topic, pos = _read_string(body, pos)
        if pos >= len(body):
            raise ProtocolError("SUBSCRIBE topic without its QoS")
        topics.append((topic, body[pos]))
        pos += 1
    return pid, topics


def suback(packet_id: int, codes: list[int]) -> bytes:
    return _packet(SUBACK << 4, _packet_id(packet_id) + bytes(codes))


def parse_suback(body: bytes) -> tuple[int, list[int]]:
    """(packet id, granted QoS per topic; 0x80 is a failure)."""
    if len(body) < 3:
        raise ProtocolError("truncated SUBACK")
    return int.from_bytes(body[:2], "big"), list(body[2:])


def publish_header(topic: str, qos: int, payload_len: int) -> bytes:
    """The fixed header and topic of a PUBLISH whose payload is ``payload_len`` bytes: the
    same for every message of a topic, QoS and size (a packet id follows at QoS 1)."""
    if qos not in (0, 1, 2):
        raise ValueError(f"bad QoS {qos}")
    t = _string(topic)
    rest = len(t) + (2 if qos else 0) + payload_len
    return bytes(((PUBLISH << 4) | (qos << 1),)) + encode_length(rest) + t


def publish(
    topic: str,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    if qos not in (0, 1, 2):
        raise ValueError(f"bad QoS {qos}")
    flags = (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = _string(topic) + (_packet_id(packet_id) if qos else b"") + payload
    return _packet((PUBLISH << 4) | flags, body)


def parse_publish(flags: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, QoS, packet id (0 at QoS 0), payload) of a PUBLISH."""
    qos = (flags >> 1) & 3
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    topic, pos = _read_string(body, 0)
    pid = 0
    if qos:
        if len(body) < pos + 2:
            raise ProtocolError("PUBLISH without its packet id")
        pid = int.from_bytes(body[pos : pos + 2], "big")
        if pid == 0:
            raise ProtocolError("PUBLISH with packet id 0")
        pos += 2
    return topic, qos, pid, body[pos:]


def puback(packet_id: int) -> bytes:
    return PUBACK_HEAD + _packet_id(packet_id)


def parse_packet_id(body: bytes) -> int:
    """The packet id of a PUBACK (or any body that is only one)."""
    if len(body) != 2:
        raise ProtocolError("packet id body must be 2 bytes")
    return int.from_bytes(body, "big")


class Parser:
    """Splits a byte stream into packets, across reads of any size."""

    __slots__ = ("_buf", "max_packet")

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self._buf = b""
        self.max_packet = max_packet

    def take_rest(self) -> bytes:
        """The bytes held of a packet not complete yet (the parser forgets them)."""
        rest, self._buf = self._buf, b""
        return rest

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf + data if self._buf else data
        out: list[Packet] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            first = buf[pos]
            if first < 0x10 or first >= 0xF0:
                raise ProtocolError(f"reserved packet type in {first:#04x}")
            length = buf[pos + 1]
            start = pos + 2
            if length & 0x80:
                got = decode_length(buf, pos + 1)
                if got is None:
                    break
                length, start = got
            if length > self.max_packet:
                raise ProtocolError(f"packet of {length} bytes is over the limit")
            if end - start < length:
                break
            out.append((first >> 4, first & 0x0F, buf[start : start + length]))
            pos = start + length
        self._buf = buf[pos:] if pos < end else b""
        return out


# ------------------------------------------------------------------ the broker

# Broker limits, raised so they never shape the load: 65535 QoS 1 messages in flight per
# client (every packet id; Mosquitto's default is 20) and 1,000,000 queued beyond those
# (default 1000), no byte limits, no connection limit.
MAX_INFLIGHT = 65_535
MAX_QUEUED = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def broker_config(port: int, log_path: str) -> str:
    lines = [
        "per_listener_settings false",
        f"listener {port} {LOOPBACK}",
        "allow_anonymous true",
        "persistence false",
        # Without it Mosquitto 2.0 checks every delivery of a message against the list
        # of clients it already went to (strcmp, O(subscribers) each): 14 us instead of
        # 6 us a delivery with 5,000 subscribers. Safe: no client here has overlapping
        # subscriptions; deprecated because it is to become the default.
        "allow_duplicate_messages true",
        f"max_inflight_messages {MAX_INFLIGHT}",
        "max_inflight_bytes 0",
        f"max_queued_messages {MAX_QUEUED}",
        "max_queued_bytes 0",
        "max_connections -1",
        "max_keepalive 65535",
        "memory_limit 0",
        # Nagle off, as on the Tidings server's sockets.
        "set_tcp_nodelay true",
        "sys_interval 0",
        f"log_dest file {log_path}",
        "log_type error",
        "log_type warning",
        "connection_messages false",
        "log_timestamp true",
    ]
    if os.geteuid() == 0:
        # As root Mosquitto would switch to the `mosquitto` user, who cannot write here.
        lines.append("user root")
    return "\n".join(lines) + "\n"


class MosquittoPeer:
    """Mosquitto for ``tidings bench direct --peer mqtt-qos0|mqtt-qos1`` (a DirectPeer)."""

    def __init__(self, qos: int = 1) -> None:
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        self.qos = qos
        self.name = f"mqtt-qos{qos}"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []
        self.config = ""
        self.exit_code: int | None = None
        self.last_log = ""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._out: IO[bytes] | None = None
        self._log_path = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.port}"

    def start(self, cores: list[int]) -> None:
        binary = mosquitto_bin()
        self._tmp = tempfile.TemporaryDirectory(prefix="tidings-mosquitto-")
        tmp = self._tmp.name
        self.port = free_port()
        self._log_path = os.path.join(tmp, "mosquitto.log")
        self.config = broker_config(self.port, self._log_path)
        conf = os.path.join(tmp, "mosquitto.conf")
        with open(conf, "w") as fh:
            fh.write(self.config)
        self._out = open(os.path.join(tmp, "stdout.log"), "ab")  # noqa: SIM115 - stop() closes
        self.argv = [binary, "-c", conf]
        try:
            self.proc = start_pinned(self.argv, cores, cwd=tmp, log=self._out)
            wait_ready(self.proc, "mosquitto", lambda: port_open(LOOPBACK, self.port))
        except Exception as exc:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"{exc}\n{tail}".strip()) from None

    def log_tail(self, lines: int = 20) -> str:
        out = []
        if self._tmp is not None:
            for name in ("stdout.log", "mosquitto.log"):
                try:
                    with open(os.path.join(self._tmp.name, name), "rb") as fh:
                        out += fh.read().decode("utf-8", "replace").splitlines()[-lines:]
                except OSError:
                    pass
        return "\n".join(out)

    def stop(self) -> None:
        try:
            self.exit_code = stop_group(self.proc)
        finally:
            if self._tmp is not None:
                self.last_log = self.log_tail()
            if self._out is not None:
                self._out.close()
                self._out = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def __enter__(self) -> MosquittoPeer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def make_pairs(self, pairs: int, nonce: str) -> list[tuple[Any, ...]]:
        """Per pair: (sender client id, recipient client id, the recipient's topic, QoS)."""
        return [
            (f"s-{nonce}-{i}", f"r-{nonce}-{i}", f"p/{nonce}/{i}", self.qos) for i in range(pairs)
        ]

    @property
    def worker(self) -> Callable[[Connection, dict[str, Any]], None]:
        return mqtt_worker_main


def _is_direct_peer(peer: MosquittoPeer) -> DirectPeer:  # mypy checks the interface here
    return peer


# ------------------------------------------------------------------ 1:1 load generator

P2P_HEAD = struct.Struct("<IIq")  # run tag, n, scheduled time (µs, CLOCK_MONOTONIC)
KEEPALIVE_S = 60
CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 30.0
POLL_S = 0.02
MIN_SLEEP_S = 0.001


def run_tag(cid_prefix: str) -> int:
    """Tells this run's messages from any others on the same topics."""
    return zlib.crc32(cid_prefix.encode())


class _Conn(asyncio.Protocol):
    """One MQTT client connection of the 1:1 load generator."""

    role = "conn"

    def __init__(self, hello: bytes, stats: Stats, qos: int) -> None:
        self.hello = hello
        self.stats = stats
        self.qos = qos
        self.parser = Parser()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.connacked = False
        self.closed_by_us = False
        self.reason = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # uvloop sets it too; asyncio's selector loop does since 3.7
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.parser.feed(data)
        except ProtocolError as exc:
            self._fail(f"protocol: {exc}")
            return
        self.on_packets(packets, time.monotonic())

    def on_packets(self, packets: list[Packet], now: float) -> None:
        for ptype, _, body in packets:
            self.control(ptype, body)

    def control(self, ptype: int, body: bytes) -> None:
        if ptype == CONNACK:
            _, code = parse_connack(body)
            if code:
                self._fail(f"CONNACK {code}")
                return
            self.connacked = True
            if self.role == "sender":
                self._set_ready()
        elif ptype == SUBACK:
            _, granted = parse_suback(body)
            if not self.connacked or granted != [self.qos]:
                self._fail(f"SUBACK {granted} (asked for QoS {self.qos})")
                return
            self._set_ready()
        elif ptype != PINGRESP:
            key = f"{self.role}: unexpected packet type {ptype}"
            self.stats.errors[key] = self.stats.errors.get(key, 0) + 1

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _fail(self, reason: str) -> None:
        self.reason = reason
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(self.reason or f"closed: {exc!r}"))
        if not self.closed_by_us:
            key = f"{self.role}: {self.reason or exc or 'closed by the broker'}"[:120]
            self.stats.closes[key] = self.stats.closes.get(key, 0) + 1

    def send(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(data)
        return True

    def close(self) -> None:
        self.closed_by_us = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT_PACKET)
            self.transport.close()


class _Sender(_Conn):
    role = "sender"

    def __init__(self, hello: bytes, stats: Stats, qos: int, pair: Pair, per: int) -> None:
        super().__init__(hello, stats, qos)
        self.pair = pair
        self.per = per
        self.clocks: Clocks | None = None
        self.in_flight = array("q", [-1]) * 65536  # packet id -> k, -1: free

    def on_packets(self, packets: list[Packet], now: float) -> None:
        clocks = self.clocks
        stats = self.stats
        pair = self.pair
        in_flight = self.in_flight
        for ptype, _, body in packets:
            if ptype != PUBACK or clocks is None:
                self.control(ptype, body)
                continue
            pid = (body[0] << 8) | body[1]
            k = in_flight[pid]
            if k < 0:
                key = "sender: PUBACK for no message"
                stats.errors[key] = stats.errors.get(key, 0) + 1
                continue
            in_flight[pid] = -1
            n = k // self.per
            if pair.acked_seq[n]:
                stats.dup_stored += 1
                continue
            pair.acked_seq[n] = n + 1
            stats.answered += 1
            sched = clocks.t0 + k / clocks.rate
            if clocks.ws <= sched < clocks.we:
                stats.ack.record(int(now * 1e6) - int(sched * 1e6))
            if clocks.ws <= now < clocks.we:
                stats.acked_in_window += 1


class _Recipient(_Conn):
    role = "recipient"

    def __init__(self, hello: bytes, stats: Stats, qos: int, pair: Pair, tag: int) -> None:
        super().__init__(hello, stats, qos)
        self.pair = pair
        self.tag = tag
        self.clocks: Clocks | None = None
        self.top = 0  # highest n + 1 received

    def on_packets(self, packets: list[Packet], now: float) -> None:
        clocks = self.clocks
        stats = self.stats
        pair = self.pair
        top = self.top
        in_window = clocks is not None and clocks.ws <= now < clocks.we
        ws_us = clocks.ws_us if clocks is not None else 0
        we_us = clocks.we_us if clocks is not None else 0
        now_us = int(now * 1e6)
        acks: list[bytes] = []
        unpack = P2P_HEAD.unpack_from
        for ptype, flags, body in packets:
            if ptype != PUBLISH:
                self.control(ptype, body)
                continue
            pos = 2 + ((body[0] << 8) | body[1])
            if flags & 0x06:
                acks.append(PUBACK_HEAD + body[pos : pos + 2])
                pos += 2
            if len(body) - pos < P2P_HEAD.size:
                stats.foreign += 1
                continue
            tag, n, at = unpack(body, pos)
            seq = n + 1
            if tag != self.tag or n >= pair.cap:
                stats.foreign += 1
            elif pair.recv_count[n] == 0:
                pair.recv_count[n] = 1
                pair.recv_seq[n] = seq
                stats.delivered += 1
                if seq < top:
                    stats.reordered += 1
                stats.timed(now_us, at, ws_us, we_us, in_window)
                if seq > top:
                    top = seq
            else:
                count = pair.recv_count[n]
                if count < 255:
                    pair.recv_count[n] = count + 1
                stats.redelivered += 1
        self.top = top
        if acks and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(acks))
            stats.acks_out += len(acks)


def mqtt_worker_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of a spawned 1:1 load generator (the pipe protocol of worker_main)."""
    run_async_worker(conn, cfg, _p2p_run)


async def _p2p_open(
    pairs: list[Pair],
    users: list[tuple[Any, ...]],
    cfg: dict[str, Any],
    stats: Stats,
    qos: int,
) -> tuple[list[_Sender], list[_Recipient]]:
    """Connect every pair, the recipient (subscribed) first so nothing is missed."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    port = int(cfg["port"])
    prefix = str(cfg["cid_prefix"])
    tag = run_tag(prefix)
    senders: list[_Sender | None] = [None] * len(pairs)
    recipients: list[_Recipient | None] = [None] * len(pairs)

    async def open_pair(i: int, pair: Pair, user: tuple[Any, ...]) -> None:
        sender_id, recipient_id, topic = str(user[0]), str(user[1]), str(user[2])
        async with sem:
            hello = connect(prefix + recipient_id, KEEPALIVE_S) + subscribe(1, [(topic, qos)])
            _, r = await loop.create_connection(
                lambda: _Recipient(hello, stats, qos, pair, tag), LOOPBACK, port
            )
            recipients[i] = r
            await asyncio.wait_for(r.ready, CONNECT_TIMEOUT_S)
            hello = connect(prefix + sender_id, KEEPALIVE_S)
            _, s = await loop.create_connection(
                lambda: _Sender(hello, stats, qos, pair, len(pairs)), LOOPBACK, port
            )
            senders[i] = s
            await asyncio.wait_for(s.ready, CONNECT_TIMEOUT_S)

    try:
        await asyncio.gather(
            *(open_pair(i, p, u) for i, (p, u) in enumerate(zip(pairs, users, strict=True)))
        )
    except BaseException:
        for c in [*senders, *recipients]:
            if c is not None:
                c.close()
        raise
    return [s for s in senders if s is not None], [r for r in recipients if r is not None]


async def _p2p_run(conn: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    rate = float(cfg["rate"])
    warmup = float(cfg["warmup"])
    duration = float(cfg["duration"])
    users: list[tuple[Any, ...]] = [tuple(u) for u in cfg["pairs"]]
    qos = int(cfg.get("qos", users[0][3] if len(users[0]) > 3 else 1))
    total = math.ceil((warmup + duration) * rate)
    cap = total // len(users) + 1
    stats = Stats()
    pairs = [Pair(i, str(u[0]), str(u[2]), cap) for i, u in enumerate(users)]
    try:
        senders, recipients = await _p2p_open(pairs, users, cfg, stats, qos)
    except Exception as exc:
        conn.send(("error", f"connect failed: {exc!r}"))
        return
    conns: list[_Conn] = []
    conns += senders
    conns += recipients
    try:
        conn.send(("ready", {"pid": os.getpid(), "connections": len(conns)}))
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] != "go":
            return
        clocks = Clocks(float(msg[1]), rate, warmup, duration)
        stats.per_second = [0] * math.ceil(duration)
        stats.per_second_max_us = [0] * math.ceil(duration)
        for c in senders:
            c.clocks = clocks
        for r in recipients:
            r.clocks = clocks
        cpu: dict[str, float] = {}

        def snap(name: str) -> None:
            cpu[name] = time.process_time()
            cpu[name + "_wall"] = time.monotonic()

        loop.call_later(max(0.0, clocks.ws - time.monotonic()), snap, "start")
        loop.call_later(max(0.0, clocks.we - time.monotonic()), snap, "end")
        text = str(cfg["text"]).encode()
        tag = run_tag(str(cfg["cid_prefix"]))
        await _p2p_drive(pairs, senders, conns, clocks, total, text, tag, qos, stats)
        deadline = max(clocks.we, time.monotonic()) + float(cfg["grace"])
        while time.monotonic() < deadline:
            if stats.answered + stats.errored >= stats.sent and stats.delivered >= stats.answered:
                break
            await asyncio.sleep(POLL_S)
        if "end" not in cpu:
            snap("end")
    finally:
        for one in conns:
            one.close()
    await asyncio.sleep(0.05)
    conn.send(("result", _result(pairs, stats, cpu)))


async def _p2p_drive(
    pairs: list[Pair],
    senders: list[_Sender],
    conns: list[_Conn],
    clocks: Clocks,
    total: int,
    text: bytes,
    tag: int,
    qos: int,
    stats: Stats,
) -> None:
    """Publish message k at t0 + k / rate, open loop, whatever is due per wake-up."""
    per = len(pairs)
    t0 = clocks.t0
    rate = clocks.rate
    ws, we = clocks.ws, clocks.we
    monotonic = time.monotonic
    sleep = asyncio.sleep
    pack = P2P_HEAD.pack
    size = P2P_HEAD.size + len(text)
    heads = [publish_header(str(p.recipient_uid), qos, size) for p in pairs]
    delay = t0 - monotonic()
    if delay > 0:
        await sleep(delay)
    k = 0
    ping_every = KEEPALIVE_S / 2
    next_ping = t0 + ping_every
    while k < total:
        now = monotonic()
        due = int((now - t0) * rate) + 1
        if due > total:
            due = total
        if due > k:
            lag = now - (t0 + k / rate)
            if lag > stats.max_send_lag_s:
                stats.max_send_lag_s = lag
            now_us = int(now * 1e6)
            for i in range(k, due):
                j = i % per
                pair = pairs[j]
                sender = senders[j]
                n = i // per
                sched = t0 + i / rate
                body = pack(tag, n, int(sched * 1e6)) + text
                if qos:
                    pid = n % 0xFFFF + 1
                    if sender.in_flight[pid] >= 0:
                        key = "sender: packet id reused before its PUBACK"
                        stats.errors[key] = stats.errors.get(key, 0) + 1
                    sender.in_flight[pid] = i
                    ok = sender.send(heads[j] + pid.to_bytes(2, "big") + body)
                else:
                    ok = sender.send(heads[j] + body)
                if not ok:
                    stats.send_failed += 1
                    continue
                stats.sent += 1
                pair.sent = n + 1
                if not qos:  # QoS 0: no answer exists; written counts as answered
                    pair.acked_seq[n] = n + 1
                    stats.answered += 1
                    if ws <= sched < we:
                        stats.ack.record(now_us - int(sched * 1e6))
                    if ws <= now < we:
                        stats.acked_in_window += 1
            k = due
        if now >= next_ping:
            next_ping = now + ping_every
            for c in conns:
                c.send(PINGREQ_PACKET)
        # uvloop's timers have millisecond resolution: a shorter sleep would spin.
        delay = t0 + k / rate - monotonic()
        await sleep(delay if delay > MIN_SLEEP_S else MIN_SLEEP_S)


def run_p2p(
    peer: MosquittoPeer,
    pairs: int,
    rate: float,
    duration: float,
    *,
    warmup: float = 1.0,
    grace: float = 3.0,
    procs: int = 1,
    client_cores: list[int] | None = None,
    size: int = 32,
    step: int = 0,
) -> dict[str, Any]:
    """One 1:1 rate against a started peer, as ``tidings bench direct`` runs one: the
    load generators' results merged by ``report.summarise``, the broker's CPU over the
    measured window."""
    if not 1 <= pairs <= 5_000 or not 0 < rate <= 200_000 or not 1 <= duration <= 300:
        raise ValueError("pairs 1..5000, rate (0, 200000], duration 1..300 s")
    procs = max(1, min(procs, pairs, 16))
    nonce = secrets.token_hex(4)
    users = peer.make_pairs(pairs, nonce)
    cores = client_cores or []
    workers: list[Worker] = []
    try:
        for i in range(procs):
            chunk = users[i::procs]
            cfg = {
                "port": peer.port,
                "rate": rate * len(chunk) / len(users),
                "warmup": warmup,
                "duration": duration,
                "grace": grace,
                "pairs": chunk,
                "text": "x" * size,
                "cid_prefix": f"{nonce}.{step}.",
                "cores": [cores[i % len(cores)]] if cores else [],
            }
            workers.append(spawn(peer.worker, cfg))
        deadline = time.monotonic() + 120
        for _, c in workers:
            recv_from(c, deadline, "ready")
        t0 = time.monotonic() + 0.5
        for _, c in workers:
            c.send(("go", t0))
        sleep_until(t0 + warmup)
        cpu0 = proc_cpu_s(peer.pid)
        sleep_until(t0 + warmup + duration)
        cpu1 = proc_cpu_s(peer.pid)
        deadline = time.monotonic() + grace + 60
        results = [recv_from(c, deadline, "result") for _, c in workers]
    finally:
        stop_workers(workers)
    cpu = sum(cpu1) - sum(cpu0) if cpu0 and cpu1 else None
    row = summarise(rate, duration, results, cpu)
    row["peer"] = peer.name
    return row


# ------------------------------------------------------------------ room fan-out

PER_PROC = 15_000
MAX_VIEWERS = 200_000
MAX_SENDERS = 1_000
BATCH = 250  # viewers connected at a time
HANDSHAKE_TIMEOUT_S = 30.0  # a batch's CONNACKs and SUBACKs
CONNECT_PHASE_S = 240.0  # a viewer process stops connecting after this
READY_TIMEOUT_S = 300.0
BULK_SLICE = 200
# After posting, viewers read until each has every post that was sent (the senders say
# how many), or until nothing came for QUIET_S while some are missing (a QoS 0 loss, or a
# broker that stopped), or DRAIN_CAP_S at most. QUIET_S is long because an overloaded
# Mosquitto can spend seconds on a backlog of PUBACKs without writing to anyone.
QUIET_S = 5.0
DRAIN_CAP_S = 60.0  # ... or this long at most (an overloaded broker drains slowly)
DRAIN_BULK_S = 0.1  # meanwhile bulk viewers read this often
CHECK_S = 0.05  # how often the drain looks at the pipe and at who is complete
ROOM_HEAD = struct.Struct("<qI")  # wall-clock send time (µs), post number
ROOM_PAYLOAD = 32  # bytes: the head, then filler
SENDER_NICE = -10


class _Viewer:
    __slots__ = ("alive", "got", "out", "parser", "sampled", "seen", "sock", "tail")

    def __init__(self, sock: socket.socket, sampled: bool) -> None:
        self.sock = sock
        self.sampled = sampled
        self.parser = Parser()
        self.tail = b""
        self.got = 0
        self.alive = True
        self.out = b""  # PUBACKs the socket did not take yet
        self.seen: set[int] = set()  # sampled viewers: post numbers, for duplicates


class _RoomReader:
    """What a viewer process does with the bytes it reads."""

    def __init__(self, topic: str, qos: int) -> None:
        self.qos = qos
        head = publish_header(topic, qos, ROOM_PAYLOAD)
        # Every PUBLISH of the room has this head: bulk viewers count it (QoS 0) or find
        # it with the packet id after it (QoS 1, also with the DUP flag).
        self.marker = head
        self.marker_re = re.compile(b"[\\x32\\x3a]" + re.escape(head[1:]) + b"(..)", re.DOTALL)
        self.keep = len(head) + (2 if qos else 0) - 1
        self.hist = Histogram()
        self.dups = 0
        self.foreign = 0

    def consume(self, v: _Viewer, data: bytes) -> None:
        if not v.sampled:
            chunk = v.tail + data if v.tail else data
            if self.qos:
                pids = self.marker_re.findall(chunk)
                if pids:
                    v.got += len(pids)
                    _write(v, PUBACK_HEAD + PUBACK_HEAD.join(pids))
            else:
                v.got += chunk.count(self.marker)
            v.tail = chunk[-self.keep :]
            return
        now_us = time.time_ns() // 1000
        acks: list[bytes] = []
        for ptype, flags, body in v.parser.feed(data):
            if ptype != PUBLISH:
                self.foreign += 1
                continue
            pos = 2 + ((body[0] << 8) | body[1])
            if flags & 0x06:
                acks.append(PUBACK_HEAD + body[pos : pos + 2])
                pos += 2
            if len(body) - pos < ROOM_HEAD.size:
                self.foreign += 1
                continue
            t0, k = ROOM_HEAD.unpack_from(body, pos)
            if k in v.seen:
                self.dups += 1
                continue
            v.seen.add(k)
            v.got += 1
            self.hist.record(now_us - t0)
        if acks:
            _write(v, b"".join(acks))


def _write(v: _Viewer, data: bytes) -> None:
    """Send without blocking; what the socket does not take waits in ``v.out``."""
    if v.out:
        data = v.out + data
    if not data:
        return
    try:
        n = v.sock.send(data)
    except BlockingIOError:
        n = 0
    except OSError:
        v.alive = False
        v.out = b""
        return
    v.out = data[n:]


def _viewer_setup(cfg: dict[str, Any], why: list[str]) -> tuple[list[_Viewer], int, float]:
    """Connect and subscribe, a batch at a time (CONNECT and SUBSCRIBE pipelined, then
    every CONNACK and SUBACK of the batch awaited), within CONNECT_PHASE_S."""
    t_start = time.monotonic()
    phase_end = t_start + float(cfg.get("connect_phase_s", CONNECT_PHASE_S))
    count = int(cfg["count"])
    every = max(1, int(cfg["sample_every"]))
    qos = int(cfg["qos"])
    hello_sub = subscribe(1, [(str(cfg["topic"]), qos)])
    viewers: list[_Viewer] = []
    failed = 0

    def fail(reason: str) -> None:
        nonlocal failed
        failed += 1
        if len(why) < 5:
            why.append(reason[:300])

    for start in range(0, count, BATCH):
        if time.monotonic() >= phase_end:
            fail(f"connect phase over after {len(viewers)} viewers")
            failed += count - start - 1
            break
        batch: list[_Viewer] = []
        for i in range(start, min(count, start + BATCH)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if cfg.get("rcvbuf"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(cfg["rcvbuf"]))
                if cfg.get("source"):
                    sock.bind((str(cfg["source"]), 0))
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                sock.connect((str(cfg["host"]), int(cfg["port"])))
                sock.sendall(connect(f"{cfg['cid_prefix']}{i}", keepalive=0) + hello_sub)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                fail(f"connect: {exc!r}")
                continue
            batch.append(_Viewer(sock, sampled=i % every == 0))
        waiting = {v.sock.fileno(): v for v in batch}
        state = dict.fromkeys(waiting, 0)  # 1: CONNACK seen, 2: SUBACK seen too
        ep = select.epoll()
        try:
            for fd in waiting:
                ep.register(fd, select.EPOLLIN)
            deadline = min(phase_end, time.monotonic() + HANDSHAKE_TIMEOUT_S)
            while waiting and time.monotonic() < deadline:
                for fd, _ in ep.poll(0.1):
                    v = waiting[fd]
                    err = ""
                    try:
                        data = v.sock.recv(65536)
                        packets = v.parser.feed(data) if data else []
                        if not data:
                            err = "closed during the handshake"
                    except BlockingIOError:
                        continue
                    except (OSError, ProtocolError) as exc:
                        err, packets = f"handshake: {exc!r}", []
                    for ptype, _, body in packets:
                        if ptype == CONNACK and parse_connack(body)[1] == 0:
                            state[fd] = 1
                        elif ptype == SUBACK and state[fd] == 1:
                            granted = parse_suback(body)[1]
                            if granted == [qos]:
                                state[fd] = 2
                            else:
                                err = f"SUBACK {granted}"
                        else:
                            err = f"unexpected packet {ptype} in the handshake"
                    if err or state[fd] == 2:
                        ep.unregister(fd)
                        del waiting[fd]
                        if err:
                            v.sock.close()
                            fail(err)
                        else:
                            viewers.append(v)
        finally:
            ep.close()
        for v in waiting.values():
            v.sock.close()
            fail("no CONNACK/SUBACK in time")
    for v in viewers:
        if not v.sampled:  # bulk viewers count markers from here on, what is held first
            v.tail = v.parser.take_rest()
    return viewers, failed, time.monotonic() - t_start


def _room_loop(
    viewers: list[_Viewer],
    until: float,
    bulk_interval_s: float,
    reader: _RoomReader,
    posted: Callable[[], int | None],
) -> tuple[float, bool]:
    """The sampled viewers read at once, the bulk ones every ``bulk_interval_s`` (a
    slice at a time); after ``until`` the same (bulk viewers every DRAIN_BULK_S) until
    every live viewer has the ``posted()`` posts (None: not known yet), or nothing came
    for QUIET_S. Returns the wall time of the last read with data, and whether the drain
    hit DRAIN_CAP_S."""
    quick, bulk = select.epoll(), select.epoll()
    by_fd: dict[int, _Viewer] = {}
    backlog: set[int] = set()  # viewers with PUBACKs still to write
    last_wall = 0.0
    last_data = time.monotonic()

    def read(fd: int) -> bool:
        nonlocal last_wall, last_data
        v = by_fd[fd]
        try:
            data = v.sock.recv(1 << 18)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            v.alive = False
            return False
        last_wall = time.time()
        last_data = time.monotonic()
        try:
            reader.consume(v, data)
        except ProtocolError:
            v.alive = False
            return False
        if v.out:
            backlog.add(fd)
        return True

    def flush() -> None:
        for fd in list(backlog):
            v = by_fd[fd]
            _write(v, b"")
            if not v.out or not v.alive:
                backlog.discard(fd)

    for v in viewers:
        fd = v.sock.fileno()
        by_fd[fd] = v
        (quick if v.sampled else bulk).register(fd, select.EPOLLIN)
    most = max(1, len(viewers))  # Python's default is FD_SETSIZE - 1 (1023) events a call
    cap = until + DRAIN_CAP_S
    next_check = 0.0
    next_bulk = 0.0
    bulk_idle = False  # the last look at the bulk viewers found nothing to read
    ready: list[int] = []
    try:
        while True:
            now = time.monotonic()
            draining = now >= until
            if draining and not ready:
                if now >= cap:
                    return last_wall, True
                if bulk_idle and now - last_data >= QUIET_S:
                    return last_wall, False
                if now >= next_check:
                    next_check = now + CHECK_S
                    n = posted()
                    if n is not None and all(v.got >= n for v in viewers if v.alive):
                        return last_wall, False
            for fd, _ in quick.poll(0 if ready else 0.005, most):
                if not read(fd):
                    quick.unregister(fd)
            if not ready and now >= next_bulk:
                next_bulk = now + (
                    min(bulk_interval_s, DRAIN_BULK_S) if draining else bulk_interval_s
                )
                ready = [fd for fd, _ in bulk.poll(0, most)]
                bulk_idle = not ready
            for fd in ready[-BULK_SLICE:]:
                if not read(fd):
                    bulk.unregister(fd)
            del ready[-BULK_SLICE:]
            if backlog:
                flush()
    finally:
        quick.close()
        bulk.close()


def mqtt_viewers_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """A process of room viewers: ("ready", info), ("go", (start_wall, end_wall)),
    ("result", figures)."""
    viewers: list[_Viewer] = []
    try:
        pin(cfg.get("cores", []))
        why: list[str] = []
        viewers, failed, setup_s = _viewer_setup(cfg, why)
        info = {"connected": len(viewers), "failed": failed, "setup_s": setup_s, "why": why}
        conn.send(("ready", info))
        kind, (_, end_wall) = conn.recv()
        assert kind == "go"
        reader = _RoomReader(str(cfg["topic"]), int(cfg["qos"]))
        known: list[int] = []

        def posted() -> int | None:  # the posts sent in all, once the bench says
            if not known and conn.poll(0):
                kind, n = conn.recv()
                if kind == "posted":
                    known.append(int(n))
            return known[0] if known else None

        cpu0, wall0 = time.process_time(), time.monotonic()
        until = time.monotonic() + (end_wall - time.time())
        last_rx, capped = _room_loop(viewers, until, float(cfg["bulk_interval_s"]), reader, posted)
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        conn.send(
            (
                "result",
                {
                    "connected": len(viewers),
                    "failed": failed,
                    "setup_s": round(setup_s, 2),
                    "alive": sum(v.alive for v in viewers),
                    "delivered": sum(v.got for v in viewers),
                    "got_per_viewer": [v.got for v in viewers if v.alive],
                    "hist": reader.hist.to_dict(),
                    "dups": reader.dups,
                    "foreign": reader.foreign,
                    "timed_viewers": sum(v.sampled for v in viewers),
                    "cpu_s": cpu_s,
                    "cpu_pct": round(100 * cpu_s / wall_s, 1) if wall_s > 0 else 0.0,
                    "last_rx_wall": last_rx,
                    "drain_capped": capped,
                },
            )
        )
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        for v in viewers:
            with contextlib.suppress(OSError):
                v.sock.send(DISCONNECT_PACKET)
            v.sock.close()


def mqtt_senders_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """The room's publishers: ``rate`` posts/s in all, round robin, open loop from the
    wall time given with "go", for ``duration`` seconds; then ("posted", n) and, still
    connected (closing with unread PUBACKs would reset the connection and the broker
    would drop the posts it has not read yet), PUBACKs counted until ("stop", None)."""
    socks: list[socket.socket] = []
    try:
        pin(cfg.get("cores", []))
        # The schedule must hold even when the viewers share this core.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, SENDER_NICE)
        qos = int(cfg["qos"])
        parsers: list[Parser] = []
        for cid in cfg["client_ids"]:
            sock = socket.create_connection(
                (str(cfg["host"]), int(cfg["port"])), HANDSHAKE_TIMEOUT_S
            )
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(connect(str(cid), keepalive=0))
            parser = Parser()
            _await_connack(sock, parser)
            sock.settimeout(None)  # blocking: a packet is never half sent; reads DONTWAIT
            parsers.append(parser)
        conn.send(("ready", {"senders": len(socks)}))
        kind, (start_wall, _) = conn.recv()
        assert kind == "go"
        counts = {"sent": 0, "answered": 0, "errors": 0}
        rate = float(cfg["rate"])
        n = int(rate * float(cfg["duration"]))
        head = publish_header(str(cfg["topic"]), qos, ROOM_PAYLOAD)
        filler = b"x" * (ROOM_PAYLOAD - ROOM_HEAD.size)
        start = time.monotonic() + (start_wall - time.time())
        max_lag = 0.0
        per = len(socks)
        for k in range(n):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif -delay > max_lag:
                max_lag = -delay
            body = ROOM_HEAD.pack(time.time_ns() // 1000, k) + filler
            if qos:
                pid = (k // per) % 0xFFFF + 1
                socks[k % per].sendall(head + pid.to_bytes(2, "big") + body)
            else:
                socks[k % per].sendall(head + body)
            counts["sent"] += 1
            if qos and k % 16 == 0:
                _sender_drain(socks, parsers, counts)
        counts["max_lag_us"] = int(max_lag * 1e6)
        conn.send(("posted", counts["sent"]))
        end = time.monotonic() + DRAIN_CAP_S + 60
        while time.monotonic() < end:
            _sender_drain(socks, parsers, counts)
            if conn.poll(0.05):
                conn.recv()  # "stop"
                break
        _sender_drain(socks, parsers, counts)
        conn.send(("result", counts))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.send(DISCONNECT_PACKET)
            sock.close()


def _await_connack(sock: socket.socket, parser: Parser) -> None:
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    while time.monotonic() < deadline:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed before CONNACK")
        for ptype, _, body in parser.feed(data):
            if ptype == CONNACK:
                code = parse_connack(body)[1]
                if code:
                    raise ConnectionError(f"CONNACK {code}")
                return
    raise TimeoutError("no CONNACK")


def _sender_drain(
    socks: list[socket.socket], parsers: list[Parser], counts: dict[str, int]
) -> None:
    for sock, parser in zip(socks, parsers, strict=True):
        for _ in range(64):  # bounded: the PUBACKs of one drain are few
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except OSError:  # nothing there (EAGAIN) or gone
                break
            if not data:
                break
            for ptype, _, _ in parser.feed(data):
                if ptype == PUBACK:
                    counts["answered"] += 1
                else:
                    counts["errors"] += 1


def run_room(
    viewers: int,
    senders: int,
    rate: float,
    duration: float,
    *,
    qos: int,
    server_cores: list[int],
    client_cores: list[int],
    sample: int = 200,
    procs: int | None = None,
    rcvbuf: int | None = None,
    bulk_interval_s: float = 0.5,
) -> dict[str, Any]:
    """A room on Mosquitto: ``viewers`` subscribers of one topic, ``senders`` publishers
    posting ``rate`` posts/s in all for ``duration`` s; the broker started here, pinned to
    ``server_cores``, the load generators on ``client_cores``. ``rcvbuf``: the viewers'
    SO_RCVBUF (default: the kernel's, autotuned; the Tidings viewers use 16384, but each
    MQTT post is a TCP segment of its own, and a small buffer stalls the broker's writes
    between two reads of a bulk viewer)."""
    if qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    if not 1 <= viewers <= MAX_VIEWERS or not 1 <= senders <= MAX_SENDERS:
        raise ValueError(f"viewers 1..{MAX_VIEWERS}, senders 1..{MAX_SENDERS}")
    if not 0 < rate <= 100_000 or not 1 <= duration <= 300 or rate * duration > 2_000_000:
        raise ValueError("rate (0, 100000], duration 1..300 s, at most 2,000,000 posts")
    need = math.ceil(viewers / PER_PROC)
    procs = max(need, min(procs or need, 64))
    sample = max(0, min(sample, viewers))
    sample_every = max(1, viewers // sample) if sample else 10**9
    nonce = secrets.token_hex(3)
    topic = f"r/{nonce}/room"
    peer = MosquittoPeer(qos)
    workers: list[Worker] = []
    report: dict[str, Any] = {
        "peer": f"mosquitto-qos{qos}",
        "qos": qos,
        "viewers": viewers,
        "senders": senders,
        "rate": rate,
        "duration": duration,
        "procs": procs,
        "sampled_viewers": sample,
        "viewer_rcvbuf": rcvbuf,
        "bulk_interval_s": bulk_interval_s,
        "server_cores": server_cores,
        "client_cores": client_cores,
    }
    peer.start(server_cores)
    try:
        report["broker"] = {"argv": peer.argv, "config": peer.config.splitlines()}
        base = {"host": LOOPBACK, "port": peer.port, "topic": topic, "qos": qos}
        scfg = dict(
            base,
            client_ids=[f"s{nonce}.{i}" for i in range(senders)],
            rate=rate,
            duration=duration,
            cores=client_cores[-1:],
        )
        sender = spawn(mqtt_senders_main, scfg)
        workers.append(sender)
        recv_from(sender[1], time.monotonic() + READY_TIMEOUT_S, "ready")
        rss_before = rss_kb(peer.pid)
        per = math.ceil(viewers / procs)
        # A fresh source block per run: the last run's connections may linger in TIME_WAIT.
        block = (secrets.randbelow(250) + 1, secrets.randbelow(256))
        t_join = time.monotonic()
        group: list[Worker] = []
        for i in range(procs):
            count = min(per, viewers - i * per)
            if count <= 0:
                break
            vcfg = dict(
                base,
                source=f"127.{block[0]}.{block[1]}.{2 + i}",
                count=count,
                cid_prefix=f"v{nonce}.{i}.",
                sample_every=sample_every,
                bulk_interval_s=bulk_interval_s,
                rcvbuf=rcvbuf,
                cores=[client_cores[i % len(client_cores)]] if client_cores else [],
            )
            group.append(spawn(mqtt_viewers_main, vcfg))
        workers += group
        ready = [recv_from(c, time.monotonic() + READY_TIMEOUT_S, "ready") for _, c in group]
        join_s = time.monotonic() - t_join
        rss_joined = rss_kb(peer.pid)
        start_wall = time.time() + 0.5
        end_wall = start_wall + duration
        for _, c in workers:
            c.send(("go", (start_wall, end_wall)))
        time.sleep(max(0.0, start_wall - time.time()))
        cpu0, busy0 = proc_cpu_s(peer.pid), machine_cpu_s()
        time.sleep(max(0.0, end_wall + 0.5 - time.time()))
        cpu1, busy1 = proc_cpu_s(peer.pid), machine_cpu_s()
        rss_end = rss_kb(peer.pid)
        deadline = time.monotonic() + DRAIN_CAP_S + 60
        posted = recv_from(sender[1], deadline, "posted")
        for _, c in group:
            c.send(("posted", posted))
        results = [recv_from(c, deadline, "result") for _, c in group]
        cpu2 = proc_cpu_s(peer.pid)
        sender[1].send(("stop", None))
        sent = recv_from(sender[1], deadline, "result")
    finally:
        stop_workers(workers)
        peer.stop()
    report.update(join_figures(ready, join_s, (rss_before, rss_joined, rss_end)))
    report.update(server_exit_code=peer.exit_code, broker_log=peer.last_log.splitlines()[-5:])
    _room_figures(report, results, sent, cpu0, cpu1, duration, qos)
    # An overloaded broker goes on delivering after the posting: its CPU until the
    # viewers had everything, and the deliveries over that span.
    last_rx = max((r["last_rx_wall"] for r in results), default=0.0)
    span = last_rx - start_wall if last_rx > start_wall else None
    cpu_all = sum(cpu2) - sum(cpu0) if cpu0 and cpu2 else None
    delivered = report["deliveries"]
    report.update(
        delivery_span_s=None if span is None else round(span, 2),
        deliveries_per_s_over_span=round(delivered / span, 1) if span else None,
        server_cpu_s_until_drained=None if cpu_all is None else round(cpu_all, 3),
        server_cpu_us_per_delivery_until_drained=round(cpu_all * 1e6 / delivered, 3)
        if cpu_all and delivered
        else None,
        drain_capped=any(r["drain_capped"] for r in results),
        # The broker fell behind: deliveries_per_s and deliveries_per_server_cpu_s (the
        # fanout.py formulas) then overstate it; the *_over_span/_until_drained do not.
        behind=span is not None and span > duration + 1.0,
        machine_busy_pct=None
        if busy0 is None or busy1 is None
        else round(100 * (busy1[0] - busy0[0]) / (duration + 0.5), 1),
    )
    return report


def _room_figures(
    report: dict[str, Any],
    results: list[dict[str, Any]],
    sent: dict[str, int],
    cpu0: tuple[float, float] | None,
    cpu1: tuple[float, float] | None,
    duration: float,
    qos: int,
) -> None:
    hist = Histogram()
    for r in results:
        hist.merge(Histogram.from_dict(r["hist"]))
    delivered = sum(r["delivered"] for r in results)
    cpu = sum(cpu1) - sum(cpu0) if cpu0 and cpu1 else None
    posts = sent["sent"]
    got = [g for r in results for g in r["got_per_viewer"]]

    def ms(us: int) -> float | None:
        return round(us / 1000, 3) if hist.count else None

    report.update(
        posts_sent=posts,
        posts_answered=sent["answered"] if qos else None,
        sender_errors=sent["errors"],
        sender_max_lag_ms=round(sent["max_lag_us"] / 1000, 3),
        deliveries=delivered,
        deliveries_per_s=round(delivered / duration, 1),
        server_cpu_s=None if cpu is None else round(cpu, 3),
        server_cpu_pct=None if cpu is None else round(100 * cpu / (duration + 0.5), 1),
        deliveries_per_server_cpu_s=round(delivered / cpu) if cpu else None,
        server_cpu_us_per_delivery=round(cpu * 1e6 / delivered, 3) if cpu and delivered else None,
        p50_ms=ms(hist.percentile(50)),
        p99_ms=ms(hist.percentile(99)),
        max_ms=ms(hist.max),
        timed_deliveries=hist.count,
        timed_viewers=sum(r["timed_viewers"] for r in results),
        # Viewers connected for the whole run: every post should have reached each.
        viewers_alive=len(got),
        lost=sum(max(0, posts - g) for g in got),
        duplicates=sum(max(0, g - posts) for g in got) + sum(r["dups"] for r in results),
        foreign_packets=sum(r["foreign"] for r in results),
        viewer_cpu_s=round(sum(r["cpu_s"] for r in results), 2),
        viewer_cpu_pct=max((r["cpu_pct"] for r in results), default=0.0),
    )
