"""``tidings bench direct``: durable 1:1 messaging, open loop, end to end.

N pairs of lean clients (a sender and a recipient device, each its own connection) over
real sockets to 127.0.0.1. Senders send on a fixed schedule (R messages/s in total);
recipients ack every push. Latency is measured from each message's *scheduled* send
time, so a sender or server that falls behind shows up as latency instead of hiding it.
With ``--rate 2000,5000,...`` every rate runs in turn against the same server.

Without ``--url`` the bench starts its own server (pinned to the first core, the load
generators to the others) with the per-connection limits raised, and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tidings.bench.local import LOOPBACK, LocalRelay, LocalServer, create_users
from tidings.bench.observe import (
    code_info,
    listener_pid,
    machine_info,
    others_cpu_s,
    server_cpu_s,
    snapshot,
    store_files,
    window_figures,
)
from tidings.bench.peers import DirectPeer
from tidings.bench.procs import Worker, recv_from, sleep_until, spawn, stop_workers
from tidings.bench.report import (
    compare_setups,
    comparison_table,
    summarise,
    summary,
    summary_line,
    table_header,
    table_row,
)
from tidings.bench.services import postgres_server, redis_server
from tidings.bench.worker import worker_main

# Bounds: the bench refuses anything bigger.
MAX_PAIRS = 5_000
MAX_RATE = 200_000
MAX_STEPS = 12
MAX_DURATION_S = 300.0
MAX_WARMUP_S = 60.0
MAX_GRACE_S = 60.0
MAX_PROCS = 16
MAX_TEXT_BYTES = 4_096
MAX_MESSAGES_PER_STEP = 5_000_000
READY_TIMEOUT_S = 120.0
SATURATED_FRACTION = 0.5  # a set-up delivering less than this share of the offered rate
PEER_NAMES = ("relay", "synapse", "mqtt-qos0", "mqtt-qos1")
START_DELAY_S = 0.5

# Per-connection limits of a self-started server, raised so they never shape the load.
SERVER_SETTINGS = {
    "rate_per_s": "1000000",
    "rate_burst": "1000000",
    "max_inflight": "65536",
    "max_unacked": "65536",
    "log_level": "WARNING",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--url", help="server to load, http://127.0.0.1:PORT (default: start one)")
    p.add_argument("--admin-key", help="admin key of --url's server (or TIDINGS_ADMIN_KEY)")
    p.add_argument("--tcp-port", type=int, help="raw TCP port of --url's server (--transport tcp)")
    p.add_argument("--server-pid", type=int, help="pid of --url's server, for its CPU time")
    p.add_argument("--pairs", type=int, default=100, help="sender/recipient pairs (default 100)")
    p.add_argument(
        "--rate",
        default="5000",
        help="offered messages/s in total; a comma list runs a sweep (default 5000)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--grace", type=float, default=5.0, help="max seconds to wait for stragglers")
    p.add_argument("--transport", choices=("ws", "tcp"), default="ws")
    p.add_argument("--codec", choices=("json", "msgpack"), default="msgpack")
    p.add_argument("--procs", type=int, help="load-generator processes (default: client cores)")
    p.add_argument("--size", type=int, default=32, help="text bytes per message (default 32)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the results here")
    p.add_argument("--data-dir", help="data directory of the started server (default: a temp dir)")
    p.add_argument("--keep-data", action="store_true", help="keep the started server's data dir")
    p.add_argument(
        "--server-set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="extra setting for the started server (repeatable)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin server and clients to cores")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between the rates of a sweep")
    p.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the started server's store; postgres also starts Redis (default sqlite)",
    )
    p.add_argument(
        "--peer",
        default="",
        help="also run the same rates against peers started the same way, side by side "
        f"(a comma list of {', '.join(PEER_NAMES)}): relay = the ceiling, a minimal "
        "aiohttp relay with no IM work (bench/relay.py); synapse = Matrix Synapse on "
        "SQLite; mqtt-qos0/1 = Mosquitto point to point (scripts/bench-peers.sh installs "
        "them)",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="run every rate even after a set-up saturated (by default a set-up's higher "
        "rates are skipped once it delivers less than half of what was offered)",
    )
    p.add_argument(
        "--workers",
        default="1",
        help="worker processes of the started server; a comma list (e.g. 1,2) runs the "
        "whole bench once per set-up, side by side (more than 1 needs --store postgres)",
    )


# ------------------------------------------------------------------ options


class Plan:
    """Validated options."""

    def __init__(self, args: argparse.Namespace) -> None:
        try:
            self.rates = [float(r) for r in str(args.rate).split(",") if r.strip()]
        except ValueError:
            raise SystemExit(f"--rate: expected numbers, got {args.rate!r}") from None
        if not self.rates or len(self.rates) > MAX_STEPS:
            raise SystemExit(f"--rate: give 1 to {MAX_STEPS} rates")
        if any(not 0 < r <= MAX_RATE for r in self.rates):
            raise SystemExit(f"--rate: each rate must be in (0, {MAX_RATE}]")
        self.pairs = bounded("--pairs", args.pairs, 1, MAX_PAIRS)
        self.duration = bounded("--duration", args.duration, 1.0, MAX_DURATION_S)
        self.warmup = bounded("--warmup", args.warmup, 0.0, MAX_WARMUP_S)
        self.grace = bounded("--grace", args.grace, 0.0, MAX_GRACE_S)
        self.size = bounded("--size", args.size, 1, MAX_TEXT_BYTES)
        self.pause = bounded("--pause", args.pause, 0.0, 60.0)
        for r in self.rates:
            if r * (self.warmup + self.duration) > MAX_MESSAGES_PER_STEP:
                raise SystemExit(f"rate {r:g} x {self.warmup + self.duration:g}s is too many")
        self.transport: str = args.transport
        self.codec: str = args.codec
        if self.transport == "tcp" and self.codec != "msgpack":
            raise SystemExit("--transport tcp speaks msgpack only")
        cpus = sorted(os.sched_getaffinity(0))
        self.pin = not args.no_pin and len(cpus) >= 2
        self.server_cores = cpus[:1] if self.pin else []
        self.client_cores = cpus[1:] if self.pin else []
        default_procs = max(1, len(self.client_cores) or len(cpus))
        self.procs = bounded("--procs", args.procs or default_procs, 1, MAX_PROCS)
        self.procs = min(self.procs, self.pairs)
        self.url: str | None = args.url
        self.admin_key: str = args.admin_key or os.environ.get("TIDINGS_ADMIN_KEY", "")
        self.tcp_port: int | None = args.tcp_port
        self.server_pid: int | None = args.server_pid
        self.http_port = 0
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme != "http" or parts.hostname not in (LOOPBACK, "localhost"):
                raise SystemExit("--url: the bench only targets http://127.0.0.1:PORT")
            if not parts.port:
                raise SystemExit("--url: give the port")
            self.http_port = parts.port
            if not self.admin_key:
                raise SystemExit("--url needs --admin-key (or TIDINGS_ADMIN_KEY)")
            if self.transport == "tcp" and not self.tcp_port:
                raise SystemExit("--url with --transport tcp needs --tcp-port")
        self.server_settings = dict(SERVER_SETTINGS)
        for item in args.server_set:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise SystemExit(f"--server-set expects KEY=VALUE, got {item!r}")
            self.server_settings[key.strip().replace("-", "_")] = value.strip()
        self.data_dir: str = args.data_dir or ""
        self.keep_data: bool = args.keep_data
        self.json_path: str | None = args.json_path
        self.peers = [p.strip() for p in str(args.peer or "").split(",") if p.strip()]
        unknown = [p for p in self.peers if p not in PEER_NAMES]
        if unknown or len(set(self.peers)) != len(self.peers):
            raise SystemExit(f"--peer: a comma list of {', '.join(PEER_NAMES)}")
        self.keep_going: bool = args.keep_going
        self.store: str = args.store
        try:
            self.workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
        except ValueError:
            raise SystemExit(f"--workers: expected numbers, got {args.workers!r}") from None
        if not self.workers or len(self.workers) > 4 or any(not 1 <= w <= 16 for w in self.workers):
            raise SystemExit("--workers: 1 to 4 set-ups of 1..16 workers")
        if max(self.workers) > 1 and self.store != "postgres":
            raise SystemExit("--workers above 1 needs --store postgres (SQLite has one writer)")
        if self.url is not None and (self.store != "sqlite" or self.workers != [1]):
            raise SystemExit("--store and --workers apply to a server the bench starts")
        if self.peers and (self.url is not None or self.store != "sqlite"):
            raise SystemExit("--peer compares with a SQLite server the bench starts")

    def describe(self) -> dict[str, Any]:
        return {
            "rates": self.rates,
            "pairs": self.pairs,
            "connections": 2 * self.pairs,
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "grace_s": self.grace,
            "transport": self.transport,
            "codec": self.codec,
            "procs": self.procs,
            "text_bytes": self.size,
            "pinned": self.pin,
            "server_cores": self.server_cores,
            "client_cores": self.client_cores,
            "store": self.store,
            "workers": self.workers,
            "peers": self.peers,
        }


def bounded(name: str, value: Any, lo: Any, hi: Any) -> Any:
    if not lo <= value <= hi:
        raise SystemExit(f"{name}: must be in [{lo}, {hi}], got {value}")
    return value


# ------------------------------------------------------------------ one rate


def run_rate(plan: Plan, target: Target, rate: float, step: int) -> dict[str, Any]:
    """One rate: spawn the load generators, run the schedule, merge their results."""
    workers = _spawn_workers(plan, target, rate, step)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for _, conn in workers:
            recv_from(conn, deadline, "ready")
        t0 = time.monotonic() + START_DELAY_S
        for _, conn in workers:
            conn.send(("go", t0))
        ws = t0 + plan.warmup
        we = ws + plan.duration
        sleep_until(ws)
        before = snapshot(target.pid, target.others)
        backlog = _watch_backlog(target.base_url, we)
        after = snapshot(target.pid, target.others)
        deadline = we + plan.grace + 60
        results = [recv_from(conn, deadline, "result") for _, conn in workers]
    finally:
        stop_workers(workers, kill=False)
    row = summarise(rate, plan.duration, results, server_cpu_s(before, after))
    row.update(window_figures(before, after, target.pid, plan.duration))
    delivered = row["counts"]["delivered_in_window"]
    for name, cpu_s in others_cpu_s(before, after).items():
        row[f"{name}_cpu_pct"] = round(100 * cpu_s / plan.duration, 1)
        row[f"{name}_cpu_us_per_msg"] = round(cpu_s * 1e6 / delivered, 1) if delivered else None
    if "machine_busy_pct" in row:
        # Everything else the box ran meanwhile: other work on these cores shows up here.
        mine = (row["server_cpu_pct"] or 0.0) + sum(row["client_cpu_pct_per_proc"])
        row["other_cpu_pct"] = round(max(0.0, row["machine_busy_pct"] - mine), 1)
    if target.data_dir:
        row.update(store_files(target.data_dir))
    row["server_pending_writes_max"] = max(backlog, default=None)
    row["server_pending_writes_end"] = backlog[-1] if backlog else None
    return row


def _spawn_workers(plan: Plan, target: Target, rate: float, step: int) -> list[Worker]:
    """One process per slice of the pairs; each gets its share of the rate."""
    users = target.users
    workers: list[Worker] = []
    for i in range(plan.procs):
        chunk = users[i :: plan.procs]
        cores = [plan.client_cores[i % len(plan.client_cores)]] if plan.client_cores else []
        cfg = {
            "port": target.port,
            "transport": plan.transport,
            "codec": plan.codec,
            "rate": rate * len(chunk) / len(users),
            "warmup": plan.warmup,
            "duration": plan.duration,
            "grace": plan.grace,
            "pairs": chunk,
            "text": "x" * plan.size,
            "cid_prefix": f"{target.nonce}.{step}.",
            "cores": cores,
        }
        workers.append(spawn(target.worker, cfg))
    return workers


def _watch_backlog(base_url: str, until: float) -> list[int]:
    """Sleep until ``until``, reading the server's queued writes (/healthz) once a second."""
    seen: list[int] = []
    while True:
        sleep_until(min(until, time.monotonic() + 1.0))
        if time.monotonic() >= until:
            return seen
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=0.5) as resp:
                pending = json.loads(resp.read()).get("pending_writes")
            if isinstance(pending, int):
                seen.append(pending)
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------ results


