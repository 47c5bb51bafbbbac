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
import json
import multiprocessing
import os
import secrets
import sys
import time
import urllib.request
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tidings.bench.hist import Histogram
from tidings.bench.local import (
    LOOPBACK,
    LocalServer,
    code_info,
    create_users,
    listener_pid,
    machine_info,
    proc_cpu_s,
    thread_cpu_s,
)
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
START_DELAY_S = 0.5

# Per-connection limits of a self-started server, raised so they never shape the load.
SERVER_SETTINGS = {
    "rate_per_s": "1000000",
    "rate_burst": "1000000",
    "max_inflight": "65536",
    "max_unacked": "65536",
    "log_level": "WARNING",
}
VALID_RATE_FRACTION = 0.99
MAX_CLIENT_CPU_PCT = 90.0


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
        self.pairs = _bounded("--pairs", args.pairs, 1, MAX_PAIRS)
        self.duration = _bounded("--duration", args.duration, 1.0, MAX_DURATION_S)
        self.warmup = _bounded("--warmup", args.warmup, 0.0, MAX_WARMUP_S)
        self.grace = _bounded("--grace", args.grace, 0.0, MAX_GRACE_S)
        self.size = _bounded("--size", args.size, 1, MAX_TEXT_BYTES)
        self.pause = _bounded("--pause", args.pause, 0.0, 60.0)
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
        self.procs = _bounded("--procs", args.procs or default_procs, 1, MAX_PROCS)
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
        }


def _bounded(name: str, value: Any, lo: Any, hi: Any) -> Any:
    if not lo <= value <= hi:
        raise SystemExit(f"{name}: must be in [{lo}, {hi}], got {value}")
    return value


# ------------------------------------------------------------------ one rate


def _recv(conn: Connection, deadline: float, want: str) -> Any:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"a load generator did not answer {want!r} in time")
        if conn.poll(min(left, 1.0)):
            try:
                kind, payload = conn.recv()
            except EOFError:
                raise RuntimeError(f"a load generator died before {want!r}") from None
            if kind == "error":
                raise RuntimeError(f"load generator failed:\n{payload}")
            if kind == want:
                return payload


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_rate(
    plan: Plan,
    rate: float,
    step: int,
    users: list[tuple[str, str, str, str]],
    port: int,
    server_pid: int | None,
    nonce: str,
    base_url: str,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    chunks = [users[i :: plan.procs] for i in range(plan.procs)]
    text = "x" * plan.size
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for i, chunk in enumerate(chunks):
            parent, child = ctx.Pipe()
            cores = [plan.client_cores[i % len(plan.client_cores)]] if plan.client_cores else []
            cfg = {
                "port": port,
                "transport": plan.transport,
                "codec": plan.codec,
                "rate": rate * len(chunk) / len(users),
                "warmup": plan.warmup,
                "duration": plan.duration,
                "grace": plan.grace,
                "pairs": chunk,
                "text": text,
                "cid_prefix": f"{nonce}.{step}.",
                "cores": cores,
            }
            proc: multiprocessing.process.BaseProcess = ctx.Process(
                target=worker_main, args=(child, cfg), daemon=True
            )
            proc.start()
            child.close()
            workers.append((proc, parent))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for _, conn in workers:
            _recv(conn, deadline, "ready")
        t0 = time.monotonic() + START_DELAY_S
        for _, conn in workers:
            conn.send(("go", t0))
        ws = t0 + plan.warmup
        we = ws + plan.duration
        _sleep_until(ws)
        cpu0 = proc_cpu_s(server_pid) if server_pid else None
        threads0 = thread_cpu_s(server_pid) if server_pid else {}
        backlog = _watch_backlog(base_url, we)
        cpu1 = proc_cpu_s(server_pid) if server_pid else None
        threads1 = thread_cpu_s(server_pid) if server_pid else {}
        deadline = we + plan.grace + 60
        results = [_recv(conn, deadline, "result") for _, conn in workers]
    finally:
        for proc, conn in workers:
            if proc.is_alive():
                with_timeout_join(proc)
            conn.close()
    server_cpu = None
    if cpu0 is not None and cpu1 is not None:
        server_cpu = cpu1[0] + cpu1[1] - cpu0[0] - cpu0[1]
    row = summarise(plan, rate, results, server_cpu)
    row["server_pending_writes_max"] = max(backlog, default=None)
    row["server_pending_writes_end"] = backlog[-1] if backlog else None
    if cpu0 is not None and cpu1 is not None:
        row["server_sys_cpu_pct"] = round(100 * (cpu1[1] - cpu0[1]) / plan.duration, 1)
    if server_pid in threads0 and server_pid in threads1:
        # Where the server's CPU went: its event loop (the main thread) vs the others
        # (the SQLite writer, checkpointer and reader threads), user and system time.
        per_thread = []
        for tid, (u1, s1) in sorted(threads1.items()):
            u0, s0 = threads0.get(tid, (0.0, 0.0))
            per_thread.append(
                {
                    "tid": tid,
                    "loop": tid == server_pid,
                    "user_pct": round(100 * (u1 - u0) / plan.duration, 1),
                    "sys_pct": round(100 * (s1 - s0) / plan.duration, 1),
                }
            )
        loop = [t for t in per_thread if t["loop"]]
        others = [t for t in per_thread if not t["loop"]]
        row["server_loop_cpu_pct"] = round(sum(t["user_pct"] + t["sys_pct"] for t in loop), 1)
        row["server_other_threads_cpu_pct"] = round(
            sum(t["user_pct"] + t["sys_pct"] for t in others), 1
        )
        row["server_threads"] = [t for t in per_thread if t["user_pct"] or t["sys_pct"]]
    return row


def _watch_backlog(base_url: str, until: float) -> list[int]:
    """Sleep until ``until``, reading the server's queued writes (/healthz) once a second."""
    seen: list[int] = []
    while True:
        _sleep_until(min(until, time.monotonic() + 1.0))
        if time.monotonic() >= until:
            return seen
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=0.5) as resp:
                pending = json.loads(resp.read()).get("pending_writes")
            if isinstance(pending, int):
                seen.append(pending)
        except (OSError, ValueError):
            pass


