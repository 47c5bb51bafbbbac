"""The delivery contract under failure: withheld acks, SIGKILL mid-batch, SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Harness, next_message
from tests.procserver import ServerProcess, wait_until
from tests.rawclient import Raw
from tidings.client import Client, Disconnected, MessageEvent
from tidings.protocol import close

STORES = ("sqlite", "postgres")  # in-process server tests run on both stores


async def test_withheld_acks_are_retransmitted_then_disconnected(make_server: Any) -> None:
    """A device that never acks gets each push 1 + max_retransmits times, then close 4005."""
    h: Harness = await make_server(retransmit_ms=100, max_retransmits=3)
    raw = await Raw.tcp(h.server.tcp_port)
    assert (await raw.login(await h.token("bob")))["t"] == "ready"
    a = await h.client("alice")
    sent = await a.send(to="bob", text="ack me")
    copies = 0
    while True:
        frame = await raw.recv(timeout=10)
        if frame is None or frame.get("t") == "close":
            break
        if frame["t"] == "push":
            assert frame["m"]["mid"] == sent.mid
            copies += 1
    assert copies == 4
    assert raw.close_code == close.ACK_TIMEOUT


async def test_acked_pushes_are_not_retransmitted(make_server: Any) -> None:
    """A cumulative ack clears the window: no retransmits and no disconnect."""
    h: Harness = await make_server(retransmit_ms=100, max_retransmits=2)
    raw = await Raw.ws(h.ws_url)
    assert (await raw.login(await h.token("bob")))["t"] == "ready"
    a = await h.client("alice")
    for i in range(3):
        await a.send(to="bob", text=f"m{i}")
    seqs = [(await raw.until("push"))["m"]["seq"] for _ in range(3)]
    await raw.send({"t": "ack", "conv": "d:alice|bob", "seq": seqs[-1]})
    await asyncio.sleep(0.8)
    await raw.send({"t": "ping", "id": 77})
    frame = await raw.recv()
    assert frame["t"] == "pong" and frame["id"] == 77  # no retransmitted push in between


async def test_sdk_shows_no_duplicates_after_ack_timeout(
    make_server: Any, monkeypatch: Any
) -> None:
    """An SDK that withheld acks is cut off, reconnects, syncs, and shows each message once."""
    h: Harness = await make_server(retransmit_ms=100, max_retransmits=2)
    b = await h.client("bob")
    a = await h.client("alice")
    monkeypatch.setattr(b, "_flush_acks", lambda: setattr(b, "_ack_scheduled", False))
    for i in range(5):
        await a.send(to="bob", text=f"m{i}")
    events: list[Any] = []

    async def collect_until_disconnect() -> None:
        async for ev in b.events():
            events.append(ev)
            if isinstance(ev, Disconnected):
                return

    await asyncio.wait_for(collect_until_disconnect(), 10)
    assert events[-1].code == close.ACK_TIMEOUT and not events[-1].final
    monkeypatch.undo()
    for i in range(5, 8):
        await a.send(to="bob", text=f"m{i}")
    while sum(isinstance(e, MessageEvent) for e in events) < 8:
        events.append(await next_message(b))
    msgs = [e.message for e in events if isinstance(e, MessageEvent)]
    assert [m.seq for m in msgs] == list(range(1, 9))
    assert [m.body["text"] for m in msgs] == [f"m{i}" for i in range(8)]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.stop()


async def collect(client: Client, into: list[MessageEvent]) -> None:
    async for ev in client.events():
        if isinstance(ev, MessageEvent):
            into.append(ev)


async def test_sigkill_with_uncommitted_batch(tmp_path: Path, procs: list[ServerProcess]) -> None:
    """SIGKILL with >=100 sends in an uncommitted batch: after restart and resend every acked
    message is stored exactly once, seqs are gapless, nothing is duplicated."""
    srv = ServerProcess(
        str(tmp_path / "data"), group_commit_linger_ms=1500, rate_per_s=5000, rate_burst=5000
    )
    procs.append(srv)
    srv.start()
    url = f"ws://127.0.0.1:{srv.port}/v1/ws"
    a = Client(url, srv.token("alice", "a1"), heartbeat_s=0.3, dead_after_s=1.5, backoff_max_s=0.3)
    b = Client(
        f"tcp://127.0.0.1:{srv.tcp_port}",
        srv.token("bob", "b1"),
        heartbeat_s=0.3,
        dead_after_s=1.5,
        backoff_max_s=0.3,
    )
    await a.connect()
    await b.connect()
    received: list[MessageEvent] = []
    collector = asyncio.ensure_future(collect(b, received))
    first = await asyncio.gather(
        *(a.send(to="bob", text=f"early {i}", cid=f"e{i}") for i in range(20))
    )
    assert sorted(s.seq for s in first) == list(range(1, 21))
    late = [
        asyncio.ensure_future(a.send(to="bob", text=f"late {i}", cid=f"l{i}")) for i in range(150)
    ]
    await wait_until(lambda: srv.health()["pending_writes"] >= 100, 5, "sends to be pending")
    assert not any(f.done() for f in late), "the batch committed before the kill"
    srv.kill()
    srv.start(group_commit_linger_ms=0)
    done = await asyncio.wait_for(asyncio.gather(*late), 30)
    assert sorted(s.seq for s in done) == list(range(21, 171))
    history = srv.history("d:alice|bob")
    assert [m["seq"] for m in history] == list(range(1, 171))
    cids = [m["cid"] for m in history]
    assert len(set(cids)) == 170
    assert set(cids) == {f"e{i}" for i in range(20)} | {f"l{i}" for i in range(150)}
    await wait_until(lambda: len(received) >= 170, 20, "bob to hold everything")
    assert [e.message.seq for e in received] == list(range(1, 171))
    collector.cancel()
    await a.close()
    await b.close()


async def test_sigterm_drains(
    tmp_path: Path, procs: list[ServerProcess], caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM finishes in-flight writes (every send is acked), closes with 1001, exits 0."""
    caplog.set_level(logging.DEBUG, logger="tidings.client.sdk")
    srv = ServerProcess(
        str(tmp_path / "data"), group_commit_linger_ms=800, rate_per_s=5000, rate_burst=5000
    )
    procs.append(srv)
    srv.start()
    a = Client(
        f"tcp://127.0.0.1:{srv.tcp_port}",
        srv.token("alice", "a1"),
        backoff_min_s=5,
        backoff_max_s=5,
    )
    await a.connect()
    srv.token("bob", "b1")
    sends = [asyncio.ensure_future(a.send(to="bob", text=f"m{i}")) for i in range(60)]
    await wait_until(lambda: srv.health()["pending_writes"] >= 60, 5, "sends to be pending")
    code = await asyncio.get_running_loop().run_in_executor(None, srv.terminate)
    assert code == 0
    done, _ = await asyncio.wait(sends, timeout=5)
    assert len(done) == 60, (
        f"{60 - len(done)} sends unanswered; server log: {srv.read_log()}\n"
        f"client log: {caplog.text[-4000:]}"
    )
    results = [f.result() for f in sends]
    assert sorted(r.seq for r in results) == list(range(1, 61))
    async for ev in a.events():
        if isinstance(ev, Disconnected):
            assert ev.code == close.GOING_AWAY
            break
    await a.close()
    srv.start()
    assert len(srv.history("d:alice|bob")) == 60


async def test_backpressure_pauses_senders_then_resumes(make_server: Any) -> None:
    """Above the write high-water mark senders stop being read; all sends still complete."""
    h: Harness = await make_server(
        group_commit_linger_ms=200,
        write_high_water=10,
        write_low_water=2,
        rate_per_s=10_000,
        rate_burst=10_000,
    )
    a = await h.client("alice", transport="tcp")
    await h.user("bob")
    results = await asyncio.gather(*(a.send(to="bob", text=f"{i}") for i in range(60)))
    assert sorted(r.seq for r in results) == list(range(1, 61))
    assert h.server.gate.pauses >= 1
    assert not h.server.gate.paused
    w = await h.client("walter", transport="ws")
    results = await asyncio.gather(*(w.send(to="bob", text=f"{i}") for i in range(40)))
    assert sorted(r.seq for r in results) == list(range(1, 41))
    assert not h.server.gate.paused