# ------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> int:
    plan = Plan(args)
    try:
        return _main(plan)
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        print(f"tidings bench direct: {exc}", file=sys.stderr)
        return 2


@dataclass
class Target:
    """The server under load and the bench's users on it."""

    base_url: str
    port: int  # where the clients connect (HTTP port for ws, raw TCP port for tcp)
    pid: int | None
    data_dir: str | None
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))
    users: list[tuple[Any, ...]] = field(default_factory=list)
    others: dict[str, int] = field(default_factory=dict)  # name -> pid: PostgreSQL, Redis
    worker: Callable[[Connection, dict[str, Any]], None] = worker_main  # load generator
    saturated_at: float | None = None  # the first rate the set-up fell far behind at


def _start_server(
    plan: Plan, report: dict[str, Any], settings: dict[str, str]
) -> tuple[LocalServer, Target]:
    server = LocalServer(settings, plan.server_cores, plan.data_dir, plan.keep_data)
    server.start()
    port = server.tcp_port if plan.transport == "tcp" else server.port
    target = Target(server.url, port, server.pid, server.data_dir)
    settings_used = " ".join(f"{k}={v}" for k, v in settings.items())
    print(
        f"server: pid {server.pid} on {server.url} (tcp {server.tcp_port}), cores "
        f"{plan.server_cores or 'any'}, data {server.data_dir}\nserver settings: {settings_used}",
        flush=True,
    )
    report["settings"]["server"] = {
        "started": True,
        "argv": server.argv[1:],
        "settings": settings,
        "data_dir": server.data_dir,
    }
    return server, target


