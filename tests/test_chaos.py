"""Chaos: 1,000 messages while connections are cut and blackholed at random.

Every connection goes through its own userspace proxy. A random schedule (seed printed;
set CHAOS_SEED to replay) aborts connections or silently blackholes them (half-open);
clients detect dead links by heartbeat, reconnect and sync, and the sender resends what
was not acked. At the end every device of the recipient holds exactly the 1,000
messages, in order, once each, and the server's history is exactly 1,000 gapless seqs.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from tests.conftest import Harness
from tests.netproxy import Proxy
from tidings.client import Client, MessageEvent

N = 1000

LAYOUTS = {
    # name: (sender, recipient device 1, recipient device 2) as (transport, codec)
    "ws-json-sender": (("ws", "json"), ("tcp", "msgpack"), ("ws", "msgpack")),
    "tcp-sender": (("tcp", "msgpack"), ("ws", "json"), ("ws", "msgpack")),
}


async def proxied_client(
    h: Harness, uid: str, device: str, transport: str, codec: str
) -> tuple[Client, Proxy]:
    port = h.server.http_port if transport == "ws" else h.server.tcp_port
    proxy = await Proxy("127.0.0.1", port).start()
    url = (
        f"ws://127.0.0.1:{proxy.port}/v1/ws"
        if transport == "ws"
        else f"tcp://127.0.0.1:{proxy.port}"
    )
    client = Client(
        url,
        await h.token(uid, device),
        codec=codec,
        heartbeat_s=0.25,
        dead_after_s=0.9,
        backoff_min_s=0.02,
        backoff_max_s=0.3,
        gap_grace_s=0.1,
        request_timeout_s=3,
    )
    h.clients.append(client)
    await client.connect()
    return client, proxy


async def chaos(
    rng: random.Random, proxies: list[Proxy], stop: asyncio.Event, log: list[str]
) -> None:
    while not stop.is_set():
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        i = rng.randrange(len(proxies))
        if rng.random() < 0.5:
            proxies[i].cut()
            log.append(f"cut {i}")
        else:
            proxies[i].blackhole()
            log.append(f"blackhole {i}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_chaos_exactly_once_in_order(make_server: Any, layout: str) -> None:
    """Each recipient device ends with exactly the 1,000 messages in order; history gapless."""
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(2**32)))
    print(f"chaos seed {seed} layout {layout}")
    rng = random.Random(seed)
    h: Harness = await make_server(
        rate_per_s=10_000, rate_burst=10_000, idle_timeout_ms=2_000, retransmit_ms=300
    )
    (st, sc), (b1t, b1c), (b2t, b2c) = LAYOUTS[layout]
    a, pa = await proxied_client(h, "alice", "a1", st, sc)
    b1, pb1 = await proxied_client(h, "bob", "b1", b1t, b1c)
    b2, pb2 = await proxied_client(h, "bob", "b2", b2t, b2c)
    got: dict[str, list[Any]] = {"b1": [], "b2": []}

    async def collect(name: str, c: Client) -> None:
        async for ev in c.events():
            if isinstance(ev, MessageEvent):
                got[name].append(ev.message)

    collectors = [
        asyncio.ensure_future(collect("b1", b1)),
        asyncio.ensure_future(collect("b2", b2)),
    ]
    stop = asyncio.Event()
    log: list[str] = []
    chaos_task = asyncio.ensure_future(chaos(rng, [pa, pb1, pb2], stop, log))
    window = asyncio.Semaphore(40)

    loop = asyncio.get_running_loop()
    start = loop.time()

    async def send(i: int) -> Any:
        # Paced over ~6 s so the faults land throughout the run.
        await asyncio.sleep(max(0.0, start + i * 0.006 - loop.time()))
        async with window:
            return await a.send(to="bob", text=f"msg {i}", cid=f"chaos-{i}")

    acks = await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(N))), 120)
    stop.set()
    await chaos_task
    assert sorted(ack.seq for ack in acks) == list(range(1, N + 1))

    async def settled() -> None:
        while len(got["b1"]) < N or len(got["b2"]) < N:
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(settled(), 60)
    finally:
        print(
            f"chaos events: {len(log)}; reconnects a={a.connects} b1={b1.connects} "
            f"b2={b2.connects}; received b1={len(got['b1'])} b2={len(got['b2'])}"
        )
        for c in (b1, b2):
            print(
                "state",
                c.held,
                {k: sorted(v)[:5] for k, v in c._buffer.items()},
                c.ready.is_set(),
                c._conn,
                c._sync_task,
                c._want_sync,
                c.since,
            )
    await asyncio.sleep(0.5)  # anything extra (a duplicate) would show up now
    expected = [f"chaos-{i}" for i in range(N)]
    by_seq = {ack.seq: ack.cid for ack in acks}
    for name in ("b1", "b2"):
        msgs = got[name]
        assert len(msgs) == N, f"{name} has {len(msgs)} messages"
        assert [m.seq for m in msgs] == list(range(1, N + 1)), f"{name} out of order"
        assert [m.cid for m in msgs] == [by_seq[s] for s in range(1, N + 1)]
        assert sorted(m.cid for m in msgs) == sorted(expected)
    rows: list[Any] = []
    before = 0
    while True:
        page = await h.server.messaging.history("alice", "d:alice|bob", before, 100)
        rows = page[0] + rows
        if not page[1]:
            break
        before = page[0][0].seq
    assert [r.seq for r in rows] == list(range(1, N + 1))
    assert sorted(r.cid for r in rows) == sorted(expected)
    assert len(log) >= 5, "the chaos schedule should have injected faults"
    for t in collectors:
        t.cancel()
    for p in (pa, pb1, pb2):
        await p.stop()
