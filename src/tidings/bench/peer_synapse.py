"""Matrix Synapse as a peer of ``tidings bench direct`` (durable 1:1, open loop).

:class:`SynapsePeer` runs Synapse from the virtual environment that
``scripts/bench-peers.sh`` made, on SQLite (Synapse's own defaults: WAL,
``synchronous=FULL``, so every event is on disk before its answer, as in Tidings), one
plain-HTTP client listener on loopback, logging at WARNING, and every ``rc_*`` rate limit
lifted so that the server, not its limiter, is measured.

Choices, for a fair "messages" run:

* Presence is **off** by default (``presence: enabled: false``). Synapse's presence
  marks a user online on every ``/sync`` and fans that out, and is the first thing large
  deployments turn off; the bench measures message delivery only, and Tidings' bench
  clients do not drive presence either. ``SynapsePeer(presence=True)`` measures with it.
* Push rules stay on: Synapse evaluates them for every message (notification and unread
  counts), which is part of how a Matrix server delivers a message.
* ``bcrypt_rounds: 4`` only makes registering the bench users fast; no login is timed.
* Responses are not compressed (the client listener's ``compress: false``).

A pair is a sender and a recipient in a private room of their own (``is_direct``). The
sender ``PUT``s ``m.room.message`` events, each with a unique transaction id; the
recipient long-polls ``/sync`` with a filter that keeps only the timeline's
``m.room.message`` events. The event's ``content`` carries the message number ``n``, the
scheduled time ``at`` (CLOCK_MONOTONIC, microseconds) and the client id ``cid``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import IO, Any
from urllib.parse import quote

import aiohttp
import msgspec

from tidings.bench.local import LOOPBACK, free_port
from tidings.bench.peers import (
    START_TIMEOUT_S,
    http_ok,
    peer_python,
    start_pinned,
    stop_group,
    wait_ready,
)
from tidings.bench.procs import run_async_worker
from tidings.bench.worker import Clocks, Stats, result_dict

SERVER_NAME = "bench.local"
LIFTED = {"per_second": 1_000_000, "burst_count": 1_000_000}
SETUP_CONCURRENCY = 8
SETUP_TIMEOUT_S = 60.0
SEND_CAP = 2048  # in-flight sends per load-generator process; more count as send_failed
SYNC_TIMEOUT_MS = 30_000
TIMELINE_LIMIT = 1000
POLL_RETRY_S = 0.1
MAX_POLL_FAILURES = 50  # consecutive failed /sync requests before a poller gives up
READY_WAIT_S = 600.0  # how long pollers keep polling while waiting for "go"
CLOSE_TIMEOUT_S = 5.0
POLL_S = 0.02
MIN_SLEEP_S = 0.001
HTTP_TIMEOUT_S = SYNC_TIMEOUT_MS / 1000 + 30

# A pair as make_pairs returns it (index: meaning).
SENDER_ID, SENDER_TOKEN, RECIPIENT_ID, RECIPIENT_TOKEN, ROOM_ID, FILTER_ID = range(6)


# ------------------------------------------------------------------ configuration


def lifted_rate_limits() -> dict[str, Any]:
    """Every rate limit Synapse 1.163 reads (``synapse/config/ratelimiting.py``), lifted."""
    one = dict(LIFTED)
    return {
        "rc_message": one,
        "rc_registration": one,
        "rc_registration_token_validity": one,
        "rc_login": {"address": one, "account": one, "failed_attempts": one},
        "rc_admin_redaction": one,
        "rc_joins": {"local": one, "remote": one},
        "rc_joins_per_room": one,
        "rc_key_requests": one,
        "rc_3pid_validation": one,
        "rc_invites": {"per_room": one, "per_user": one, "per_issuer": one},
        "rc_third_party_invite": one,
        "rc_media_create": one,
        "rc_presence": {"per_user": one},
        "rc_delayed_event_mgmt": one,
        "rc_room_creation": one,
        "rc_reports": one,
        "rc_user_directory": one,
        "rc_profile": one,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 1_000_000,
            "sleep_delay": 1,
            "reject_limit": 1_000_000,
            "concurrent": 1_000_000,
        },
        "federation_rr_transactions_per_room_per_second": 1_000_000,
        "remote_media_download_per_second": 1_000_000_000,
        "remote_media_download_burst_count": 1_000_000_000,
    }


def homeserver_config(
    data_dir: str, port: int, shared_secret: str, *, presence: bool = False
) -> dict[str, Any]:
    """The homeserver config (JSON is YAML, so it is written as JSON)."""
    return {
        "server_name": SERVER_NAME,
        "pid_file": os.path.join(data_dir, "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": [LOOPBACK],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(data_dir, "homeserver.db")},
        },
        "log_config": os.path.join(data_dir, "log.config"),
        "media_store_path": os.path.join(data_dir, "media_store"),
        "signing_key_path": os.path.join(data_dir, f"{SERVER_NAME}.signing.key"),
        "registration_shared_secret": shared_secret,
        "enable_registration": False,
        "macaroon_secret_key": secrets.token_hex(32),
        "form_secret": secrets.token_hex(32),
        "report_stats": False,
        "enable_metrics": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "url_preview_enabled": False,
        "presence": {"enabled": presence},
        "bcrypt_rounds": 4,
        **lifted_rate_limits(),
    }


def log_config(path: str) -> dict[str, Any]:
    """Python logging at WARNING, to ``path``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": path, "formatter": "plain"}
        },
        "root": {"level": "WARNING", "handlers": ["file"]},
    }


