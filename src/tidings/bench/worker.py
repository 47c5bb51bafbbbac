"""One load-generator process of ``tidings bench direct``.

It owns a slice of the pairs (a sender and a recipient connection each), sends open
loop on a fixed schedule and records what it sees. Message ``k`` of this process is
scheduled at ``t0 + k / rate`` and goes to pair ``k % pairs`` as that pair's message
``k // pairs``; the schedule, never the actual send time, is the latency reference, so a
stalled sender or server cannot hide its own delay (no coordinated omission).

The parent talks to it over a multiprocessing pipe: it sends the config, gets
``("ready", info)`` once every connection is authenticated, answers ``("go", t0)`` (a
CLOCK_MONOTONIC time, the same clock in every process) and gets ``("result", dict)``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tidings.bench.hist import Histogram
from tidings.bench.lean import (
    CliAck,
    CliPing,
    CliSend,
    LeanConn,
    SendBody,
    SrvError,
    SrvPush,
    SrvSent,
)
from tidings.bench.procs import run_async_worker

CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 30.0
POLL_S = 0.02
MIN_SLEEP_S = 0.001


@dataclass
class Stats:
    """Counters of one process; the parent adds them up."""

    e2e: Histogram = field(default_factory=Histogram)  # scheduled -> recipient, us
    ack: Histogram = field(default_factory=Histogram)  # scheduled -> `sent` answer, us
    sent: int = 0
    send_failed: int = 0
    answered: int = 0  # messages with a `sent` answer, whole run
    errored: int = 0  # messages answered with an error
    acked_in_window: int = 0
    delivered: int = 0  # first receipts, whole run
    delivered_in_window: int = 0
    redelivered: int = 0  # the same message pushed again (retransmit)
    dup_stored: int = 0  # one client id stored as two messages
    reordered: int = 0
    foreign: int = 0  # pushes that are not this run's bench messages
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    max_send_lag_s: float = 0.0
    acks_out: int = 0
    per_second: list[int] = field(default_factory=list)  # deliveries per window second
    per_second_max_us: list[int] = field(default_factory=list)  # worst latency per second

    def timed(self, now_us: int, at: int, ws_us: int, we_us: int, in_window: bool) -> None:
        """A first receipt, at ``now_us``, of a message scheduled at ``at`` (µs): its
        latency if it was scheduled inside the window [``ws_us``, ``we_us``), and the
        window's counts if it came inside it."""
        if ws_us <= at < we_us:
            self.e2e.record(now_us - at)
        if in_window:
            self.delivered_in_window += 1
            second = (now_us - ws_us) // 1_000_000
            if second < len(self.per_second):
                self.per_second[second] += 1
                if now_us - at > self.per_second_max_us[second]:
                    self.per_second_max_us[second] = now_us - at


class Pair:
    __slots__ = (
        "acked_seq",
        "cap",
        "conv",
        "errored",
        "index",
        "recipient",
        "recipient_uid",
        "recv_count",
        "recv_seq",
        "sender",
        "sender_uid",
        "sent",
    )

    def __init__(self, index: int, sender_uid: str, recipient_uid: str, cap: int) -> None:
        self.index = index
        self.sender_uid = sender_uid
        self.recipient_uid = recipient_uid
        self.cap = cap
        self.sent = 0
        self.acked_seq = array("q", bytes(8 * cap))  # 0: no `sent` answer yet
        self.errored = bytearray(cap)
        self.recv_seq = array("q", bytes(8 * cap))  # seq of the first receipt
        self.recv_count = bytearray(cap)  # receipts, capped at 255
        self.conv = ""
        self.sender: SenderConn | None = None
        self.recipient: RecipientConn | None = None


class Clocks:
    """The schedule: t0, rate, and the measured window [ws, we)."""

    def __init__(self, t0: float, rate: float, warmup: float, duration: float) -> None:
        self.t0 = t0
        self.rate = rate
        self.ws = t0 + warmup
        self.we = self.ws + duration
        self.ws_us = int(self.ws * 1e6)
        self.we_us = int(self.we * 1e6)


