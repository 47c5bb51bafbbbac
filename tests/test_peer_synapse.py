"""The Synapse peer of `tidings bench direct`: a real Synapse, real pairs, one worker.

Needs the peers' virtual environments (scripts/bench-peers.sh); without them the tests
fail with that hint rather than skip.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import subprocess
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from tidings.bench.peer_synapse import (
    RECIPIENT_ID,
    ROOM_ID,
    SENDER_ID,
    SENDER_TOKEN,
    SynapsePeer,
    synapse_worker_main,
)
from tidings.bench.peers import peer_python
from tidings.bench.report import summarise

PAIRS = 2
RATE = 20.0
WARMUP = 0.5
DURATION = 2.0
GRACE = 5.0


@pytest.fixture(scope="module")
def peer() -> Iterator[SynapsePeer]:
    peer_python("synapse")  # raises with the set-up hint: a failure, not a skip
    p = SynapsePeer()
    p.start([])
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def pairs(peer: SynapsePeer) -> list[tuple[Any, ...]]:
    return peer.make_pairs(PAIRS, "t1")


def _run_worker(peer: SynapsePeer, rows: list[tuple[Any, ...]], step: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    cfg = {
        "port": peer.port,
        "rate": RATE,
        "warmup": WARMUP,
        "duration": DURATION,
        "grace": GRACE,
        "pairs": rows,
        "text": "x" * 32,
        "cid_prefix": f"t1.{step}.",
        "cores": [],
    }
    proc = ctx.Process(target=peer.worker, args=(child, cfg), daemon=True)
    proc.start()
    child.close()
    try:

        def recv(want: str, timeout: float) -> Any:
            assert parent.poll(timeout), f"no {want!r} from the worker in {timeout}s"
            kind, payload = parent.recv()
            assert kind == want, payload
            return payload

        info = recv("ready", 60)
        assert info["connections"] == 2 * len(rows)
        parent.send(("go", time.monotonic() + 0.2))
        result: dict[str, Any] = recv("result", WARMUP + DURATION + GRACE + 30)
        return result
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
        parent.close()


def test_pairs_are_picklable_rows(peer: SynapsePeer, pairs: list[tuple[Any, ...]]) -> None:
    assert peer.worker is synapse_worker_main
    assert len(pairs) == PAIRS
    for row in pairs:
        assert len(row) == 6 and all(isinstance(x, str) for x in row)
        assert row[SENDER_ID].startswith("@bench-t1-") and row[SENDER_ID].endswith(":bench.local")
        assert row[ROOM_ID].startswith("!")
    assert len({row[RECIPIENT_ID] for row in pairs}) == PAIRS


def test_every_message_delivered_once_in_order(
    peer: SynapsePeer, pairs: list[tuple[Any, ...]]
) -> None:
    # Twice over the same pairs, as a sweep of two rates does: the second run must not
    # see the first one's messages as its own.
    for step in (0, 1):
        result = _run_worker(peer, pairs, step)
        row = summarise(RATE, DURATION, [result], None)
        total = int((WARMUP + DURATION) * RATE)
        counts = row["counts"]
        assert counts["sent"] == total, row
        assert counts["answered"] == total and counts["delivered"] == total, row
        assert counts["send_failed"] == counts["unanswered"] == counts["errored"] == 0, row
        assert row["lost"] == row["duplicated"] == row["reordered"] == 0, row
        assert row["errors"] == {} and row["closes"] == {}, row
        assert counts["foreign"] == 0, row
        assert row["samples"] == int(DURATION * RATE), row
        # Timing only loosely: the box may be busy with other work.
        assert 0 < row["p50_ms"] <= row["p99_ms"] < 4000, row
        assert 0 < row["ack_p50_ms"] < 4000, row
        assert [r for r in row["reasons"] if not r.startswith("achieved")] == [], row
        assert sum(row["timeline"]["delivered_per_s"]) == counts["delivered_in_window"]
        assert 0 < result["cpu_pct"] < 90


def test_rate_limits_lifted_in_config(peer: SynapsePeer) -> None:
    """Synapse's own config parser sees every rate limiter lifted."""
    script = (
        "import json, sys\n"
        "from synapse.config.homeserver import HomeServerConfig\n"
        "from synapse.config.ratelimiting import RatelimitSettings\n"
        "c = HomeServerConfig.load_config('', ['--config-path', sys.argv[1]])\n"
        "rl = c.ratelimiting\n"
        "out = {k: [v.per_second, v.burst_count] for k in dir(rl)\n"
        "       if isinstance(v := getattr(rl, k), RatelimitSettings)}\n"
        "out['rc_federation'] = [rl.rc_federation.sleep_limit, rl.rc_federation.reject_limit]\n"
        "out['presence'] = c.server.presence_enabled\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [peer_python("synapse"), "-c", script, peer.config_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen.pop("presence") is False
    assert len(seen) >= 20, seen
    for name, (rate, burst) in seen.items():
        assert rate >= 100_000 and burst >= 100_000, (name, rate, burst)


def test_no_429_on_a_burst(peer: SynapsePeer, pairs: list[tuple[Any, ...]]) -> None:
    """100 messages from one user at once: none refused by a rate limiter."""
    row = pairs[0]
    url = f"{peer.url}/_matrix/client/v3/rooms/{quote(row[ROOM_ID], safe='')}/send/m.room.message"
    headers = {"Authorization": f"Bearer {row[SENDER_TOKEN]}"}

    async def burst() -> tuple[list[int], float]:
        began = time.monotonic()
        async with aiohttp.ClientSession() as http:

            async def one(i: int) -> int:
                body = {"msgtype": "m.text", "body": f"burst {i}"}
                async with http.put(f"{url}/burst{i}", json=body, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(i) for i in range(100)))
        return list(statuses), time.monotonic() - began

    statuses, took = asyncio.run(burst())
    assert statuses == [200] * 100, statuses
    assert took < 30, took