def _given_server(plan: Plan, report: dict[str, Any]) -> Target:
    base_url = f"http://{LOOPBACK}:{plan.http_port}"
    port = plan.tcp_port if plan.transport == "tcp" and plan.tcp_port else plan.http_port
    pid = plan.server_pid or listener_pid(plan.http_port)
    print(f"server: {base_url}, pid {pid or 'unknown (no CPU figures)'}", flush=True)
    report["settings"]["server"] = {"started": False, "url": base_url, "pid": pid}
    return Target(base_url, port, pid, None)


def _main(plan: Plan) -> int:
    report: dict[str, Any] = {"bench": "direct", "settings": plan.describe()}
    report["machine"] = machine_info()
    report["code"] = code_info()
    try:
        with contextlib.ExitStack() as stack:
            if plan.url is not None:
                _run_setup(plan, report, None)
            elif plan.peers:
                _run_with_peers(plan, report)
            elif plan.store == "sqlite":
                _run_setup(plan, report, dict(plan.server_settings))
            else:
                _run_cluster(plan, report, stack)
    finally:
        if plan.json_path:
            with open(plan.json_path, "w") as fh:
                json.dump(report, fh, indent=2)
                fh.write("\n")
    runs = report.get("runs", [])
    return 0 if runs and all(r["valid"] for r in runs) else 1


