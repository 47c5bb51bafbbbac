"""``tidings bench compare``: Tidings side by side with the peers a user would pick
instead, every scenario in one run on one machine, then the tables, the ratios and the
plots.

1. durable 1:1 (``bench direct``): one sweep of offered rates against Tidings, the
   ceiling relay (aiohttp + uvloop, no IM work), Matrix Synapse, and Mosquitto point to
   point at QoS 0 and 1;
2. idle connections, login storm and restart (``bench connections``; Tidings only);
3. a live room at several sizes (``bench room``, and the peers' own room runs): Tidings
   with its tick coalescing (every post delivered: the render budget at the room's
   rate) and with coalescing off, python-socketio's room broadcast, Mosquitto fan-out at
   QoS 0 and 1;
4. a large group (``bench group``; Tidings only).

Each scenario starts its own servers (pinned to the first core, the load generators on
the others) and stops them. The peers come from ``scripts/bench-peers.sh``. Results go
to ``--out`` (JSON of every run, ``compare.json``, ``compare.md``, two PNG plots); with
``--docs FILE`` the section between ``<!-- compare:begin -->`` and
``<!-- compare:end -->`` of that Markdown file is rewritten with the tables and the
plots are written next to it (``img/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from tidings.bench.observe import code_info, machine_info

BEGIN = "<!-- compare:begin -->"
END = "<!-- compare:end -->"
LATENCY_PNG = "bench-latency.png"
ROOM_PNG = "bench-room-cpu.png"
DIRECT_PEERS = ("relay", "synapse", "mqtt-qos0", "mqtt-qos1")
ROOM_SETUPS = ("tidings", "tidings-no-coalescing", "python-socketio", "mqtt-qos0", "mqtt-qos1")
STEP_TIMEOUT_S = 420
BEHIND_P99_MS = 1000.0


class Sizes:
    """What the run loads: the full comparison, or a quick one (tests, a smoke run)."""

    def __init__(self, quick: bool) -> None:
        if quick:
            self.pairs, self.rates = 4, [50.0, 200.0]
            self.direct_duration, self.direct_warmup = 2.0, 0.5
            self.connections, self.hold = 300, 2.0
            self.room_sizes, self.room_rate, self.room_senders = [50, 200], 20.0, 2
            self.room_duration = 2.0
            self.room_tidings_only: list[int] = []
            self.members, self.online, self.group_rate, self.group_duration = 60, 30, 5.0, 2.0
        else:
            self.pairs = 100
            self.rates = [50.0, 100.0, 200.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0]
            self.rates += [30000.0, 40000.0]
            self.direct_duration, self.direct_warmup = 4.0, 1.0
            self.connections, self.hold = 15_000, 10.0
            self.room_sizes, self.room_rate, self.room_senders = [200, 1000, 2000], 200.0, 20
            self.room_duration = 5.0
            self.room_tidings_only = [15_000]  # the peers would owe millions of deliveries
            self.members, self.online, self.group_rate = 10_000, 5_000, 5.0
            self.group_duration = 8.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.split("\n\n", 1)[1] if __doc__ else None
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="bench-results/compare", help="where results go")
    p.add_argument(
        "--docs", metavar="FILE", help="rewrite the compare section of this Markdown file"
    )
    p.add_argument(
        "--only",
        default="direct,connections,room,group",
        help="scenarios to run, a comma list (default: all four)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in a minute")


# ------------------------------------------------------------------ running


def _bench(out: str, name: str, argv: list[str]) -> dict[str, Any] | None:
    """``tidings bench ARGV --json OUT/NAME.json`` in its own process; its figures."""
    path = os.path.join(out, f"{name}.json")
    cmd = [sys.executable, "-m", "tidings", "bench", *argv, "--json", path]
    print(f"$ tidings bench {' '.join(argv)} --json {path}", flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"{name}: over {STEP_TIMEOUT_S}s, stopped", file=sys.stderr, flush=True)
        return None
    print(f"({name}: exit {proc.returncode}, {time.monotonic() - t0:.0f}s)", flush=True)
    try:
        with open(path) as fh:
            data: dict[str, Any] = json.load(fh)
    except (OSError, ValueError):
        return None
    data["exit_code"] = proc.returncode
    return data


def _save(out: str, name: str, data: dict[str, Any]) -> None:
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def run_direct(out: str, z: Sizes) -> dict[str, Any] | None:
    rates = ",".join(f"{r:g}" for r in z.rates)
    argv = ["direct", "--peer", ",".join(DIRECT_PEERS), "--pairs", str(z.pairs)]
    argv += ["--rate", rates, "--duration", f"{z.direct_duration:g}"]
    argv += ["--warmup", f"{z.direct_warmup:g}", "--pause", "0.5", "--grace", "3"]
    return _bench(out, "direct", argv)


def run_connections(out: str, z: Sizes) -> dict[str, Any] | None:
    argv = ["connections", "--connections", str(z.connections), "--hold", f"{z.hold:g}"]
    return _bench(out, "connections", argv)


def run_group(out: str, z: Sizes) -> dict[str, Any] | None:
    argv = ["group", "--members", str(z.members), "--online", str(z.online)]
    argv += ["--rate", f"{z.group_rate:g}", "--duration", f"{z.group_duration:g}"]
    return _bench(out, "group", argv)


def _cores() -> tuple[list[int], list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[:1], cpus[1:]) if len(cpus) >= 2 else ([], [])


def _peer_room(
    out: str, name: str, fn: Callable[..., dict[str, Any]], **kw: Any
) -> dict[str, Any] | None:
    print(f"$ {name}: {kw}", flush=True)
    server_cores, client_cores = _cores()
    try:
        data = fn(server_cores=server_cores, client_cores=client_cores, **kw)
    except (RuntimeError, OSError) as exc:
        print(f"{name}: {exc}", file=sys.stderr, flush=True)
        return None
    _save(out, name, data)
    return data


def run_rooms(out: str, z: Sizes) -> list[dict[str, Any]]:
    """Every room set-up at every size; one row each (``setup``, ``viewers`` and the
    figures every set-up reports)."""
    from tidings.bench import peer_mqtt, peer_socketio

    rows: list[dict[str, Any]] = []
    rate, senders, duration = z.room_rate, z.room_senders, z.room_duration
    common = ["--senders", str(senders), "--rate", f"{rate:g}", "--duration", f"{duration:g}"]
    for v in [*z.room_sizes, *z.room_tidings_only]:
        for setup in ROOM_SETUPS:
            if v in z.room_tidings_only and setup != "tidings":
                continue
            name = f"room-{setup}-{v}"
            data: dict[str, Any] | None
            if setup.startswith("tidings"):
                # A render budget well above the room's rate: a tick that happens to
                # get more posts than rate x tick is not sampled either.
                argv = ["room", "--viewers", str(v), *common, "--render", f"{10 * rate:g}"]
                # Per-user room limits raised as the peers have none (a server that
                # falls behind reads a sender's posts in bursts).
                argv += ["--server-set", "room_chat_per_s=100000"]
                argv += ["--server-set", "room_high_per_s=100000"]
                if setup == "tidings-no-coalescing":
                    argv += ["--server-set", "room_coalesce=false"]
                data = _bench(out, name, argv)
                if data is not None:
                    expected = data.get("posts_sent", 0) * v
                    data["lost"] = max(0, expected - data.get("delivered", 0))
            elif setup == "python-socketio":
                data = _peer_room(
                    out,
                    name,
                    peer_socketio.run_room,
                    viewers=v,
                    senders=senders,
                    rate=rate,
                    duration=duration,
                )
            else:
                data = _peer_room(
                    out,
                    name,
                    peer_mqtt.run_room,
                    viewers=v,
                    senders=senders,
                    rate=rate,
                    duration=duration,
                    qos=int(setup[-1]),
                )
            if data is not None:
                rows.append(_room_row(setup, v, data))
    return rows


def _room_row(setup: str, viewers: int, d: dict[str, Any]) -> dict[str, Any]:
    """One set-up's figures, on the same footing: deliveries per second over the time
    they took to arrive, and the server's CPU until the last one was in (a server that
    fell behind pays for its backlog after the posting period)."""
    us = (
        d.get("server_cpu_us_per_delivery_until_drained")  # Tidings, Mosquitto
        or (
            d["server_cpu_s_through_drain"] * 1e6 / d["deliveries"]  # python-socketio
            if d.get("server_cpu_s_through_drain") and d.get("deliveries")
            else None
        )
        or d.get("server_cpu_us_per_delivery")
    )
    return {
        "setup": setup,
        "viewers": viewers,
        "deliveries_per_s": d.get("deliveries_per_s_over_span") or d.get("deliveries_per_s"),
        "server_cpu_pct": d.get("server_cpu_pct"),
        "deliveries_per_server_cpu_s": round(1e6 / us) if us else None,
        "server_cpu_us_per_delivery": round(us, 3) if us else None,
        # Behind: the peer says so, or posts waited over a second for their viewers.
        "behind": bool(
            d.get("behind") or d.get("drain_capped") or (d.get("p99_ms") or 0) > BEHIND_P99_MS
        ),
        "p50_ms": d.get("p50_ms"),
        "p99_ms": d.get("p99_ms"),
        "lost": d.get("lost"),
        "alive": d.get("viewers_alive", d.get("alive_at_end")),
    }


# ------------------------------------------------------------------ report


def _fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def direct_tables(d: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The sweep per set-up, and the headline: each set-up's most delivered messages/s,
    its highest rate with p99 under the bound, and Tidings' ratio to each peer."""
    setups = d.get("setups", [])
    lines = [
        "| set-up | offered/s | delivered/s | p50 ms | p99 ms | p99.9 ms | server µs/msg "
        "| lost | valid |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    heads: dict[str, Any] = {}
    for s in setups:
        for r in s.get("runs", []):
            lines.append(
                f"| {s['label']} | {_fmt(r['offered_per_s'])} | {_fmt(r['msgs_per_s'])} | "
                f"{_fmt(r['p50_ms'], '.2f')} | {_fmt(r['p99_ms'], '.1f')} | "
                f"{_fmt(r['p999_ms'], '.1f')} | {_fmt(r.get('server_cpu_us_per_msg'), '.1f')} "
                f"| {_fmt(r['lost'])} | {'yes' if r['valid'] else 'no'} |"
            )
        for rate in s.get("skipped_rates", []):
            lines.append(
                f"| {s['label']} | {_fmt(rate)} | skipped: saturated below it | | | | | | |"
            )
        summ = s.get("summary", {})
        heads[s["label"]] = {
            "max_msgs_per_s": summ.get("max_msgs_per_s"),
            "max_rate_p99_under_20ms": summ.get("max_rate_p99_under_bound"),
            "error": s.get("error"),
        }
    t = heads.get("tidings", {}).get("max_msgs_per_s")
    head = [
        "| set-up | most delivered msgs/s | highest rate with p99 < 20 ms | Tidings / it |",
        "|---|---|---|---|",
    ]
    for label, h in heads.items():
        m = h["max_msgs_per_s"]
        ratio = t / m if t and m else None
        h["tidings_ratio"] = None if ratio is None else round(ratio, 2)
        cell = "-" if label == "tidings" or ratio is None else f"{ratio:.2f}x"
        note = f" ({h['error']})" if h.get("error") else ""
        head.append(
            f"| {label}{note} | {_fmt(m)} | {_fmt(h['max_rate_p99_under_20ms'])} | {cell} |"
        )
    return "\n".join(head) + "\n\n" + "\n".join(lines), heads


def room_tables(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    lines = [
        "| viewers | set-up | deliveries/s | server CPU % | deliveries per server CPU-s "
        "| server µs/delivery | p50 ms | p99 ms | undelivered at the end "
        "| Tidings / it (per CPU-s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict[str, Any] = {}
    for v in sorted({r["viewers"] for r in rows}):
        at = [r for r in rows if r["viewers"] == v]
        base = next((r for r in at if r["setup"] == "tidings"), None)
        t = base["deliveries_per_server_cpu_s"] if base else None
        for r in at:
            e = r["deliveries_per_server_cpu_s"]
            ratio = t / e if t and e else None
            if r["setup"] != "tidings" and ratio is not None:
                ratios.setdefault(r["setup"], {})[str(v)] = round(ratio, 2)
            cell = "-" if r["setup"] == "tidings" or ratio is None else f"{ratio:.1f}x"
            label = f"{r['setup']} (fell behind)" if r.get("behind") else r["setup"]
            lines.append(
                f"| {_fmt(v)} | {label} | {_fmt(r['deliveries_per_s'])} | "
                f"{_fmt(r['server_cpu_pct'], '.0f')} | {_fmt(e)} | "
                f"{_fmt(r['server_cpu_us_per_delivery'], '.2f')} | {_fmt(r['p50_ms'], '.1f')} | "
                f"{_fmt(r['p99_ms'], '.1f')} | {_fmt(r['lost'])} | {cell} |"
            )
    # Without coalescing each post is one write per viewer, as with the broker: per
    # delivery against Mosquitto.
    extra = [
        "",
        "| viewers | Tidings without coalescing / Mosquitto QoS 0 (per CPU-s) | / QoS 1 |",
        "|---|---|---|",
    ]
    for v in sorted({r["viewers"] for r in rows}):
        per = {r["setup"]: r["deliveries_per_server_cpu_s"] for r in rows if r["viewers"] == v}
        off = per.get("tidings-no-coalescing")
        cells = []
        for peer in ("mqtt-qos0", "mqtt-qos1"):
            other = per.get(peer)
            ratio = off / other if off and other else None
            if ratio is not None:
                ratios.setdefault(f"tidings-no-coalescing/{peer}", {})[str(v)] = round(ratio, 2)
            cells.append("-" if ratio is None else f"{ratio:.2f}x")
        if off:
            extra.append(f"| {_fmt(v)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines + extra), ratios


def _plots(img_dir: str, direct: dict[str, Any] | None, rooms: list[dict[str, Any]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plots (scripts/bench-peers.sh installs it)", file=sys.stderr)
        return []
    os.makedirs(img_dir, exist_ok=True)
    made = []
    if direct is not None and direct.get("setups"):
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for s in direct["setups"]:
            runs = [r for r in s.get("runs", []) if r.get("p99_ms") is not None]
            if not runs:
                continue
            xs = [r["offered_per_s"] for r in runs]
            p99 = [r["p99_ms"] for r in runs]
            (line,) = ax.plot(xs, p99, marker="o", label=f"{s['label']} p99")
            ax.plot(
                xs,
                [r["p50_ms"] for r in runs],
                linestyle=":",
                marker=".",
                color=line.get_color(),
                label=f"{s['label']} p50",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(20, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("offered load, messages/s (1:1, open loop)")
        ax.set_ylabel("end-to-end latency, ms")
        ax.set_title("Durable 1:1: latency against offered load (same machine, same run)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(img_dir, LATENCY_PNG)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    if rooms:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for setup in ROOM_SETUPS:
            pts = sorted(
                (r["viewers"], r["server_cpu_us_per_delivery"])
                for r in rooms
                if r["setup"] == setup and r["server_cpu_us_per_delivery"]
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=setup)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("viewers in the room")
        ax.set_ylabel("server CPU per delivery, µs")
        ax.set_title("Room fan-out: server CPU per delivered post against room size")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(img_dir, ROOM_PNG)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


def report_markdown(
    res: dict[str, Any], z: Sizes, img_prefix: str, argv: list[str]
) -> tuple[str, dict[str, Any]]:
    m = res["machine"]
    parts = [
        f"Generated by `tidings bench compare {' '.join(argv)}` on {res['date']} "
        f"({res['elapsed_s']:.0f} s in all): {m.get('cpu_model')}, {m.get('nproc')} CPUs; "
        f"every server pinned to core 0, the load generators on the others. Peers: "
        f"{res.get('peers', {})}.",
    ]
    headline: dict[str, Any] = {}
    if res.get("direct"):
        table, heads = direct_tables(res["direct"])
        headline["direct"] = heads
        parts += [
            f"### Durable 1:1 (`bench direct`, {z.pairs} pairs, "
            f"{z.direct_duration:g} s per rate after {z.direct_warmup:g} s)",
            table,
            f"![latency against offered load]({img_prefix}{LATENCY_PNG})",
        ]
    c = res.get("connections")
    if c:
        headline["connections"] = {
            k: c.get(k)
            for k in ("logins_per_s", "login_server_cpu_us", "kb_per_conn", "restart_all_back_s")
        }
        rows = [
            "| logins/s | server µs per login | KB per idle connection (RSS + kernel) "
            "| heartbeat µs per ping | all back and synced after a restart |",
            "|---|---|---|---|---|",
            f"| {_fmt(c.get('logins_per_s'))} | {_fmt(c.get('login_server_cpu_us'), '.0f')} | "
            f"{_fmt(c.get('kb_per_conn'), '.2f')} | "
            f"{_fmt(c.get('heartbeat_cpu_us_per_ping'), '.0f')} | "
            f"{_fmt(c.get('restart_all_back_s'), '.1f')} s |",
        ]
        wait = (c.get("settings") or {}).get("client_wait", "poll")
        clients = "polling" if wait == "poll" else "sleeping in epoll_wait"
        parts += [
            f"### Connections (`bench connections`, {z.connections:,} connections; load "
            f"generators {clients} while logging in: see `bench connections` below)",
            "\n".join(rows),
        ]
    if res.get("rooms"):
        table, ratios = room_tables(res["rooms"])
        headline["room_ratios"] = ratios
        parts += [
            f"### Live room (`bench room`, {z.room_senders} senders, {z.room_rate:g} posts/s, "
            f"{z.room_duration:g} s; every post to every viewer)",
            table,
            f"![server CPU per delivery against room size]({img_prefix}{ROOM_PNG})",
        ]
    g = res.get("group")
    if g:
        headline["group"] = {k: g.get(k) for k in ("p99_ms", "missing_deliveries")}
        rows = [
            "| deliveries/s | server µs/delivery | p50 ms | p99 ms | missing |",
            "|---|---|---|---|---|",
            f"| {_fmt(g.get('deliveries_per_s'))} | "
            f"{_fmt(g.get('server_cpu_us_per_delivery'), '.1f')} | {_fmt(g.get('p50_ms'), '.1f')}"
            f" | {_fmt(g.get('p99_ms'), '.1f')} | {_fmt(g.get('missing_deliveries'))} |",
        ]
        parts += [
            f"### Group (`bench group`, {z.members:,} members, {z.online:,} online, "
            f"{z.group_rate:g} msgs/s)",
            "\n".join(rows),
        ]
    return "\n\n".join(parts) + "\n", headline


def write_docs(path: str, section: str) -> None:
    with open(path) as fh:
        text = fh.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"--docs: {path} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as fh:
        fh.write(f"{head}{BEGIN}\n{section}{END}{tail}")


def _peer_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    from tidings.bench.peers import mosquitto_bin, peer_python

    probes = {
        "synapse": "import synapse; print(synapse.__version__)",
        "python-socketio": "import importlib.metadata as m; print(m.version('python-socketio'))",
    }
    for name, code in probes.items():
        try:
            py = peer_python("synapse" if name == "synapse" else "socketio")
            out[name] = subprocess.run(
                [py, "-c", code], capture_output=True, text=True, timeout=60
            ).stdout.strip()
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            out[name] = "not installed"
    try:
        first = subprocess.run(
            [mosquitto_bin(), "-h"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        out["mosquitto"] = first[0].split("version", 1)[-1].strip() if first else "?"
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        out["mosquitto"] = "not installed"
    return out


def main(args: argparse.Namespace) -> int:
    z = Sizes(args.quick)
    only = {s.strip() for s in str(args.only).split(",") if s.strip()}
    if not only or only - {"direct", "connections", "room", "group"}:
        raise SystemExit("--only: a comma list of direct, connections, room, group")
    out = args.out
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    res: dict[str, Any] = {
        "bench": "compare",
        "machine": machine_info(),
        "code": code_info(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "peers": _peer_versions(),
        "quick": bool(args.quick),
    }
    if "direct" in only:
        res["direct"] = run_direct(out, z)
    if "connections" in only:
        res["connections"] = run_connections(out, z)
    if "room" in only:
        res["rooms"] = run_rooms(out, z)
    if "group" in only:
        res["group"] = run_group(out, z)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    argv = [a for a in sys.argv[3:]] if sys.argv[1:3] == ["bench", "compare"] else []
    img_dir = os.path.join(os.path.dirname(args.docs), "img") if args.docs else out
    made = _plots(img_dir, res.get("direct"), res.get("rooms") or [])
    prefix = "img/" if args.docs else ""
    section, headline = report_markdown(res, z, prefix, argv)
    res["headline"] = headline
    res["plots"] = made
    _save(out, "compare", res)
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write(section)
    if args.docs:
        write_docs(args.docs, section)
    if args.docs and made and img_dir != out:
        for p in made:
            shutil.copy(p, os.path.join(out, os.path.basename(p)))
    print(section, flush=True)
    print(f"compare: {res['elapsed_s']:.0f} s; results in {out}", flush=True)
    ok = all(res.get(k) is not None for k in ("direct", "connections", "group") if k in only)
    return 0 if ok else 1
