"""``tidings bench sync``: how long a device takes to be fully synced after being away.

A user with ``--conversations`` 1:1 conversations (each with ``--history`` entries the
device already holds) misses ``--missed`` messages from those peers while offline, then
reconnects through the Python SDK. The clock runs from ``connect()`` until the device
holds the conversation list, every unread count and the latest page (at least
``--page`` entries, contiguous up to the newest) of every conversation; the result is
checked against what was sent. The same return is measured ``--repeat`` times from the
same starting point (the device's saved state); ``sync_ms`` is the median.

Also measured: a brand-new device of the same user (``tail`` = ``--page``), which gets
the conversation list and the latest page of each conversation.

The server runs in its own process pinned to ``--server-cores``; this process (the
client) pins itself to ``--client-cores``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import secrets
import statistics
import sys
import time
from typing import Any

import aiohttp

from tidings.bench.local import ADMIN_CONCURRENCY, LocalServer, create_users
from tidings.bench.observe import code_info, machine_info, server_cpu_s, snapshot
from tidings.client import Client

TARGET_MS = 500.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--missed", type=int, default=10_000, help="messages missed in total")
    p.add_argument("--history", type=int, default=20, help="entries held per conversation")
    p.add_argument("--page", type=int, default=20, help="the latest page a device must hold")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--sync-limit", type=int, default=500, help="entries asked per sync answer")
    p.add_argument("--codec", choices=("json", "msgpack"), default="msgpack")
    p.add_argument("--server-cores", default="0", help="e.g. 0 or 0,1 (empty: any)")
    p.add_argument("--client-cores", default="1", help="e.g. 1 (empty: any)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the results here")


def _cores(spec: str) -> list[int]:
    ncpu = os.cpu_count() or 1
    return [int(c) % ncpu for c in spec.split(",") if c.strip()]


def main(args: argparse.Namespace) -> int:
    for name in ("conversations", "missed", "history", "page", "repeat", "sync_limit"):
        value = getattr(args, name)
        if not 1 <= value <= 1_000_000:
            print(f"tidings bench sync: --{name.replace('_', '-')} out of range", file=sys.stderr)
            return 2
    server = LocalServer(
        {"rate_per_s": "1000000", "rate_burst": "1000000"},
        _cores(args.server_cores),
    )
    report: dict[str, Any] = {
        "bench": "sync",
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "machine": machine_info(),
        "code": code_info(),
    }
    try:
        server.start()
        if args.client_cores:
            os.sched_setaffinity(0, set(_cores(args.client_cores)))
        report.update(asyncio.run(_run(args, server)))
    except (RuntimeError, OSError, aiohttp.ClientError, AssertionError) as exc:
        print(f"tidings bench sync: {exc}", file=sys.stderr)
        report["error"] = str(exc)
        return 2
    finally:
        report["server_exit_code"] = server.stop()
        if args.json_path:
            with open(args.json_path, "w") as fh:
                json.dump(report, fh, indent=2)
                fh.write("\n")
    return 0 if report.get("sync_ms", float("inf")) < TARGET_MS else 1


async def _run(args: argparse.Namespace, server: LocalServer) -> dict[str, Any]:
    nonce = secrets.token_hex(3)
    user = f"sync-{nonce}"
    peers = [f"sync-{nonce}-p{i}" for i in range(args.conversations)]
    admin = server.admin_key()
    t0 = time.monotonic()
    await create_users(server.url, admin, peers, None)
    url = f"ws://127.0.0.1:{server.port}/v1/ws"
    seeder, phone_token, fresh_token = [
        (await create_users(server.url, admin, [user], device))[user]
        for device in ("seeder", "phone", "fresh")
    ]

    # History the device already holds: the user wrote it (from another device).
    async with Client(url, seeder, codec=args.codec) as c:
        for first in range(0, args.conversations * args.history, 512):
            sends = [
                c.send(to=peers[i % args.conversations], text=f"earlier {i}")
                for i in range(first, min(first + 512, args.conversations * args.history))
            ]
            await asyncio.gather(*sends)
    phone = Client(url, phone_token, codec=args.codec, tail=args.page, keep_messages=True)
    phone.sync_limit = args.sync_limit
    await phone.connect()
    await phone.sync_now()
    await phone.disconnect()
    saved = _save(phone)

    # While it is away, every peer writes (server API: the backend of each peer's app).
    await _peer_messages(server.url, admin, user, peers, args.missed)
    setup_s = time.monotonic() - t0
    expected = _expected(args, user, peers)

    print(
        f"tidings bench sync: {args.conversations} conversations x {args.history} held, "
        f"{args.missed} missed, latest page {args.page}; setup {setup_s:.1f} s",
        flush=True,
    )
    print(f"{'run':>4} {'sync_ms':>9} {'answers':>8} {'entries':>8} {'server_cpu_ms':>14}")
    runs: list[dict[str, Any]] = []
    times: list[float] = []
    for i in range(args.repeat):
        _restore(phone, saved)
        before = snapshot(server.pid)
        answers_before = phone.sync_answers
        start = time.perf_counter()
        await phone.connect()
        await phone.sync_now()
        elapsed_ms = (time.perf_counter() - start) * 1000
        cpu = server_cpu_s(before, snapshot(server.pid))
        _check(phone, expected, args.page)
        entries = sum(len(m) for m in phone.state.messages.values())
        answers = phone.sync_answers - answers_before
        run = {
            "sync_ms": round(elapsed_ms, 1),
            "answers": answers,
            "entries_held": entries,
            "server_cpu_ms": None if cpu is None else round(cpu * 1000, 1),
        }
        runs.append(run)
        times.append(round(elapsed_ms, 1))
        cpu_ms = run["server_cpu_ms"]
        print(f"{i + 1:>4} {run['sync_ms']:>9} {answers:>8} {entries:>8} {cpu_ms!s:>14}")
        await phone.disconnect()

    # A brand-new device of the same user: the list and the latest page of each.
    fresh = Client(url, fresh_token, codec=args.codec, tail=args.page, keep_messages=True)
    fresh.sync_limit = args.sync_limit
    start = time.perf_counter()
    await fresh.connect()
    await fresh.sync_now()
    new_ms = (time.perf_counter() - start) * 1000
    _check(fresh, expected, args.page)
    await fresh.close()
    await phone.close()

    result: dict[str, Any] = {
        "sync_ms": statistics.median(times),
        "sync_ms_min": min(times),
        "sync_ms_max": max(times),
        "new_device_ms": round(new_ms, 1),
        "target_ms": TARGET_MS,
        "runs": runs,
        "setup_s": round(setup_s, 1),
    }
    verdict = "meets" if result["sync_ms"] < TARGET_MS else "MISSES"
    print(
        f"sync_ms median {result['sync_ms']} (min {min(times)}, max {max(times)}) — "
        f"{verdict} the {TARGET_MS:g} ms target; brand-new device {result['new_device_ms']} ms",
        flush=True,
    )
    return result


async def _peer_messages(
    base_url: str, admin: str, user: str, peers: list[str], total: int
) -> None:
    headers = {"Authorization": f"Bearer {admin}"}
    sem = asyncio.Semaphore(ADMIN_CONCURRENCY)
    async with aiohttp.ClientSession(headers=headers) as http:

        async def one(i: int) -> None:
            body = {
                "from": peers[i % len(peers)],
                "to": user,
                "cid": f"missed-{i}",
                "type": "text",
                "body": {"text": f"while you were away {i}"},
            }
            async with sem, http.post(f"{base_url}/v1/messages", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"server send: {resp.status} {await resp.text()}")

        await asyncio.gather(*(one(i) for i in range(total)))


def _expected(args: argparse.Namespace, user: str, peers: list[str]) -> dict[str, tuple[int, int]]:
    """Per conversation: (last seq, unread) after the missed messages."""
    n = len(peers)
    out = {}
    for i, peer in enumerate(peers):
        missed = args.missed // n + (1 if i < args.missed % n else 0)
        a, b = sorted((peer, user))
        out[f"d:{a}|{b}"] = (args.history + missed, missed)
    return out


def _check(c: Client, expected: dict[str, tuple[int, int]], page: int) -> None:
    """Fully synced: every conversation listed with its unread count and the latest
    page held contiguously up to its newest entry."""
    views = {v.conv: v for v in c.state.conversation_list()}
    if set(views) != set(expected):
        raise AssertionError(f"{len(views)} conversations listed, {len(expected)} expected")
    for conv, (last_seq, unread) in expected.items():
        v = views[conv]
        if (v.last_seq, v.unread) != (last_seq, unread):
            raise AssertionError(
                f"{conv}: last {v.last_seq} unread {v.unread}, expected {last_seq}/{unread}"
            )
        held = c.state.messages.get(conv, {})
        want = range(max(1, last_seq - page + 1), last_seq + 1)
        if any(s not in held for s in want):
            raise AssertionError(f"{conv}: the latest {page} entries are not all held")
    total_unread = sum(u for _, u in expected.values())
    if c.state.badge != total_unread:
        raise AssertionError(f"badge {c.state.badge}, expected {total_unread}")


def _save(c: Client) -> dict[str, Any]:
    return copy.deepcopy({"since": c.since, "cv": c.cv, "held": c.held, "state": c.state})


def _restore(c: Client, saved: dict[str, Any]) -> None:
    fresh = copy.deepcopy(saved)
    c.since, c.cv, c.held, c.state = fresh["since"], fresh["cv"], fresh["held"], fresh["state"]