def _signing_key() -> str:
    """A fresh ed25519 signing key in Synapse's file format."""
    seed = base64.b64encode(os.urandom(32)).rstrip(b"=").decode()
    return f"ed25519 a_{secrets.token_hex(2)} {seed}\n"


# ------------------------------------------------------------------ the server


class SynapsePeer:
    """Synapse on SQLite in a temporary directory, pinned to the server's cores."""

    name = "synapse"

    def __init__(self, *, presence: bool = False, keep_data: bool = False) -> None:
        self.presence = presence
        self.keep_data = keep_data
        self.port = 0
        self.data_dir = ""
        self.config_path = ""
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        self.start_s = 0.0  # how long start() took
        self._secret = secrets.token_hex(24)
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("synapse is not running")
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, cores: list[int]) -> None:
        began = time.monotonic()
        python = peer_python("synapse")
        self.data_dir = tempfile.mkdtemp(prefix="tidings-synapse-")
        self.port = free_port()
        cfg = homeserver_config(self.data_dir, self.port, self._secret, presence=self.presence)
        self.config_path = os.path.join(self.data_dir, "homeserver.yaml")
        with open(self.config_path, "w") as fh:
            json.dump(cfg, fh, indent=1)
        with open(cfg["log_config"], "w") as fh:
            json.dump(log_config(os.path.join(self.data_dir, "homeserver.log")), fh, indent=1)
        with open(cfg["signing_key_path"], "w") as fh:
            fh.write(_signing_key())
        os.makedirs(cfg["media_store_path"], exist_ok=True)
        self.argv = [python, "-m", "synapse.app.homeserver", "--config-path", self.config_path]
        self._log = open(os.path.join(self.data_dir, "stdout.log"), "wb")  # noqa: SIM115
        self.proc = start_pinned(self.argv, cores, cwd=self.data_dir, log=self._log)
        try:
            wait_ready(
                self.proc, "synapse", lambda: http_ok(f"{self.url}/health"), 2 * START_TIMEOUT_S
            )
        except RuntimeError as exc:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"{exc}\n{tail}") from None
        self.start_s = time.monotonic() - began

    def log_tail(self, lines: int = 30) -> str:
        out: list[str] = []
        for name in ("stdout.log", "homeserver.log"):
            try:
                with open(os.path.join(self.data_dir, name), errors="replace") as fh:
                    out += fh.read().splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(out)

    def stop(self) -> None:
        self.exit_code = stop_group(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.data_dir and not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def make_pairs(self, pairs: int, nonce: str) -> list[tuple[Any, ...]]:
        """Register 2 x ``pairs`` users, give each pair a private room both are in and
        the recipient a sync filter. Each pair: (sender user id, sender token,
        recipient user id, recipient token, room id, recipient's filter id)."""
        return asyncio.run(
            asyncio.wait_for(self._make_pairs(pairs, nonce), SETUP_TIMEOUT_S + pairs)
        )

    async def _make_pairs(self, pairs: int, nonce: str) -> list[tuple[Any, ...]]:
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)
        timeout = aiohttp.ClientTimeout(total=SETUP_TIMEOUT_S)
        async with aiohttp.ClientSession(self.url, timeout=timeout) as http:

            async def one(i: int) -> tuple[Any, ...]:
                async with sem:
                    sid, stoken = await self._register(http, f"bench-{nonce}-{i}-s")
                    rid, rtoken = await self._register(http, f"bench-{nonce}-{i}-r")
                    room = await _call(
                        http,
                        "POST",
                        "/_matrix/client/v3/createRoom",
                        stoken,
                        {"preset": "private_chat", "is_direct": True, "invite": [rid]},
                    )
                    room_id = str(room["room_id"])
                    await _call(
                        http, "POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/join", rtoken, {}
                    )
                    made = await _call(
                        http,
                        "POST",
                        f"/_matrix/client/v3/user/{quote(rid)}/filter",
                        rtoken,
                        message_filter(),
                    )
                    return (sid, stoken, rid, rtoken, room_id, str(made["filter_id"]))

            return list(await asyncio.gather(*(one(i) for i in range(pairs))))

    async def _register(self, http: aiohttp.ClientSession, user: str) -> tuple[str, str]:
        path = "/_synapse/admin/v1/register"
        got = await _call(http, "GET", path, None, None)
        nonce = str(got["nonce"])
        password = secrets.token_hex(12)
        mac = hmac.new(self._secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join((nonce.encode(), user.encode(), password.encode(), b"notadmin")))
        body = {
            "nonce": nonce,
            "username": user,
            "password": password,
            "admin": False,
            "mac": mac.hexdigest(),
        }
        done = await _call(http, "POST", path, None, body)
        return str(done["user_id"]), str(done["access_token"])

    @property
    def worker(self) -> Callable[[Connection, dict[str, Any]], None]:
        return synapse_worker_main