def _run_cluster(plan: Plan, report: dict[str, Any], stack: contextlib.ExitStack) -> None:
    """Each worker count in turn over one PostgreSQL (fsync on) and one Redis that the
    bench starts; a fresh database per set-up. The set-ups' figures side by side, with
    the ratios of each to the first."""
    pg = stack.enter_context(postgres_server(fsync=True))
    redis = stack.enter_context(redis_server())
    print(f"postgres: pid {pg.pid} port {pg.port} (fsync on); redis: pid {redis.pid}", flush=True)
    setups = []
    for n in plan.workers:
        settings = dict(plan.server_settings)
        settings.update(database_url=pg.new_database(), redis_url=redis.url, workers=str(n))
        print(f"== {n} worker{'s' if n > 1 else ''} over PostgreSQL + Redis", flush=True)
        sub: dict[str, Any] = {"settings": {}, "machine": report["machine"]}
        _run_setup(plan, sub, settings, {"postgres": pg.pid, "redis": redis.pid})
        sub.pop("machine")
        setups.append(
            {"label": f"{n} worker{'s' if n > 1 else ''}", "workers": n, "store": "postgres", **sub}
        )
    report["setups"] = setups
    report["runs"] = [dict(r, workers=s["workers"]) for s in setups for r in s["runs"]]
    report["comparison"] = compare_setups(setups)
    print(comparison_table(report["comparison"]), flush=True)


def make_peer(name: str) -> DirectPeer:
    """A peer by name (imported only when asked for)."""
    if name == "relay":
        return LocalRelay()
    if name == "synapse":
        from tidings.bench.peer_synapse import SynapsePeer

        return SynapsePeer()
    if name in ("mqtt-qos0", "mqtt-qos1"):
        from tidings.bench.peer_mqtt import MosquittoPeer

        return MosquittoPeer(qos=int(name[-1]))
    raise ValueError(f"unknown peer {name!r}")


