"""Hypothesis throws random frames at both codecs (and raw TCP) over real sockets.

After every example the server must still answer a ping on that connection (or accept a
new one if it closed the old one with a documented code), still answer /healthz, and the
database must be unchanged: no random frame ever stores anything.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.procserver import ServerProcess
from tests.rawclient import Raw
from tidings.protocol import close
from tidings.protocol.frames import CLIENT_TYPES

# Every client frame type (new ones are fuzzed automatically), some server-only types and junk.
TYPES = [*sorted(CLIENT_TYPES), "push", "sent", "x"]
FIELDS = [
    "users",
    "presence",
    "seqs",
    "muted",
    "pinned",
    "hidden",
    "draft",
    "user",
    "on",
    "t",
    "id",
    "v",
    "token",
    "cid",
    "to",
    "conv",
    "type",
    "body",
    "flags",
    "mentions",
    "reply_to",
    "seq",
    "since",
    "have",
    "limit",
    "before",
    "code",
    "reason",
    "caps",
]
DOCUMENTED_CLOSES = {
    close.NORMAL,
    close.UNSUPPORTED_DATA,
    close.TOO_BIG,
    close.AUTH_FAILED,
    close.UNSUPPORTED_VERSION,
    close.FLOOD,
}


def scalars(binary: bool) -> st.SearchStrategy[Any]:
    ints = (
        st.integers(min_value=-(2**63), max_value=2**64 - 1)
        if binary
        else st.integers(min_value=-(2**70), max_value=2**70)
    )
    return st.none() | st.booleans() | ints | st.floats(allow_nan=True) | st.text(max_size=24)


def values(binary: bool) -> st.SearchStrategy[Any]:
    leaf = scalars(binary) | st.binary(max_size=16) if binary else scalars(binary)
    return st.recursive(
        leaf,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
        max_leaves=12,
    )


def frames(binary: bool) -> st.SearchStrategy[Any]:
    structured = st.builds(
        lambda t, rest: {"t": t, **rest},
        st.sampled_from(TYPES) | st.text(max_size=8),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values(binary), max_size=8),
    )
    return st.one_of(structured, values(binary), st.binary(max_size=200).map(lambda b: ("raw", b)))


def counts(db: str) -> tuple[int, ...]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return tuple(
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in (
                "messages",
                "conversations",
                "members",
                "users",
                "devices",
                "revoked_tokens",
                "blocks",
                "user_changes",
                "deleted_for",
            )
        )
    finally:
        conn.close()


class Env:
    def __init__(self, srv: ServerProcess, loop: asyncio.AbstractEventLoop) -> None:
        self.srv = srv
        self.loop = loop
        self.token = srv.token("fuzzer", "f1")
        self.db = os.path.join(srv.data_dir, "tidings.db")
        self.baseline = counts(self.db)
        self.conns: dict[str, Raw | None] = {}
        self.ids = itertools.count(10_000)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    async def open(self, kind: str) -> Raw:
        if kind == "tcp":
            raw = await Raw.tcp(self.srv.tcp_port)
        else:
            raw = await Raw.ws(f"ws://127.0.0.1:{self.srv.port}/v1/ws", kind)
        assert (await raw.login(self.token))["t"] == "ready"
        return raw

    async def conn(self, kind: str) -> Raw:
        raw = self.conns.get(kind)
        if raw is None or raw.close_code is not None:
            if raw is not None:
                await raw.close()
            raw = self.conns[kind] = await self.open(kind)
        return raw


@pytest.fixture(scope="module")
def env(tmp_path_factory: Any) -> Iterator[Env]:
    srv = ServerProcess(
        str(tmp_path_factory.mktemp("fuzz")), rate_per_s=100_000, rate_burst=100_000
    )
    srv.start()
    loop = uvloop.new_event_loop()
    try:
        yield Env(srv, loop)
    finally:
        loop.close()
        srv.stop()


def forbidden_target(frame: Any) -> bool:
    """True if the frame could name a real conversation (the fuzzer's own notes)."""

    def mentions_fuzzer(v: Any) -> bool:
        return isinstance(v, str) and "fuzzer" in unicodedata.normalize("NFKC", v).casefold()

    return isinstance(frame, dict) and any(
        mentions_fuzzer(frame.get(k)) for k in ("to", "conv", "user")
    )


async def probe(env: Env, raw: Raw, kind: str, frame: Any) -> None:
    if isinstance(frame, tuple):
        data = frame[1]
    else:
        data = msgspec.json.encode(frame) if kind == "json" else msgspec.msgpack.encode(frame)
    try:
        await raw.send_bytes(data)
    except (ConnectionError, RuntimeError):
        pass
    rid = next(env.ids)
    try:
        await raw.send({"t": "ping", "id": rid})
    except (ConnectionError, RuntimeError):
        pass
    while True:
        f = await raw.recv()
        if f is None or (isinstance(f, dict) and f.get("t") == "close"):
            assert raw.close_code in DOCUMENTED_CLOSES, f"undocumented close {raw.close_code}"
            raw.close_code = raw.close_code or 1000
            return
        assert isinstance(f, dict) and f.get("t") in (
            "error",
            "pong",
            "page",
            "synced",
            "ready",
            "ok",
            "blocked",
        )
        if f["t"] == "error":
            assert f["code"] in (
                "bad_frame",
                "unknown_type",
                "invalid",
                "too_large",
                "unsupported_version",
                "forbidden",
                "not_found",
            )
        if f["t"] == "pong" and f["id"] == rid:
            return


@pytest.mark.parametrize("kind", ["json", "msgpack", "tcp"])
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_frames_change_nothing(env: Env, kind: str, data: Any) -> None:
    """Random frames never crash, hang or store anything; the server keeps serving."""
    frame = data.draw(frames(binary=kind != "json"))
    assume(not forbidden_target(frame))
    raw = env.run(env.conn(kind))
    env.run(probe(env, raw, kind, frame))
    assert env.srv.health()["status"] == "ok"
    assert counts(env.db) == env.baseline


def test_fuzzed_server_still_delivers(env: Env, tmp_path: Path) -> None:
    """After the fuzzing the server still serves a normal conversation."""
    from tidings.client import Client

    async def check() -> None:
        a = Client(f"ws://127.0.0.1:{env.srv.port}/v1/ws", env.srv.token("alice", "a"))
        b = Client(f"tcp://127.0.0.1:{env.srv.tcp_port}", env.srv.token("bob", "b"))
        await a.connect()
        await b.connect()
        sent = await a.send(to="bob", text="after the storm")
        async for ev in b.events():
            if hasattr(ev, "message"):
                assert ev.message.mid == sent.mid
                break
        await a.close()
        await b.close()

    env.run(check())