class SenderConn(LeanConn):
    pair: Pair
    stats: Stats
    clocks: Clocks | None = None
    per: int = 1  # pairs in this process

    def on_frames(self, frames: list[Any], now: float) -> None:
        clocks = self.clocks
        if clocks is None:
            return
        stats = self.stats
        pair = self.pair
        per = self.per
        t0 = clocks.t0
        rate = clocks.rate
        in_window = clocks.ws <= now < clocks.we
        now_us = int(now * 1e6)
        for f in frames:
            kind = type(f)
            if kind is SrvSent:
                k = f.id - 1
                n = k // per
                if not 0 <= n < pair.cap:
                    continue
                if pair.acked_seq[n]:
                    if pair.acked_seq[n] != f.seq:
                        stats.dup_stored += 1
                    continue
                pair.acked_seq[n] = f.seq
                stats.answered += 1
                sched = t0 + k / rate
                if clocks.ws <= sched < clocks.we:
                    stats.ack.record(now_us - int(sched * 1e6))
                if in_window:
                    stats.acked_in_window += 1
            elif kind is SrvError:
                stats.errors[f.code] = stats.errors.get(f.code, 0) + 1
                n = (f.id - 1) // per
                if f.id and 0 <= n < pair.cap and not pair.errored[n]:
                    pair.errored[n] = 1
                    stats.errored += 1

    def on_closed(self) -> None:
        if not self.closed_by_us:
            key = f"sender {self.close_code}: {self.close_reason}"[:120]
            self.stats.closes[key] = self.stats.closes.get(key, 0) + 1


class RecipientConn(LeanConn):
    pair: Pair
    stats: Stats
    clocks: Clocks | None = None
    cid_prefix = ""
    max_seq = 0
    acked_to = 0

    def on_frames(self, frames: list[Any], now: float) -> None:
        clocks = self.clocks
        stats = self.stats
        pair = self.pair
        top = self.max_seq
        in_window = clocks is not None and clocks.ws <= now < clocks.we
        ws_us = clocks.ws_us if clocks is not None else 0
        we_us = clocks.we_us if clocks is not None else 0
        now_us = int(now * 1e6)
        conv = ""
        for f in frames:
            kind = type(f)
            if kind is SrvPush:
                m = f.m
                seq = m.seq
                conv = m.conv
                n = m.body.n
                if not 0 <= n < pair.cap or not m.cid.startswith(self.cid_prefix):
                    stats.foreign += 1
                elif pair.recv_count[n] == 0:
                    pair.recv_count[n] = 1
                    pair.recv_seq[n] = seq
                    stats.delivered += 1
                    if seq < top:
                        stats.reordered += 1
                    at = m.body.at
                    stats.timed(now_us, at, ws_us, we_us, in_window)
                else:
                    count = pair.recv_count[n]
                    if count < 255:
                        pair.recv_count[n] = count + 1
                    if pair.recv_seq[n] == seq:
                        stats.redelivered += 1
                    else:
                        stats.dup_stored += 1
                if seq > top:
                    top = seq
            elif kind is SrvError:
                stats.errors[f.code] = stats.errors.get(f.code, 0) + 1
        self.max_seq = top
        if top > self.acked_to and conv:
            # Cumulative: one ack per read covers every push in it.
            self.acked_to = top
            pair.conv = conv
            self.send_frame(CliAck(conv, top))
            stats.acks_out += 1

    def on_closed(self) -> None:
        if not self.closed_by_us:
            key = f"recipient {self.close_code}: {self.close_reason}"[:120]
            self.stats.closes[key] = self.stats.closes.get(key, 0) + 1


# ------------------------------------------------------------------ the process