def with_timeout_join(proc: multiprocessing.process.BaseProcess) -> None:
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)


# ------------------------------------------------------------------ results


def _ms(us: float) -> float:
    return round(us / 1000, 3)


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def summarise(
    plan: Plan, rate: float, results: list[dict[str, Any]], server_cpu_s: float | None
) -> dict[str, Any]:
    e2e = Histogram()
    ack = Histogram()
    totals: dict[str, int] = {}
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    counters = [
        *("sent", "send_failed", "answered", "errored", "acked_in_window", "delivered"),
        *("delivered_in_window", "lost", "unanswered", "unconfirmed", "redelivered"),
        *("dup_stored", "reordered", "foreign", "acks_out"),
    ]
    for r in results:
        e2e.merge(Histogram.from_dict(r["e2e"]))
        ack.merge(Histogram.from_dict(r["ack"]))
        for name in counters:
            totals[name] = totals.get(name, 0) + int(r[name])
        _add(errors, r["errors"])
        _add(closes, r["closes"])
    cpu = [float(r["cpu_pct"]) for r in results]
    achieved = totals["delivered_in_window"] / plan.duration
    row: dict[str, Any] = {
        "offered_per_s": rate,
        "msgs_per_s": round(achieved, 1),
        "acked_per_s": round(totals["acked_in_window"] / plan.duration, 1),
        "p50_ms": _ms(e2e.percentile(50)),
        "p90_ms": _ms(e2e.percentile(90)),
        "p99_ms": _ms(e2e.percentile(99)),
        "p999_ms": _ms(e2e.percentile(99.9)),
        "max_ms": _ms(e2e.max),
        "mean_ms": _ms(e2e.mean),
        "ack_p50_ms": _ms(ack.percentile(50)),
        "ack_p99_ms": _ms(ack.percentile(99)),
        "ack_p999_ms": _ms(ack.percentile(99.9)),
        "samples": e2e.count,
        "lost": totals["lost"],
        "duplicated": totals["dup_stored"] + totals["redelivered"],
        "duplicated_stored": totals["dup_stored"],
        "redelivered": totals["redelivered"],
        "reordered": totals["reordered"],
        "server_cpu_s": None if server_cpu_s is None else round(server_cpu_s, 3),
        "server_cpu_pct": None
        if server_cpu_s is None
        else round(100 * server_cpu_s / plan.duration, 1),
        "server_cpu_us_per_msg": None
        if server_cpu_s is None or not totals["delivered_in_window"]
        else round(server_cpu_s * 1e6 / totals["delivered_in_window"], 1),
        "client_cpu_pct": max(cpu) if cpu else 0.0,
        "client_cpu_pct_mean": round(sum(cpu) / len(cpu), 1) if cpu else 0.0,
        "client_cpu_pct_per_proc": cpu,
        "max_send_lag_ms": max(float(r["max_send_lag_ms"]) for r in results),
        "counts": totals,
        "errors": errors,
        "closes": closes,
        "histograms_us": {"e2e": e2e.to_dict(), "ack": ack.to_dict()},
    }
    reasons = []
    if achieved < VALID_RATE_FRACTION * rate:
        reasons.append(f"achieved {achieved:.0f}/s < 99% of offered {rate:g}/s")
    if row["client_cpu_pct"] > MAX_CLIENT_CPU_PCT:
        reasons.append(f"client CPU {row['client_cpu_pct']}% > {MAX_CLIENT_CPU_PCT:g}%")
    for name in ("lost", "duplicated", "reordered"):
        if row[name]:
            reasons.append(f"{row[name]} {name}")
    if errors:
        reasons.append(f"error answers {errors}")
    if closes:
        reasons.append(f"connections closed {closes}")
    if totals["send_failed"] or totals["unanswered"]:
        reasons.append(f"{totals['send_failed']} failed, {totals['unanswered']} unanswered sends")
    row["valid"] = not reasons
    row["reasons"] = reasons
    return row


