"""``tidings bench room`` and ``tidings bench group``: fan-out to many connections.

room:  V viewers in one live room, S senders posting R posts/s in all (a share of them
       gifts, the high lane), for D seconds. Reported: deliveries/s (posts written to
       viewers, counted by the viewers), server CPU per delivery (the server process's
       own CPU time over the sending period), delivery delay p50/p99 (a sample of
       viewers time every post), and high-priority posts lost by viewers connected for
       the whole run (must be 0). With ``--flash`` the viewers join while the posts
       already flow (a flash crowd): join rate and server memory per viewer instead.
group: a group of M members built through the bulk API, O of them online (each
       acknowledges its pushes), S senders posting R messages/s in all: deliveries/s,
       server CPU per delivery, delay p50/p99, and messages an online member missed.

The bench starts its own server (pinned to the first core, the load generators to the
others), spreads connections over processes (at most ``PER_PROC`` each: the open-file
limit is 20,000 per process; each process connects from its own 127.0.0.x address), and
stops the server at the end. It prints a table and, with ``--json``, writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shlex
import subprocess
import sys
import time
from typing import Any

import aiohttp

from tidings.bench.direct import bounded
from tidings.bench.fanload import join_figures, senders_main, viewers_main
from tidings.bench.hist import Histogram
from tidings.bench.local import LOOPBACK, LocalServer, create_users
from tidings.bench.observe import code_info, machine_info, proc_cpu_s
from tidings.bench.procs import Worker, recv_from, rss_kb, spawn, stop_workers

PER_PROC = 15_000
MAX_CONNECTIONS = 200_000
MAX_SENDERS = 1_000
MAX_RATE = 100_000.0
MAX_DURATION_S = 300.0
READY_TIMEOUT_S = 600.0
DRAIN_S = 1.5
SERVER_SETTINGS = {
    "rate_per_s": "100000",
    "rate_burst": "100000",
    "max_inflight": "65536",
    "max_unacked": "65536",
    "heartbeat_ms": "600000",
    "idle_timeout_ms": "1800000",
    "log_level": "WARNING",
}


def _common(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--senders", type=int, default=20, help="posting connections (default 20)")
    p.add_argument("--rate", type=float, default=200.0, help="posts/s in all (default 200)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of posting (10)")
    p.add_argument("--procs", type=int, help="viewer processes (default: enough for the count)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the results here")
    p.add_argument(
        "--server-set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="extra setting for the started server (repeatable)",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin server and clients to cores")
    p.add_argument(
        "--netns",
        action="store_true",
        help="run in a private network namespace whose loopback steers received packets "
        "(RPS) to the load generators' cores, as a real network puts the clients' "
        "receive work on the clients (root; needs unshare, ip, mount)",
    )


def add_room_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--sample", type=int, default=200, help="viewers that time every post")
    p.add_argument("--viewers", type=int, default=2_000, help="viewers in the room (2000)")
    p.add_argument("--high-share", type=float, default=0.1, help="share of gifts (0.1)")
    p.add_argument("--tick-ms", type=int, default=100, help="the server's room tick (100)")
    p.add_argument("--render", type=float, default=50.0, help="posts/s a viewer gets (50)")
    p.add_argument("--flash", action="store_true", help="viewers join while posts flow")


def add_group_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--sample", type=int, default=200, help="members that time every message")
    p.set_defaults(senders=1, rate=5.0)
    p.add_argument("--members", type=int, default=10_000, help="group members (10000)")
    p.add_argument("--online", type=int, default=5_000, help="members connected (5000)")


class Plan:
    def __init__(self, args: argparse.Namespace, scenario: str) -> None:
        self.scenario = scenario
        self.senders = bounded("--senders", args.senders, 1, MAX_SENDERS)
        self.rate = bounded("--rate", args.rate, 0.1, MAX_RATE)
        self.duration = bounded("--duration", args.duration, 1.0, MAX_DURATION_S)
        if self.rate * self.duration > 2_000_000:
            raise SystemExit("--rate x --duration: at most 2,000,000 posts")
        if scenario == "room":
            self.viewers = bounded("--viewers", args.viewers, 1, MAX_CONNECTIONS)
            self.high_every = max(1, round(1 / bounded("--high-share", args.high_share, 0.01, 1)))
            self.tick_ms = bounded("--tick-ms", args.tick_ms, 1, 100)
            self.render = bounded("--render", args.render, 1.0, 1e6)
            self.sample = min(bounded("--sample", args.sample, 0, MAX_CONNECTIONS), self.viewers)
            self.flash: bool = args.flash
            self.members = self.viewers
            connections = self.viewers
        else:
            self.members = bounded("--members", args.members, 2, 1_000_000)
            self.online = bounded("--online", args.online, 1, self.members - 1)
            connections = self.online
            self.sample = min(bounded("--sample", args.sample, 0, MAX_CONNECTIONS), self.online)
            if self.senders + self.online > self.members:
                raise SystemExit("--senders + --online must not exceed --members")
        cpus = sorted(os.sched_getaffinity(0))
        self.pin = not args.no_pin and len(cpus) >= 2
        self.server_cores = cpus[:1] if self.pin else []
        self.client_cores = cpus[1:] if self.pin else []
        need = math.ceil(connections / PER_PROC)
        self.procs = bounded("--procs", args.procs or need, need, 64)
        self.connections = connections
        self.json_path: str | None = args.json_path
        self.server_settings = dict(SERVER_SETTINGS)
        if scenario == "room":
            self.server_settings.update(
                room_tick_ms=str(self.tick_ms),
                room_render_per_s=str(self.render),
                room_ring_size="0",
            )
        else:
            self.server_settings["group_max_members"] = str(max(self.members, 100_000))
        for item in args.server_set:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise SystemExit(f"--server-set expects KEY=VALUE, got {item!r}")
            self.server_settings[key.strip().replace("-", "_")] = value.strip()

    def describe(self) -> dict[str, Any]:
        out = {
            "scenario": self.scenario,
            "senders": self.senders,
            "rate": self.rate,
            "duration_s": self.duration,
            "procs": self.procs,
            "pinned": self.pin,
            "server_cores": self.server_cores,
            "client_cores": self.client_cores,
        }
        if self.scenario == "room":
            out.update(
                viewers=self.viewers,
                high_share=1 / self.high_every,
                tick_ms=self.tick_ms,
                render_per_s=self.render,
                sampled_viewers=self.sample,
                flash=self.flash,
            )
        else:
            out.update(members=self.members, online=self.online)
        return out


# ------------------------------------------------------------------ set-up


async def _admin(base: str, key: str, method: str, path: str, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.request(method, base + path, json=body) as resp,
    ):
        if resp.status not in (200, 201):
            raise RuntimeError(f"{method} {path}: {resp.status} {await resp.text()}")
        return await resp.json()


async def _make_group(base: str, key: str, owner: str, members: list[str], gid: str) -> str:
    made = await _admin(base, key, "POST", "/v1/groups", {"owner": owner, "id": gid})
    for i in range(0, len(members), 10_000):
        part = {"users": members[i : i + 10_000], "key": f"{gid}-{i}"}
        await _admin(base, key, "POST", f"/v1/groups/{gid}/members", part)
    return str(made["info"]["conv"])


def _users(plan: Plan, server: LocalServer, nonce: str) -> tuple[list[str], list[str], str]:
    """Tokens of the viewers/online members and of the senders, and the room or group."""
    base, key = server.url, server.admin_key()
    viewers = [f"b{nonce}v{i}" for i in range(plan.connections)]
    senders = [f"b{nonce}s{i}" for i in range(plan.senders)]
    tokens = asyncio.run(create_users(base, key, viewers + senders, "bench"))
    target = f"r:bench-{nonce}"
    if plan.scenario == "group":
        offline = [f"b{nonce}m{i}" for i in range(plan.members - plan.connections - plan.senders)]
        asyncio.run(create_users(base, key, offline, None))
        members = viewers + senders[1:] + offline
        target = asyncio.run(_make_group(base, key, senders[0], members, f"bench-{nonce}"))
    return [tokens[u] for u in viewers], [tokens[u] for u in senders], target


def _viewer_cfgs(plan: Plan, tokens: list[str], port: int, target: str) -> list[dict[str, Any]]:
    cfgs = []
    per = math.ceil(len(tokens) / plan.procs)
    room = plan.scenario == "room"
    sample_every = max(1, plan.connections // plan.sample) if plan.sample else 1
    # A fresh source block per run: the last run's connections may linger in TIME_WAIT.
    block = (secrets.randbelow(250) + 1, secrets.randbelow(256))
    for i in range(plan.procs):
        part = tokens[i * per : (i + 1) * per]
        if not part:
            break
        cores = [plan.client_cores[i % len(plan.client_cores)]] if plan.client_cores else []
        cfgs.append(
            {
                "host": LOOPBACK,
                "port": port,
                "source": f"127.{block[0]}.{block[1]}.{2 + i}",
                "tokens": part,
                "room": target if room else None,
                "sample_every": sample_every,
                "bulk_interval_s": 0.5,
                "cores": cores,
            }
        )
    if not plan.sample:
        for c in cfgs:
            c["sample_every"] = 10**9
    return cfgs


# ------------------------------------------------------------------ the run


def run(plan: Plan) -> dict[str, Any]:
    report: dict[str, Any] = {"bench": plan.scenario, "settings": plan.describe()}
    report["settings"]["netns_rps_cpus"] = os.environ.get(NETNS_ENV)
    report["machine"] = machine_info()
    report["code"] = code_info()
    server = LocalServer(plan.server_settings, plan.server_cores)
    server.start()
    workers: list[Worker] = []
    try:
        print(f"server: pid {server.pid} on {server.url}, cores {plan.server_cores or 'any'}")
        if plan.client_cores:
            os.sched_setaffinity(0, set(plan.client_cores))
        nonce = secrets.token_hex(3)
        t_setup = time.monotonic()
        viewer_tokens, sender_tokens, target = _users(plan, server, nonce)
        report["setup_users_s"] = round(time.monotonic() - t_setup, 1)
        cores = plan.client_cores[-1:] if plan.client_cores else []
        scfg = {
            "host": LOOPBACK,
            "port": server.port,
            "tokens": sender_tokens,
            "room": target if plan.scenario == "room" else None,
            "conv": target,
            "rate": plan.rate,
            "duration": plan.duration,
            "high_every": getattr(plan, "high_every", 10),
            "nonce": nonce,
            "drain_s": DRAIN_S,
            "cores": cores,
        }
        senders = spawn(senders_main, scfg)
        workers.append(senders)
        recv_from(senders[1], time.monotonic() + READY_TIMEOUT_S, "ready")
        flash = plan.scenario == "room" and plan.flash
        rss_before = rss_kb(server.pid)
        cfgs = _viewer_cfgs(plan, viewer_tokens, server.port, target)
        start_wall = time.time() + (0.5 if flash else 0.0)
        if flash:  # the posts flow first, the crowd arrives into them
            senders[1].send(("go", start_wall))
        t_join = time.monotonic()
        viewers = [spawn(viewers_main, c) for c in cfgs]
        workers += viewers
        ready = [recv_from(c, time.monotonic() + READY_TIMEOUT_S, "ready") for _, c in viewers]
        join_s = time.monotonic() - t_join
        rss_joined = rss_kb(server.pid)
        if not flash:
            start_wall = time.time() + 0.5
            senders[1].send(("go", start_wall))
        end_wall = start_wall + plan.duration + DRAIN_S
        for _, c in viewers:
            c.send(("go", end_wall))
        time.sleep(max(0.0, start_wall - time.time()))
        cpu0 = proc_cpu_s(server.pid)
        time.sleep(max(0.0, start_wall + plan.duration + 0.5 - time.time()))
        cpu1 = proc_cpu_s(server.pid)
        rss_end = rss_kb(server.pid)
        results = [recv_from(c, time.monotonic() + 120, "result") for _, c in viewers]
        cpu2 = proc_cpu_s(server.pid)  # once the viewers have all that was on its way
        sent = recv_from(senders[1], time.monotonic() + 120, "result")
    finally:
        stop_workers(workers, kill=False)
        code = server.stop()
    report["server_exit_code"] = code
    report.update(join_figures(ready, join_s, (rss_before, rss_joined, rss_end)))
    _figures(plan, report, results, sent, cpu0, cpu1, flash)
    if cpu0 and cpu2 and report["delivered"]:
        # A server that fell behind pays for its backlog after the posting period: this
        # counts that too (and the idle end of the viewers' drain, next to nothing).
        drained = sum(cpu2) - sum(cpu0)
        report["server_cpu_s_until_drained"] = round(drained, 3)
        report["server_cpu_us_per_delivery_until_drained"] = round(
            drained * 1e6 / report["delivered"], 3
        )
    return report


def _figures(
    plan: Plan,
    report: dict[str, Any],
    results: list[dict[str, Any]],
    sent: dict[str, int],
    cpu0: tuple[float, float] | None,
    cpu1: tuple[float, float] | None,
    flash: bool,
) -> None:
    hist, khist, queued, wire = Histogram(), Histogram(), Histogram(), Histogram()
    for r in results:
        hist.merge(Histogram.from_dict(r["hist"]))
        khist.merge(Histogram.from_dict(r["kernel_hist"]))
        queued.merge(Histogram.from_dict(r["queued_hist"]))
        wire.merge(Histogram.from_dict(r["wire_hist"]))
    if queued.count and wire.count:
        # Rooms: the delay split at the tick (server clock = client clock on one box).
        report["queued_p50_ms"] = round(queued.percentile(50) / 1000, 1)
        report["queued_p99_ms"] = round(queued.percentile(99) / 1000, 1)
        report["tick_to_arrival_p50_ms"] = round(wire.percentile(50) / 1000, 1)
        report["tick_to_arrival_p99_ms"] = round(wire.percentile(99) / 1000, 1)
    delivered = sum(r["delivered"] for r in results)
    cpu = sum(cpu1) - sum(cpu0) if cpu0 and cpu1 else None
    report.update(
        posts_sent=sent["sent"],
        sender_errors=sent["errors"],
        delivered=delivered,
        deliveries_per_s=round(delivered / plan.duration, 1),
        server_cpu_s=None if cpu is None else round(cpu, 3),
        server_cpu_pct=None if cpu is None else round(100 * cpu / (plan.duration + 0.5), 1),
        deliveries_per_server_cpu_s=round(delivered / cpu) if cpu else None,
        server_cpu_us_per_delivery=round(cpu * 1e6 / delivered, 3) if cpu and delivered else None,
        p50_ms=round(hist.percentile(50) / 1000, 1) if hist.count else None,
        p99_ms=round(hist.percentile(99) / 1000, 1) if hist.count else None,
        max_ms=round(hist.percentile(100) / 1000, 1) if hist.count else None,
        timed_deliveries=hist.count,
        # The same delays taken at the kernel's arrival of the data on the client side:
        # without the load generator's own scheduling delays.
        kernel_p50_ms=round(khist.percentile(50) / 1000, 1) if khist.count else None,
        kernel_p99_ms=round(khist.percentile(99) / 1000, 1) if khist.count else None,
        viewer_cpu_s=round(sum(r["cpu_s"] for r in results), 2),
        alive_at_end=sum(r["alive"] for r in results),
    )
    frames = sum(r["timed_frames"] for r in results)
    timed = sum(r["timed_viewers"] for r in results)
    if frames and timed:
        report["frames_per_viewer_per_s"] = round(frames / timed / plan.duration, 2)
        report["posts_per_frame"] = round(sum(r["timed_delivered"] for r in results) / frames, 2)
        report["sampled_away_per_frame"] = round(
            sum(r["timed_dropped"] for r in results) / frames, 2
        )
    if plan.scenario == "room":
        whole = [h for r in results for h in r["high_per_viewer"]]
        report["high_priority_sent"] = sent["high"]
        # Posts reach a viewer only while it is in the room: with --flash nobody was in
        # it for the whole run, so nobody counts.
        report["lost_high_priority"] = (
            None if flash else sum(max(0, sent["high"] - h) for h in whole)
        )
        report["viewers_counted_for_loss"] = 0 if flash else len(whole)
    else:
        got = [n for r in results for n in r["received_per_member"]]
        stored = sent["answers"]
        report.update(
            messages_stored=stored,
            members_counted=len(got),
            missing_deliveries=sum(max(0, stored - n) for n in got),
            lost_high_priority=sum(max(0, stored - n) for n in got),
        )


def _print(report: dict[str, Any]) -> None:
    s = report["settings"]
    who = (
        f"{s['viewers']} viewers"
        if s["scenario"] == "room"
        else f"{s['members']} members, {s['online']} online"
    )
    print(
        f"{s['scenario']}: {who}, {s['senders']} senders, {s['rate']:g} posts/s for "
        f"{s['duration_s']:g}s; connected {report['connected']} in {report['join_s']}s"
    )
    cols = [
        ("deliveries/s", "deliveries_per_s"),
        ("server CPU %", "server_cpu_pct"),
        ("deliveries/CPU-s", "deliveries_per_server_cpu_s"),
        ("us CPU/delivery", "server_cpu_us_per_delivery"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("kernel p99 ms", "kernel_p99_ms"),
        ("lost high", "lost_high_priority"),
        ("alive", "alive_at_end"),
    ]
    print(" | ".join(f"{h:>16}" for h, _ in cols))
    print(" | ".join(f"{report.get(k)!s:>16}" for _, k in cols))
    if report.get("server_kb_per_connection") is not None:
        print(f"server memory per connection: {report['server_kb_per_connection']} KB (RSS)")


NETNS_ENV = "TIDINGS_BENCH_NETNS"


def _in_netns(plan: Plan) -> int:
    """Run this same bench again inside a new network and mount namespace (nothing of
    the host's network changes): loopback up, its receive processing steered to the
    load generators' cores."""
    mask = sum(1 << c for c in plan.client_cores) or 1
    argv = [a for a in sys.argv[1:] if a != "--netns"]
    inner = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tidings", *argv])
    script = (
        "set -e; mount --make-rprivate /; mount -t sysfs sysfs /sys; ip link set lo up; "
        f"echo {mask:x} > /sys/class/net/lo/queues/rx-0/rps_cpus; exec {inner}"
    )
    env = dict(os.environ, **{NETNS_ENV: f"{mask:x}"})
    try:
        return subprocess.run(
            ["unshare", "--net", "--mount", "sh", "-c", script], env=env
        ).returncode
    except OSError as exc:
        print(f"tidings bench: --netns needs unshare: {exc}", file=sys.stderr)
        return 2


def main(args: argparse.Namespace, scenario: str) -> int:
    plan = Plan(args, scenario)
    if args.netns and not os.environ.get(NETNS_ENV):
        return _in_netns(plan)
    try:
        report = run(plan)
    except (RuntimeError, OSError, aiohttp.ClientError) as exc:
        print(f"tidings bench {scenario}: {exc}", file=sys.stderr)
        return 2
    _print(report)
    if plan.json_path:
        with open(plan.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    ok = report["server_exit_code"] in (0, None) and report["lost_high_priority"] in (0, None)
    return 0 if ok and report["delivered"] else 1