def message_filter() -> dict[str, Any]:
    """Only the timeline's m.room.message events; no presence, state or account data."""
    return {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"types": ["m.room.message"], "limit": TIMELINE_LIMIT},
            "state": {"types": []},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    }


async def _call(
    http: aiohttp.ClientSession, method: str, path: str, token: str | None, body: Any
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, path, json=body, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"synapse {method} {path}: {resp.status} {raw[:300]!r}")
    data = json.loads(raw)
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------ the load generator


class _Stats(Stats):
    """This process's counters (``acks_out`` stays 0: Matrix has no per-message ack;
    /sync's since token is it)."""

    def error(self, key: str) -> None:
        key = key[:120]
        self.errors[key] = self.errors.get(key, 0) + 1


class _Pair:
    __slots__ = (
        "ack_eid",
        "cap",
        "errored",
        "filter_id",
        "issued",
        "recv_count",
        "recv_eid",
        "recv_headers",
        "room",
        "room_path",
        "send_headers",
        "since",
        "top_n",
    )

    def __init__(self, row: tuple[Any, ...], cap: int) -> None:
        self.room = str(row[ROOM_ID])
        self.room_path = quote(self.room, safe="")
        self.filter_id = str(row[FILTER_ID])
        self.send_headers = {
            "Authorization": f"Bearer {row[SENDER_TOKEN]}",
            "Content-Type": "application/json",
        }
        self.recv_headers = {"Authorization": f"Bearer {row[RECIPIENT_TOKEN]}"}
        self.cap = cap
        self.issued = bytearray(cap)  # 1: the PUT went out
        self.errored = bytearray(cap)
        self.ack_eid: list[str] = [""] * cap  # event id of the answer
        self.recv_eid: list[str] = [""] * cap  # event id of the first receipt
        self.recv_count = bytearray(cap)  # receipts, capped at 255
        self.since = ""
        self.top_n = -1