def worker_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of the spawned process."""
    run_async_worker(conn, cfg, _run)


async def _connect(
    cls: type[LeanConn], cfg: dict[str, Any], token: str, sem: asyncio.Semaphore
) -> Any:
    loop = asyncio.get_running_loop()
    host = "127.0.0.1"
    port = int(cfg["port"])
    async with sem:
        _, proto = await loop.create_connection(
            lambda: cls(cfg["transport"], cfg["codec"], host, port, token), host, port
        )
        await asyncio.wait_for(proto.ready, CONNECT_TIMEOUT_S)
    return proto


async def _open_all(
    pairs: list[Pair], users: list[tuple[str, str, str, str]], cfg: dict[str, Any], stats: Stats
) -> None:
    """Connect and authenticate every pair: the recipient first, so no push is missed."""
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    cid_prefix = str(cfg["cid_prefix"])

    async def open_pair(pair: Pair, stoken: str, rtoken: str) -> None:
        r: RecipientConn = await _connect(RecipientConn, cfg, rtoken, sem)
        r.pair, r.stats, r.cid_prefix = pair, stats, cid_prefix
        pair.recipient = r
        s: SenderConn = await _connect(SenderConn, cfg, stoken, sem)
        s.pair, s.stats, s.per = pair, stats, len(pairs)
        pair.sender = s

    await asyncio.gather(*(open_pair(p, u[1], u[3]) for p, u in zip(pairs, users, strict=True)))


def _close_all(pairs: list[Pair]) -> None:
    for p in pairs:
        for c in (p.sender, p.recipient):
            if c is not None:
                c.close()


async def _run(conn: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    rate = float(cfg["rate"])
    warmup = float(cfg["warmup"])
    duration = float(cfg["duration"])
    users: list[tuple[str, str, str, str]] = cfg["pairs"]  # sender, token, recipient, token
    total = math.ceil((warmup + duration) * rate)
    cap = total // len(users) + 1
    stats = Stats()
    pairs = [Pair(i, u[0], u[2], cap) for i, u in enumerate(users)]
    try:
        await _open_all(pairs, users, cfg, stats)
    except Exception as exc:
        _close_all(pairs)
        conn.send(("error", f"connect failed: {exc!r}"))
        return
    conn.send(("ready", {"pid": os.getpid(), "connections": 2 * len(pairs)}))
    msg = await loop.run_in_executor(None, conn.recv)
    if msg[0] != "go":
        _close_all(pairs)
        return
    clocks = Clocks(float(msg[1]), rate, warmup, duration)
    stats.per_second = [0] * math.ceil(duration)
    stats.per_second_max_us = [0] * math.ceil(duration)
    for p in pairs:
        assert p.sender is not None and p.recipient is not None
        p.sender.clocks = clocks
        p.recipient.clocks = clocks
    cpu: dict[str, float] = {}

    def snap(name: str) -> None:  # this process's CPU time at the window's edges
        cpu[name] = time.process_time()
        cpu[name + "_wall"] = time.monotonic()

    loop.call_later(max(0.0, clocks.ws - time.monotonic()), snap, "start")
    loop.call_later(max(0.0, clocks.we - time.monotonic()), snap, "end")
    heartbeat = min((p.sender.heartbeat_ms for p in pairs if p.sender is not None), default=25_000)
    text, prefix = str(cfg["text"]), str(cfg["cid_prefix"])
    await _drive(pairs, clocks, total, text, prefix, stats, heartbeat / 1000)
    await _await_stragglers(stats, max(clocks.we, time.monotonic()) + float(cfg["grace"]))
    if "end" not in cpu:
        snap("end")
    _close_all(pairs)
    await asyncio.sleep(0.05)
    conn.send(("result", _result(pairs, stats, cpu)))


async def _await_stragglers(stats: Stats, deadline: float) -> None:
    """Wait (bounded) for every answer and for every acknowledged message to arrive."""
    while time.monotonic() < deadline:
        if stats.answered + stats.errored >= stats.sent and stats.delivered >= stats.answered:
            return
        await asyncio.sleep(POLL_S)


async def _drive(
    pairs: list[Pair],
    clocks: Clocks,
    total: int,
    text: str,
    cid_prefix: str,
    stats: Stats,
    heartbeat_s: float,
) -> None:
    """Send message k at t0 + k / rate, open loop, batching whatever is due per wake-up."""
    per = len(pairs)
    t0 = clocks.t0
    rate = clocks.rate
    monotonic = time.monotonic
    sleep = asyncio.sleep
    delay = t0 - monotonic()
    if delay > 0:
        await sleep(delay)
    k = 0
    next_ping = t0 + heartbeat_s * 0.8
    while k < total:
        now = monotonic()
        due = int((now - t0) * rate) + 1
        if due > total:
            due = total
        if due > k:
            lag = now - (t0 + k / rate)
            if lag > stats.max_send_lag_s:
                stats.max_send_lag_s = lag
            for i in range(k, due):
                pair = pairs[i % per]
                n = i // per
                at = int((t0 + i / rate) * 1e6)
                sender = pair.sender
                assert sender is not None
                frame = CliSend(
                    i + 1, f"{cid_prefix}{n}", pair.recipient_uid, SendBody(text, n, at)
                )
                if sender.send_frame(frame):
                    stats.sent += 1
                    pair.sent = n + 1
                else:
                    stats.send_failed += 1
            k = due
        if now >= next_ping:
            next_ping = now + heartbeat_s * 0.8
            for p in pairs:
                for c in (p.sender, p.recipient):
                    if c is not None:
                        c.send_frame(CliPing(0))
        # uvloop's timers have millisecond resolution: a shorter sleep would spin.
        delay = t0 + k / rate - monotonic()
        await sleep(delay if delay > MIN_SLEEP_S else MIN_SLEEP_S)


def _result(pairs: list[Pair], stats: Stats, cpu: dict[str, float]) -> dict[str, Any]:
    lost = 0
    unanswered = 0
    unconfirmed = 0  # delivered, but the sender never got its `sent` answer
    for p in pairs:
        for n in range(p.sent):
            acked = p.acked_seq[n]
            got = p.recv_count[n]
            if acked:
                if not got:
                    lost += 1
                elif p.recv_seq[n] != acked:
                    stats.dup_stored += 1
            else:
                if not p.errored[n]:
                    unanswered += 1
                if got:
                    unconfirmed += 1
    return result_dict(stats, cpu, lost=lost, unanswered=unanswered, unconfirmed=unconfirmed)


def result_dict(
    stats: Stats, cpu: dict[str, float], *, lost: int, unanswered: int, unconfirmed: int
) -> dict[str, Any]:
    """A process's result as :func:`tidings.bench.report.summarise` merges it: the
    counters, the tallies of its messages' fates, its CPU over the measured window."""
    cpu_s = cpu.get("end", 0.0) - cpu.get("start", 0.0)
    wall_s = cpu.get("end_wall", 0.0) - cpu.get("start_wall", 0.0)
    return {
        "e2e": stats.e2e.to_dict(),
        "ack": stats.ack.to_dict(),
        "sent": stats.sent,
        "send_failed": stats.send_failed,
        "answered": stats.answered,
        "errored": stats.errored,
        "acked_in_window": stats.acked_in_window,
        "delivered": stats.delivered,
        "delivered_in_window": stats.delivered_in_window,
        "lost": lost,
        "unanswered": unanswered,
        "unconfirmed": unconfirmed,
        "redelivered": stats.redelivered,
        "dup_stored": stats.dup_stored,
        "reordered": stats.reordered,
        "foreign": stats.foreign,
        "errors": stats.errors,
        "closes": stats.closes,
        "acks_out": stats.acks_out,
        "max_send_lag_ms": round(stats.max_send_lag_s * 1000, 3),
        "per_second": stats.per_second,
        "per_second_max_us": stats.per_second_max_us,
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "cpu_pct": round(100 * cpu_s / wall_s, 1) if wall_s > 0 else 0.0,
        "pid": os.getpid(),
    }
