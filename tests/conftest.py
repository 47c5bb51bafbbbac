"""Shared fixtures: an in-process server on free loopback ports, users, tokens, clients."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
import pytest_asyncio
import uvloop
from playwright.async_api import Browser

from tests.browser import chromium
from tests.procserver import ServerProcess
from tidings.app import Server
from tidings.bench.services import Postgres, Redis, postgres_server, redis_server
from tidings.client import Client
from tidings.config import Settings

HERE = os.path.dirname(__file__)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}


class ManualClock:
    """Wall-clock time the test moves by hand (timers still use the real monotonic)."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms

    def monotonic(self) -> float:
        return time.monotonic()

    def advance(self, seconds: float) -> None:
        self.offset_ms += int(seconds * 1000)


def test_settings(data_dir: str, **overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=0,
        tcp_port=0,
        data_dir=data_dir,
        log_level="WARNING",
        heartbeat_ms=1_000,
        retransmit_ms=300,
    )
    return base.replace(**overrides)


class Harness:
    """A running in-process server plus helpers to make users, tokens and clients."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.clients: list[Client] = []

    @property
    def ws_url(self) -> str:
        scheme = "wss" if self.server.settings.tls else "ws"
        return f"{scheme}://127.0.0.1:{self.server.http_port}/v1/ws"

    @property
    def tcp_url(self) -> str:
        scheme = "tcps" if self.server.settings.tls else "tcp"
        return f"{scheme}://127.0.0.1:{self.server.tcp_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.server.settings.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.http_port}"

    def url(self, transport: str) -> str:
        return self.ws_url if transport == "ws" else self.tcp_url

    async def user(self, uid: str) -> str:
        await self.server.accounts.put_user(uid)
        return uid

    async def token(
        self, uid: str, device: str = "d1", platform: str = "desktop", ttl_s: int | None = None
    ) -> str:
        await self.server.accounts.put_user(uid)
        return (await self.server.accounts.issue_token(uid, device, platform, ttl_s)).token

    async def client(
        self,
        uid: str,
        device: str = "d1",
        *,
        transport: str = "ws",
        codec: str = "msgpack",
        connect: bool = True,
        **kw: Any,
    ) -> Client:
        token = await self.token(uid, device)
        kw.setdefault("heartbeat_s", 0.5)
        kw.setdefault("dead_after_s", 2.0)
        c = Client(self.url(transport), token, codec=codec, **kw)
        self.clients.append(c)
        if connect:
            await c.connect()
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets ``STORES = ("sqlite", "postgres")`` runs its in-process server
    tests once on each store."""
    stores = getattr(metafunc.module, "STORES", None)
    if stores and "make_server" in metafunc.fixturenames:
        metafunc.parametrize("store_kind", stores, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def make_server(
    tmp_path: Any, store_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Harness] = []
    database_url = ""
    if store_kind == "postgres":
        database_url = request.getfixturevalue("pg_server").new_database()

    async def make(clock: Any = None, **overrides: Any) -> Harness:
        data_dir = str(tmp_path / f"data{len(started)}")
        if database_url:
            overrides.setdefault("database_url", database_url)
        server = Server(test_settings(data_dir, **overrides), clock=clock)
        await server.start()
        h = Harness(server)
        started.append(h)
        return h

    yield make
    for h in started:
        await h.close()
        await h.server.drain()


@pytest.fixture
async def harness(make_server: Callable[..., Any]) -> Harness:
    h: Harness = await make_server()
    return h


async def next_message(client: Client, timeout: float = 5.0) -> Any:
    """The next MessageEvent from the client's event stream."""
    from tidings.client import MessageEvent

    async def get() -> Any:
        async for ev in client.events():
            if isinstance(ev, MessageEvent):
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(get(), timeout)


def python() -> str:
    return sys.executable


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A `tidings serve` child process shared by a module's tests (the browser tests)."""
    srv = ServerProcess(str(tmp_path_factory.mktemp("served") / "data")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium for a module's tests (their loop must be module-scoped too)."""
    async with chromium() as b:
        yield b


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    """One PostgreSQL server for the whole run (tests take a fresh database each)."""
    with postgres_server() as pg:
        yield pg


@pytest.fixture
def pg_dsn(pg_server: Postgres) -> str:
    """A fresh, empty database on the run's PostgreSQL server."""
    return pg_server.new_database()


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[Redis]:
    """One Redis server for the whole run (tests flush what they need)."""
    with redis_server() as r:
        yield r