class _Gen:
    """One load-generator process: its pairs, its HTTP sessions, its counters."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.base = f"http://{LOOPBACK}:{int(cfg['port'])}"
        self.rate = float(cfg["rate"])
        self.warmup = float(cfg["warmup"])
        self.duration = float(cfg["duration"])
        self.grace = float(cfg["grace"])
        self.text = str(cfg["text"])
        self.prefix = str(cfg["cid_prefix"])
        rows: list[tuple[Any, ...]] = list(cfg["pairs"])
        self.total = math.ceil((self.warmup + self.duration) * self.rate)
        cap = self.total // len(rows) + 1
        self.pairs = [_Pair(r, cap) for r in rows]
        self.by_room = {p.room: p for p in self.pairs}
        self.stats = _Stats()
        self.clocks: Clocks | None = None
        self.inflight = 0
        self.sends: set[asyncio.Task[None]] = set()
        self.pollers: list[asyncio.Task[None]] = []
        self.poll_until = time.monotonic() + READY_WAIT_S
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        self.send_http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=SEND_CAP, limit_per_host=0),
            timeout=timeout,
            auto_decompress=False,
        )
        self.recv_http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=len(rows) + 8, limit_per_host=0),
            timeout=timeout,
            auto_decompress=False,
        )

    # -------------------------------------------------------------- setup

    async def open(self) -> None:
        """Each recipient's first sync (its ``since`` then includes the join), each
        sender's token checked, then the long polls started."""
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)
        # Synapse answers a repeated request from its sync response cache (2 minutes by
        # default): a filter of this run's own makes this first sync a fresh one.
        unique = f"x.tidings.bench.{self.prefix}{secrets.token_hex(4)}"
        first = quote(
            json.dumps(
                {
                    "room": {"timeline": {"limit": 1, "not_types": [unique]}},
                    "presence": {"types": []},
                }
            )
        )

        async def one(p: _Pair) -> None:
            async with sem:
                url = f"{self.base}/_matrix/client/v3/sync?timeout=0&filter={first}"
                async with self.recv_http.get(url, headers=p.recv_headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"first sync: {resp.status} {raw[:200]!r}")
                p.since = str(msgspec.json.decode(raw)["next_batch"])
                url = f"{self.base}/_matrix/client/v3/account/whoami"
                async with self.send_http.get(url, headers=p.send_headers) as resp:
                    raw = await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"whoami: {resp.status} {raw[:200]!r}")

        await asyncio.wait_for(asyncio.gather(*(one(p) for p in self.pairs)), SETUP_TIMEOUT_S)
        self.pollers = [asyncio.create_task(self._poll(p)) for p in self.pairs]

    async def close(self) -> None:
        tasks = [*self.pollers, *self.sends]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        await self.send_http.close()
        await self.recv_http.close()

    # -------------------------------------------------------------- recipient

    async def _poll(self, p: _Pair) -> None:
        """Long-poll /sync for ``p``'s recipient until told to stop (bounded in time)."""
        stats = self.stats
        failures = 0
        while time.monotonic() < self.poll_until and failures < MAX_POLL_FAILURES:
            url = (
                f"{self.base}/_matrix/client/v3/sync?filter={p.filter_id}"
                f"&timeout={SYNC_TIMEOUT_MS}&since={quote(p.since, safe='')}"
            )
            try:
                async with self.recv_http.get(url, headers=p.recv_headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                stats.error(f"sync {type(exc).__name__}")
                failures += 1
                await asyncio.sleep(POLL_RETRY_S)
                continue
            now = time.monotonic()
            if status != 200:
                stats.error(f"sync {status} {_errcode(raw)}")
                failures += 1
                await asyncio.sleep(POLL_RETRY_S)
                continue
            try:
                body = msgspec.json.decode(raw)
                p.since = str(body["next_batch"])
                joined = body.get("rooms", {}).get("join", {})
            except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
                stats.error("sync: unreadable answer")
                failures += 1
                await asyncio.sleep(POLL_RETRY_S)
                continue
            failures = 0
            for room_id, room in joined.items():
                timeline = room.get("timeline", {})
                if timeline.get("limited"):
                    stats.error("sync limited (events skipped)")
                self._received(self.by_room.get(room_id), timeline.get("events", ()), now)
        if failures >= MAX_POLL_FAILURES:
            stats.closes["recipient: too many failed syncs"] = (
                stats.closes.get("recipient: too many failed syncs", 0) + 1
            )

    def _received(self, p: _Pair | None, events: Any, now: float) -> None:
        stats = self.stats
        clocks = self.clocks
        in_window = clocks is not None and clocks.ws <= now < clocks.we
        ws_us = clocks.ws_us if clocks is not None else 0
        we_us = clocks.we_us if clocks is not None else 0
        now_us = int(now * 1e6)
        prefix = self.prefix
        for ev in events:
            content = ev.get("content") or {}
            n = content.get("n")
            cid = content.get("cid")
            if (
                p is None
                or type(n) is not int
                or not 0 <= n < p.cap
                or not isinstance(cid, str)
                or not cid.startswith(prefix)
            ):
                stats.foreign += 1
                continue
            eid = str(ev.get("event_id", ""))
            count = p.recv_count[n]
            if count:
                if count < 255:
                    p.recv_count[n] = count + 1
                if p.recv_eid[n] == eid:
                    stats.redelivered += 1
                else:
                    stats.dup_stored += 1
                continue
            p.recv_count[n] = 1
            p.recv_eid[n] = eid
            stats.delivered += 1
            if n < p.top_n:
                stats.reordered += 1
            else:
                p.top_n = n
            at = content.get("at")
            if type(at) is int:
                stats.timed(now_us, at, ws_us, we_us, in_window)

    # -------------------------------------------------------------- sender

    async def _send(self, p: _Pair, n: int, k: int, at: int) -> None:
        stats = self.stats
        cid = f"{self.prefix}{n}"
        url = (
            f"{self.base}/_matrix/client/v3/rooms/{p.room_path}/send/m.room.message/"
            f"{quote(cid, safe='')}"
        )
        body = msgspec.json.encode(
            {"msgtype": "m.text", "body": self.text, "n": n, "at": at, "cid": cid}
        )
        try:
            async with self.send_http.put(url, data=body, headers=p.send_headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self._failed(p, n, f"send {type(exc).__name__}")
            return
        finally:
            self.inflight -= 1
        now = time.monotonic()
        if status != 200:
            self._failed(p, n, f"send {status} {_errcode(raw)}")
            return
        try:
            eid = str(msgspec.json.decode(raw)["event_id"])
        except (msgspec.DecodeError, KeyError, TypeError):
            self._failed(p, n, "send: answer without event_id")
            return
        if p.ack_eid[n]:
            if p.ack_eid[n] != eid:
                stats.dup_stored += 1
            return
        p.ack_eid[n] = eid
        stats.answered += 1
        clocks = self.clocks
        if clocks is None:
            return
        sched = clocks.t0 + k / clocks.rate
        if clocks.ws <= sched < clocks.we:
            stats.ack.record(int(now * 1e6) - int(sched * 1e6))
        if clocks.ws <= now < clocks.we:
            stats.acked_in_window += 1

    def _failed(self, p: _Pair, n: int, key: str) -> None:
        self.stats.error(key)
        if not p.errored[n]:
            p.errored[n] = 1
            self.stats.errored += 1

    async def drive(self, clocks: Clocks) -> None:
        """Message k at t0 + k / rate to pair k % pairs as its message k // pairs, each
        its own concurrent request (open loop), at most SEND_CAP in flight."""
        self.clocks = clocks
        stats = self.stats
        pairs = self.pairs
        per = len(pairs)
        total = self.total
        t0 = clocks.t0
        rate = clocks.rate
        monotonic = time.monotonic
        create_task = asyncio.get_running_loop().create_task
        sends = self.sends
        delay = t0 - monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        k = 0
        while k < total:
            now = monotonic()
            due = min(total, int((now - t0) * rate) + 1)
            if due > k:
                lag = now - (t0 + k / rate)
                if lag > stats.max_send_lag_s:
                    stats.max_send_lag_s = lag
                for i in range(k, due):
                    p = pairs[i % per]
                    n = i // per
                    if self.inflight >= SEND_CAP:
                        stats.send_failed += 1
                        continue
                    self.inflight += 1
                    p.issued[n] = 1
                    stats.sent += 1
                    task = create_task(self._send(p, n, i, int((t0 + i / rate) * 1e6)))
                    sends.add(task)
                    task.add_done_callback(sends.discard)
                k = due
            # uvloop's timers have millisecond resolution: a shorter sleep would spin.
            delay = t0 + k / rate - monotonic()
            await asyncio.sleep(delay if delay > MIN_SLEEP_S else MIN_SLEEP_S)

    async def await_stragglers(self, deadline: float) -> None:
        s = self.stats
        while time.monotonic() < deadline:
            if s.answered + s.errored >= s.sent and s.delivered >= s.answered:
                return
            await asyncio.sleep(POLL_S)

    def result(self, cpu: dict[str, float]) -> dict[str, Any]:
        stats = self.stats
        lost = unanswered = unconfirmed = 0
        for p in self.pairs:
            for n in range(p.cap):
                if not p.issued[n]:
                    continue
                acked = p.ack_eid[n]
                got = p.recv_count[n]
                if acked:
                    if not got:
                        lost += 1
                    elif p.recv_eid[n] != acked:
                        stats.dup_stored += 1
                else:
                    if not p.errored[n]:
                        unanswered += 1
                    if got:
                        unconfirmed += 1
        return result_dict(stats, cpu, lost=lost, unanswered=unanswered, unconfirmed=unconfirmed)


def _errcode(raw: bytes) -> str:
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return ""
    return str(data.get("errcode", "")) if isinstance(data, dict) else ""


def synapse_worker_main(conn: Connection, cfg: dict[str, Any]) -> None:
    """Entry point of a spawned load-generator process (the pipe protocol of
    :func:`tidings.bench.worker.worker_main`); ``cfg["pairs"]`` are make_pairs rows."""
    run_async_worker(conn, cfg, _run)


async def _run(conn: Connection, cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    gen = _Gen(cfg)
    try:
        try:
            await gen.open()
        except Exception as exc:
            conn.send(("error", f"connect failed: {exc!r}"))
            return
        conn.send(("ready", {"pid": os.getpid(), "connections": 2 * len(gen.pairs)}))
        msg = await loop.run_in_executor(None, conn.recv)
        if msg[0] != "go":
            return
        clocks = Clocks(float(msg[1]), gen.rate, gen.warmup, gen.duration)
        gen.poll_until = clocks.we + gen.grace + SYNC_TIMEOUT_MS / 1000
        seconds = math.ceil(gen.duration)
        gen.stats.per_second = [0] * seconds
        gen.stats.per_second_max_us = [0] * seconds
        cpu: dict[str, float] = {}

        def snap(name: str) -> None:  # this process's CPU time at the window's edges
            cpu[name] = time.process_time()
            cpu[name + "_wall"] = time.monotonic()

        loop.call_later(max(0.0, clocks.ws - time.monotonic()), snap, "start")
        loop.call_later(max(0.0, clocks.we - time.monotonic()), snap, "end")
        await gen.drive(clocks)
        await gen.await_stragglers(max(clocks.we, time.monotonic()) + gen.grace)
        if "start" not in cpu:
            snap("start")
        if "end" not in cpu:
            snap("end")
        await gen.close()
        conn.send(("result", gen.result(cpu)))
    finally:
        if not gen.send_http.closed:
            await gen.close()