COLUMNS = (
    ("offered/s", "offered_per_s", "{:.0f}"),
    ("achieved/s", "msgs_per_s", "{:.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("p99.9 ms", "p999_ms", "{:.2f}"),
    ("max ms", "max_ms", "{:.1f}"),
    ("ack p99", "ack_p99_ms", "{:.2f}"),
    ("lost", "lost", "{}"),
    ("dup", "duplicated", "{}"),
    ("reord", "reordered", "{}"),
    ("srv us/msg", "server_cpu_us_per_msg", "{:.1f}"),
    ("srv cpu%", "server_cpu_pct", "{:.0f}"),
    ("loop cpu%", "server_loop_cpu_pct", "{:.0f}"),
    ("sys cpu%", "server_sys_cpu_pct", "{:.0f}"),
    ("cli cpu%", "client_cpu_pct", "{:.0f}"),
    ("queue max", "server_pending_writes_max", "{}"),
)


def table_header() -> str:
    return "  ".join(f"{title:>10}" for title, _, _ in COLUMNS) + "  status"


def table_row(row: dict[str, Any]) -> str:
    cells = []
    for _, key, fmt in COLUMNS:
        value = row.get(key)
        cells.append(f"{'-' if value is None else fmt.format(value):>10}")
    status = "ok" if row["valid"] else "INVALID: " + "; ".join(row["reasons"])
    return "  ".join(cells) + "  " + status


# ------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> int:
    plan = Plan(args)
    try:
        return _main(plan)
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        print(f"tidings bench direct: {exc}", file=sys.stderr)
        return 2


def _main(plan: Plan) -> int:
    nonce = secrets.token_hex(4)
    server: LocalServer | None = None
    report: dict[str, Any] = {"bench": "direct", "settings": plan.describe()}
    try:
        if plan.url is None:
            server = LocalServer(
                plan.server_settings, plan.server_cores, plan.data_dir, keep=plan.keep_data
            )
            server.start()
            admin_key = server.admin_key()
            base_url = server.url
            port = server.tcp_port if plan.transport == "tcp" else server.port
            server_pid: int | None = server.pid
            settings_used = " ".join(f"{k}={v}" for k, v in plan.server_settings.items())
            print(
                f"server: pid {server.pid} on {base_url} (tcp {server.tcp_port}), cores "
                f"{plan.server_cores or 'any'}, data {server.data_dir}",
                flush=True,
            )
            print(f"server settings: {settings_used}", flush=True)
            report["settings"]["server"] = {
                "started": True,
                "argv": server.argv[1:],
                "settings": plan.server_settings,
                "data_dir": server.data_dir,
            }
        else:
            admin_key = plan.admin_key
            base_url = f"http://{LOOPBACK}:{plan.http_port}"
            port = plan.tcp_port if plan.transport == "tcp" and plan.tcp_port else plan.http_port
            server_pid = plan.server_pid or listener_pid(plan.http_port)
            print(f"server: {base_url}, pid {server_pid or 'unknown (no CPU figures)'}", flush=True)
            report["settings"]["server"] = {"started": False, "url": base_url, "pid": server_pid}
        if plan.client_cores:
            os.sched_setaffinity(0, set(plan.client_cores))
        report["machine"] = machine_info()
        report["code"] = code_info()
        uids = [(f"bench-{nonce}-{i}-s", f"bench-{nonce}-{i}-r") for i in range(plan.pairs)]
        flat = [u for pair in uids for u in pair]
        tokens = asyncio.run(create_users(base_url, admin_key, flat, "bench"))
        users = [(s, tokens[s], r, tokens[r]) for s, r in uids]
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
            if step and plan.pause:
                time.sleep(plan.pause)
            load = os.getloadavg()
            row = run_rate(plan, rate, step, users, port, server_pid, nonce, base_url)
            row["loadavg_before"] = load
            runs.append(row)
            print(table_row(row), flush=True)
            if server is not None and server.proc is not None and server.proc.poll() is not None:
                print(f"the server exited:\n{server.log_tail()}", file=sys.stderr)
                break
        report["summary"] = _summary(runs)
        if len(runs) == 1:
            report.update({k: v for k, v in runs[0].items() if k not in report})
    finally:
        if server is not None:
            code = server.stop()
            report.setdefault("settings", {}).setdefault("server", {})["exit_code"] = code
            if code not in (0, None):
                print(f"server exited with {code}:\n{server.log_tail()}", file=sys.stderr)
        if plan.json_path:
            with open(plan.json_path, "w") as fh:
                json.dump(report, fh, indent=2)
                fh.write("\n")
    runs = report.get("runs", [])
    return 0 if runs and all(r["valid"] for r in runs) else 1


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    valid = [r for r in runs if r["valid"]]
    best = max(valid, key=lambda r: r["msgs_per_s"], default=None)
    return {
        "max_valid_offered_per_s": best["offered_per_s"] if best else None,
        "max_valid_msgs_per_s": best["msgs_per_s"] if best else None,
        "max_msgs_per_s": max((r["msgs_per_s"] for r in runs), default=None),
        "p99_ms_by_rate": {f"{r['offered_per_s']:g}": r["p99_ms"] for r in runs},
        "all_valid": bool(runs) and len(valid) == len(runs),
    }
