"""``tidings bench connections``: how many authenticated idle connections a server holds
and what they cost, how fast they log in, and how long they take to be back after a
restart.

The bench starts its own server (pinned to the first core; load generators on the
others), creates the users and their tokens, then:

1. **login storm**: every load-generator process connects its share of the connections
   (WebSocket upgrade + `hello` until `ready`, ``--window`` in flight per process) as
   fast as the server answers: authenticated connects per second, and the server's CPU
   per login. With ``--client-wait poll`` (the default) the load generators poll their
   sockets without sleeping while logins are in flight: on loopback the kernel delivers
   a packet inside the sender's `write`, and waking a client process asleep in
   `epoll_wait` on another core is then charged to the server's send (about 40 us per
   login on a VM). ``--client-wait sleep`` measures with sleeping clients;
2. **idle hold**: all connections stay open for ``--hold`` seconds, each sending a
   `ping` once per ``--heartbeat`` seconds: the server's memory per connection (RSS
   growth since before the storm, and the kernel's TCP memory from
   `/proc/net/sockstat`, both divided by the count) and the heartbeat CPU;
3. **restart** (unless ``--no-restart``): SIGTERM (the server drains and closes every
   connection), the same server started again on the same port and data; the time
   until every client is back, logged in and synced.

Compression is off (the server never negotiates it). Only 127.0.0.1 is loaded; at most
``MAX_CONNECTIONS`` (the server is one process and the open-file limit is 20,000).
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
from typing import Any

from tidings.bench import connload
from tidings.bench.local import LOOPBACK, LocalServer, create_users
from tidings.bench.observe import code_info, machine_info, proc_cpu_s

MAX_CONNECTIONS = 18_000
MAX_PROCS = 8
MAX_HOLD_S = 300.0
PHASE_TIMEOUT_S = 180.0
SERVER_SETTINGS = {
    "rate_per_s": "1000",
    "rate_burst": "1000",
    "log_level": "WARNING",
    "backlog": "4096",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--connections", type=int, default=5_000, help="connections (5000)")
    p.add_argument("--procs", type=int, help="load-generator processes (default: client cores)")
    p.add_argument("--window", type=int, default=256, help="logins in flight per process")
    p.add_argument("--hold", type=float, default=10.0, help="seconds of idle hold (10)")
    p.add_argument("--heartbeat", type=float, default=25.0, help="ping interval, s (25)")
    p.add_argument(
        "--client-wait",
        choices=("poll", "sleep"),
        default="poll",
        help="load generators poll without sleeping while logins are in flight (poll), "
        "or sleep in epoll_wait (sleep)",
    )
    p.add_argument("--no-restart", action="store_true", help="skip the restart phase")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and clients")
    p.add_argument("--server-set", action="append", metavar="KEY=VALUE", default=[])
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the results here")


def _bounded(name: str, value: Any, lo: Any, hi: Any) -> Any:
    if not lo <= value <= hi:
        raise SystemExit(f"{name}: must be in [{lo}, {hi}]")
    return value


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _tcp_mem_kb() -> int:
    """The kernel's memory for all TCP sockets (pages in /proc/net/sockstat), in KB."""
    with open("/proc/net/sockstat") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                parts = line.split()
                return int(parts[parts.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    return 0


def _cpu(pid: int) -> float:
    t = proc_cpu_s(pid)
    return 0.0 if t is None else t[0] + t[1]


def main(args: argparse.Namespace) -> int:
    n = _bounded("--connections", args.connections, 1, MAX_CONNECTIONS)
    hold = _bounded("--hold", args.hold, 1.0, MAX_HOLD_S)
    heartbeat = _bounded("--heartbeat", args.heartbeat, 0.5, 300.0)
    window = _bounded("--window", args.window, 1, 5_000)
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    server_cores, client_cores = (cpus[:1], cpus[1:]) if pin else ([], [])
    procs = _bounded("--procs", args.procs or max(1, len(client_cores) or 1), 1, MAX_PROCS)
    procs = min(procs, n)
    settings = dict(SERVER_SETTINGS)
    for item in args.server_set:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise SystemExit(f"--server-set expects KEY=VALUE, got {item!r}")
        settings[key.strip().replace("-", "_")] = value.strip()
    report: dict[str, Any] = {
        "bench": "connections",
        "settings": {
            "connections": n,
            "procs": procs,
            "window": window,
            "client_wait": args.client_wait,
            "hold_s": hold,
            "heartbeat_s": heartbeat,
            "pinned": pin,
            "server_cores": server_cores,
            "client_cores": client_cores,
            "server": settings,
        },
        "machine": machine_info(),
        "code": code_info(),
    }
    server = LocalServer(settings, server_cores)
    workers: list[tuple[Any, Any]] = []
    try:
        server.start()
        print(f"server: pid {server.pid} on {server.url}, cores {server_cores or 'any'}")
        nonce = secrets.token_hex(3)
        uids = [f"conn-{nonce}-{i}" for i in range(n)]
        t = time.monotonic()
        tokens = asyncio.run(create_users(server.url, server.admin_key(), uids, "bench"))
        print(f"{n} users and tokens made in {time.monotonic() - t:.1f} s", flush=True)
        ctx = multiprocessing.get_context("spawn")
        for k in range(procs):
            mine = [tokens[u] for u in uids[k::procs]]
            cfg = {
                "host": LOOPBACK,
                "port": server.port,
                "tokens": mine,
                "window": window,
                "wait": args.client_wait,
                "cores": client_cores,
            }
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=connload.main, args=(child, cfg), daemon=True)
            proc.start()
            workers.append((proc, parent))
        for _, pipe in workers:
            _expect(pipe, "ready")
        report.update(_phases(server, workers, n, hold, heartbeat, not args.no_restart))
    finally:
        for proc, pipe in workers:
            try:
                pipe.send(("stop", None))
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        code = server.stop()
        report["server_exit_code"] = code
        if args.json_path:
            with open(args.json_path, "w") as fh:
                json.dump(report, fh, indent=2)
                fh.write("\n")
    _print(report)
    ok = report.get("failed", 1) == 0 and report.get("back_failed", 0) == 0
    return 0 if ok else 1


def _expect(pipe: Any, what: str) -> Any:
    if not pipe.poll(PHASE_TIMEOUT_S + 30):
        raise RuntimeError(f"a load generator gave no {what!r} in time")
    kind, value = pipe.recv()
    if kind != what:
        raise RuntimeError(f"a load generator said {kind!r}, not {what!r}")
    return value


def _phases(
    server: LocalServer,
    workers: list[tuple[Any, Any]],
    n: int,
    hold: float,
    heartbeat: float,
    restart: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    time.sleep(1.0)  # settle after the users were made
    rss0, tcp0 = _rss_kb(server.pid), _tcp_mem_kb()
    cpu0 = _cpu(server.pid)
    at = time.monotonic() + 0.5
    for _, pipe in workers:
        pipe.send(("storm", {"at": at, "timeout_s": PHASE_TIMEOUT_S}))
    storms = [_expect(pipe, "stormed") for _, pipe in workers]
    cpu1 = _cpu(server.pid)
    ready = sum(s["ready"] for s in storms)
    took = max(s["last"] for s in storms) - at
    out["ready"] = ready
    out["failed"] = n - ready
    out["why"] = [w for s in storms for w in s["why"]][:5]
    out["storm_s"] = round(took, 3)
    out["logins_per_s"] = round(ready / took, 1) if took > 0 else None
    out["login_server_cpu_us"] = round((cpu1 - cpu0) * 1e6 / ready, 1) if ready else None
    out["login_client_cpu_s"] = [round(s["cpu_s"], 2) for s in storms]
    time.sleep(1.0)
    rss1, tcp1 = _rss_kb(server.pid), _tcp_mem_kb()
    out["server_rss_kb_before"], out["server_rss_kb_after"] = rss0, rss1
    out["rss_kb_per_conn"] = round((rss1 - rss0) / ready, 2) if ready else None
    # Both ends of every loopback connection are on this machine: this is an upper
    # bound of the server side's share.
    out["tcp_mem_kb_per_conn"] = round(max(0, tcp1 - tcp0) / ready, 2) if ready else None
    if out["rss_kb_per_conn"] is not None:
        out["kb_per_conn"] = round(out["rss_kb_per_conn"] + out["tcp_mem_kb_per_conn"], 2)
    cpu2 = _cpu(server.pid)
    for _, pipe in workers:
        pipe.send(("hold", {"seconds": hold, "heartbeat_s": heartbeat}))
    held = [_expect(pipe, "held") for _, pipe in workers]
    cpu3 = _cpu(server.pid)
    pings = sum(h["pings"] for h in held)
    out["hold_pings"] = pings
    out["hold_pongs"] = sum(h["pongs"] for h in held)
    out["hold_still_up"] = sum(h["still_up"] for h in held)
    window_s = hold + 1.0  # the hold plus the wait for its last pongs
    out["heartbeat_cpu_pct"] = round(100 * (cpu3 - cpu2) / window_s, 2)
    out["heartbeat_cpu_us_per_ping"] = round((cpu3 - cpu2) * 1e6 / pings, 1) if pings else None
    out["server_rss_kb_after_hold"] = _rss_kb(server.pid)
    if restart:
        for _, pipe in workers:
            pipe.send(("restart", {"timeout_s": PHASE_TIMEOUT_S}))
        t_stop = time.monotonic()
        out["restart_old_exit_code"] = server.restart()
        out["restart_server_up_s"] = round(time.monotonic() - t_stop, 3)
        backs = [_expect(pipe, "back") for _, pipe in workers]
        out["back"] = sum(b["ready"] for b in backs)
        out["back_failed"] = n - out["back"]
        out["saw_close"] = sum(b["saw_close"] for b in backs)
        out["restart_all_back_s"] = round(max(b["last"] for b in backs) - t_stop, 3)
        out["back_why"] = [w for b in backs for w in b["why"]][:5]
    return out


def _print(r: dict[str, Any]) -> None:
    s = r["settings"]
    print(
        f"{s['connections']} connections from {s['procs']} process(es), window "
        f"{s['window']} each, clients {s['client_wait']}; hold {s['hold_s']:g} s with a ping "
        f"every {s['heartbeat_s']:g} s"
    )
    rows = [
        ("logged in", f"{r.get('ready')} ({r.get('failed')} failed) {r.get('why') or ''}"),
        ("login storm", f"{r.get('logins_per_s')}/s ({r.get('storm_s')} s)"),
        ("server CPU per login", f"{r.get('login_server_cpu_us')} us"),
        ("server RSS per connection", f"{r.get('rss_kb_per_conn')} KB"),
        ("kernel TCP memory per connection", f"{r.get('tcp_mem_kb_per_conn')} KB (both ends)"),
        ("per connection in all", f"{r.get('kb_per_conn')} KB"),
        ("heartbeat CPU", f"{r.get('heartbeat_cpu_pct')} % of a core"),
        ("per ping", f"{r.get('heartbeat_cpu_us_per_ping')} us"),
        ("pongs / pings", f"{r.get('hold_pongs')} / {r.get('hold_pings')}"),
    ]
    if "restart_all_back_s" in r:
        rows += [
            ("restart: server up again after", f"{r['restart_server_up_s']} s"),
            (
                "restart: all back and synced after",
                f"{r['restart_all_back_s']} s ({r['back']} back, {r['back_failed']} not)",
            ),
        ]
    for name, value in rows:
        print(f"{name:>36}  {value}")
    sys.stdout.flush()