def _run_with_peers(plan: Plan, report: dict[str, Any]) -> None:
    """Tidings (SQLite, as without --peer), then each peer on the same core with the
    same rates and equally lean clients; side by side, with each figure's ratio to
    Tidings'."""
    setups = []
    print("== tidings", flush=True)
    sub: dict[str, Any] = {"settings": {}, "machine": report["machine"]}
    _run_setup(plan, sub, dict(plan.server_settings))
    sub.pop("machine")
    setups.append({"label": "tidings", **sub})
    for name in plan.peers:
        print(f"== {name}", flush=True)
        sub = {"settings": {}, "machine": report["machine"]}
        peer = make_peer(name)
        try:
            peer.start(plan.server_cores)
            target = Target(peer.url, peer.port, peer.pid, None, worker=peer.worker)
            sub["settings"]["server"] = {"started": True, "peer": name}
            _run_setup(plan, sub, None, given=(target, peer))
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:
            # One peer that cannot run does not cost the others' figures.
            print(f"{name}: {exc}", file=sys.stderr, flush=True)
            sub["error"] = str(exc)
            sub.setdefault("runs", [])
        finally:
            peer.stop()
        sub.pop("machine")
        setups.append({"label": name, **sub})
    report["setups"] = setups
    report["runs"] = [dict(r, setup=s["label"]) for s in setups for r in s["runs"]]
    report["comparison"] = compare_setups(setups)
    print(comparison_table(report["comparison"]), flush=True)
    for s in setups:
        if "summary" in s:
            print(summary_line(s["label"], s["summary"]), flush=True)


def _run_setup(
    plan: Plan,
    report: dict[str, Any],
    settings: dict[str, str] | None,
    others: dict[str, int] | None = None,
    given: tuple[Target, DirectPeer] | None = None,
) -> None:
    server: LocalServer | None = None
    admin_key = ""
    try:
        peer: DirectPeer | None = None
        if given is not None:
            target, peer = given
        elif settings is not None:
            server, target = _start_server(plan, report, settings)
            admin_key = server.admin_key()
        else:
            target = _given_server(plan, report)
            admin_key = plan.admin_key
        target.others = dict(others or {})
        if plan.client_cores:
            os.sched_setaffinity(0, set(plan.client_cores))
        if peer is not None:
            target.users = peer.make_pairs(plan.pairs, target.nonce)
        else:
            uids = [
                (f"bench-{target.nonce}-{i}-s", f"bench-{target.nonce}-{i}-r")
                for i in range(plan.pairs)
            ]
            names = [u for p in uids for u in p]
            tokens = asyncio.run(create_users(target.base_url, admin_key, names, "bench"))
            target.users = [(s, tokens[s], r, tokens[r]) for s, r in uids]
        _sweep(plan, target, server, report)
    finally:
        if server is not None:
            code = server.stop()
            report["settings"]["server"]["exit_code"] = code
            if code not in (0, None):
                print(f"server exited with {code}:\n{server.log_tail()}", file=sys.stderr)


def _sweep(plan: Plan, target: Target, server: LocalServer | None, report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"machine: {m['cpu_model']}, {m['nproc']} cpus; load gen: {plan.procs} proc(s) on "
        f"cores {plan.client_cores or 'any'}; {plan.pairs} pairs over {plan.transport}/"
        f"{plan.codec}; {plan.warmup:g}s warmup + {plan.duration:g}s measured per rate",
        flush=True,
    )
    print(table_header(), flush=True)
    runs: list[dict[str, Any]] = []
    report["runs"] = runs
    for step, rate in enumerate(plan.rates):
        if target.saturated_at is not None and not plan.keep_going:
            print(f"{rate:>10.0f}  skipped: saturated at {target.saturated_at:g}/s", flush=True)
            report.setdefault("skipped_rates", []).append(rate)
            continue
        if step and plan.pause:
            time.sleep(plan.pause)
        load = os.getloadavg()
        row = run_rate(plan, target, rate, step)
        row["loadavg_before"] = load
        runs.append(row)
        print(table_row(row), flush=True)
        if row["msgs_per_s"] < SATURATED_FRACTION * rate:
            target.saturated_at = rate
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            print(f"the server exited:\n{server.log_tail()}", file=sys.stderr)
            break
    report["summary"] = summary(runs)
    if len(runs) > 1:
        print(summary_line("sweep", report["summary"]), flush=True)
    if len(runs) == 1:
        report.update({k: v for k, v in runs[0].items() if k not in report})
