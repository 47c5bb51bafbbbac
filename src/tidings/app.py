"""Composition root: builds config, clock, store, bus, services and listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

import msgspec
from aiohttp import web

from tidings import __version__
from tidings.api.http import HttpApi
from tidings.api.openapi import build_openapi
from tidings.bus.memory import MemoryBus
from tidings.bus.redis import RedisBus
from tidings.clock import Clock, SystemClock
from tidings.config import Settings
from tidings.gateway import tcp, websocket, wsfast
from tidings.gateway.hub import Hub
from tidings.gateway.rooms import RoomHub
from tidings.gateway.tls import server_context
from tidings.protocol import close
from tidings.services.accounts import Accounts
from tidings.services.contacts import Contacts
from tidings.services.groups import Groups, MemberCache
from tidings.services.messaging import Messaging
from tidings.services.presence import Presence
from tidings.services.rooms import Rooms
from tidings.services.secrets import load_or_create
from tidings.session.context import ServerContext
from tidings.session.gate import WriteGate
from tidings.store.postgres import PostgresStore
from tidings.store.sqlite import SqliteStore
from tidings.web import install as install_web

log = logging.getLogger(__name__)
WORKER_LEASE_TTL_MS = 60_000


class Server:
    """One Tidings process. ``start()`` binds the listeners; ``drain()`` stops gracefully."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        s = settings
        os.makedirs(s.data_dir, exist_ok=True)
        self.admin_key = load_or_create(os.path.join(s.data_dir, "admin.key"), s.admin_key)
        signing_key = load_or_create(os.path.join(s.data_dir, "signing.key"), s.signing_key, 48)
        self.store: SqliteStore | PostgresStore
        if s.database_url:
            self.store = PostgresStore(
                s.database_url,
                self.clock,
                pool_size=s.pg_pool_size,
                max_pending=s.max_pending_writes,
            )
        else:
            self.store = SqliteStore(
                os.path.join(s.data_dir, "tidings.db"),
                self.clock,
                readers=s.sqlite_readers,
                max_batch=s.group_commit_max_batch,
                linger_ms=s.group_commit_linger_ms,
                max_pending=s.max_pending_writes,
                wal_restart_bytes=s.wal_restart_bytes,
                checkpoint_interval_s=s.checkpoint_interval_ms / 1000,
            )
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.bus: MemoryBus | RedisBus
        if s.redis_url:
            self.bus = RedisBus(s.redis_url, self._holder, self.clock, s.node_ttl_ms)
        else:
            self.bus = MemoryBus()
        self.hub = Hub(self.clock, login_policy=s.login_policy, bus=self.bus)
        self.bus.set_handler(self.hub.handle)
        self.accounts = Accounts(
            self.store,
            self.bus,
            self.clock,
            signing_key,
            self.admin_key,
            token_ttl_s=s.token_ttl_s,
            allow_registration=s.allow_registration,
        )
        self.messaging = Messaging(self.store, self.bus, s)
        self.contacts = Contacts(self.store, self.bus, self.clock)
        self.groups = Groups(self.store, self.bus, self.clock, s)
        self.hub.members = MemberCache(self.store)
        self.rooms = Rooms(self.bus, self.clock, s)
        self.hub.rooms = RoomHub(self.clock, s, bus=self.bus)
        self.presence = Presence(
            self.store,
            self.clock,
            self.hub.is_online,
            self.bus.online if isinstance(self.bus, RedisBus) else None,
        )
        self.hub.presence = self.presence
        self.hub.presence_batch_s = s.presence_batch_ms / 1000
        self.gate = WriteGate(self.store, s.write_high_water, s.write_low_water)
        self.ctx = ServerContext(
            settings=s,
            clock=self.clock,
            store=self.store,
            accounts=self.accounts,
            messaging=self.messaging,
            gate=self.gate,
            contacts=self.contacts,
            presence=self.presence,
            groups=self.groups,
            rooms=self.rooms,
            registry=self.hub,
            server_name=f"tidings/{__version__}",
        )
        self.api = HttpApi(
            self.accounts,
            self.messaging,
            self.contacts,
            self.groups,
            self.rooms,
            self.hub.rooms.online,
            self.hub.rooms.stats,
            lambda: self.hub.online,
            self._node_info,
        )
        self._runner: web.AppRunner | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._http_server: asyncio.AbstractServer | None = None
        self._ws_gateway: wsfast.WsGateway | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._worker_id = -1
        self.http_port = 0
        self.tcp_port = 0

    def _node_info(self) -> dict[str, Any]:
        redis = self.settings.redis_url != ""
        return {
            "pid": os.getpid(),
            "worker_id": self._worker_id,
            "store": "postgres" if self.settings.database_url else "sqlite",
            "bus": "redis" if redis else "memory",
            "bus_connected": self.bus.connected if isinstance(self.bus, RedisBus) else True,
        }

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=3 << 20)
        self.api.install(app)
        openapi = msgspec.json.encode(build_openapi(self.api.routes))

        async def openapi_doc(_: web.Request) -> web.Response:
            return web.Response(body=openapi, content_type="application/json")

        app.router.add_get("/v1/openapi.json", openapi_doc)
        app.router.add_get("/v1/ws", websocket.make_handler(self.ctx))
        install_web(app)
        return app

    async def start(self) -> None:
        s = self.settings
        self.ctx.loop = asyncio.get_running_loop()
        await self.store.open()
        wid = await self.store.lease_worker_id(
            self._holder, self.clock.now_ms(), WORKER_LEASE_TTL_MS
        )
        self.store.set_worker_id(wid)
        self._worker_id = wid
        self._lease_task = asyncio.ensure_future(self._renew_lease())
        await self.bus.start()
        self.hub.start()
        self.messaging.reads.start()
        self.messaging.delivered.start()
        ssl_ctx = server_context(s.tls_cert, s.tls_key) if s.tls else None
        self._runner = web.AppRunner(
            self.make_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        shared = s.workers > 1  # several processes bind the same ports (SO_REUSEPORT)
        # The HTTP port: WebSocket upgrades to /v1/ws are taken by hand (wsfast), every
        # other request goes to aiohttp's request handler.
        aiohttp_server = self._runner.server
        assert aiohttp_server is not None
        self._ws_gateway = wsfast.WsGateway(self.ctx, aiohttp_server)
        loop = asyncio.get_running_loop()
        self._http_server = await loop.create_server(
            self._ws_gateway,
            s.host,
            s.port,
            ssl=ssl_ctx,
            backlog=s.backlog,
            reuse_address=True,
            reuse_port=shared or None,
        )
        self.http_port = int(self._http_server.sockets[0].getsockname()[1])
        if s.tcp_port >= 0:
            self._tcp_server = await loop.create_server(
                lambda: tcp.TcpLink(self.ctx),
                s.host,
                s.tcp_port,
                ssl=ssl_ctx,
                backlog=s.backlog,
                reuse_address=True,
                reuse_port=shared or None,
            )
            self.tcp_port = self._tcp_server.sockets[0].getsockname()[1]
        log.info(
            "tidings %s listening: http%s://%s:%d (ws /v1/ws), tcp%s port %s, data %s",
            __version__,
            "s" if ssl_ctx else "",
            s.host,
            self.http_port,
            "+tls" if ssl_ctx else "",
            self.tcp_port if s.tcp_port >= 0 else "off",
            os.path.abspath(s.data_dir),
        )

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(WORKER_LEASE_TTL_MS / 3000)
            try:
                wid = await self.store.lease_worker_id(
                    self._holder, self.clock.now_ms(), WORKER_LEASE_TTL_MS
                )
            except Exception as exc:
                log.warning("worker lease renewal failed: %s", exc)
                continue
            if wid != self._worker_id:
                # The lease lapsed (the database was away longer than its ttl) and another
                # process may hold the old id now: draw ids under the new one.
                log.warning("worker id lease lost; now worker %d (was %d)", wid, self._worker_id)
                self.store.set_worker_id(wid)
                self._worker_id = wid

    async def abort(self) -> None:
        """Release what a failed ``start()`` opened (nothing was served)."""
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._http_server is not None:
            self._http_server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(Exception):
            await self.bus.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    async def drain(self) -> None:
        """Stop accepting, finish in-flight writes, close connections as going away."""
        s = self.settings
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self._http_server is not None:
            self._http_server.close()
        if self._ws_gateway is not None:
            self._ws_gateway.draining = True
        deadline = self.clock.monotonic() + s.drain_timeout_s
        # Queued writes commit, then their answers are written (the commit callbacks run
        # on this loop a few iterations after the writer thread finishes a batch).
        while (
            self.store.backlog() or self.hub.sends_in_flight()
        ) and self.clock.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.hub.close_all(close.GOING_AWAY, "server shutting down")
        await asyncio.sleep(0.05)
        if self._ws_gateway is not None:
            # Clients answer the close; those that have not within a second are cut.
            until = self.clock.monotonic() + 1.0
            while self._ws_gateway.conns and self.clock.monotonic() < until:
                await asyncio.sleep(0.01)
            self._ws_gateway.abort_all()
        await self.hub.stop()
        await self.messaging.reads.stop()
        await self.messaging.delivered.stop()
        if self._lease_task is not None:
            self._lease_task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.bus.close()
        await self.store.close()
        log.info("tidings stopped")
