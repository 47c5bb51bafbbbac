"""The python-socketio chat server `tidings bench compare` measures Tidings against.

A standalone script, run by the interpreter of the socketio peer's own virtual
environment (scripts/bench-peers.sh): it imports python-socketio, aiohttp, uvloop and
the standard library only, nothing of Tidings.

What a tutorial does to "add chat" with python-socketio: an ``AsyncServer`` attached to
an aiohttp application, served on uvloop. A client emits ``join`` with a room name (the
server enters it into the room and answers the acknowledgement, if asked for), and
``post`` with a dict holding ``room``; the server emits that dict as ``msg`` to the
room, to every member, the poster included (socketio's default: no ``skip_sid``).

Nothing is tuned but what a bench needs: logging off (socketio's, Engine.IO's and
aiohttp's access log) and, with ``--ping-interval``/``--ping-timeout``, Engine.IO's
heartbeat (the defaults are socketio's own, 25 s and 20 s; the bench's clients answer
the pings). ``GET /healthz`` answers 200 once the server is up.

    python peer_socketio_server.py --port 8765
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import socketio
import uvloop
from aiohttp import web


def build(ping_interval: float, ping_timeout: float) -> web.Application:
    sio: Any = socketio.AsyncServer(
        async_mode="aiohttp",
        logger=False,
        engineio_logger=False,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    app = web.Application()
    sio.attach(app)

    async def join(sid: str, room: str) -> str:
        await sio.enter_room(sid, room)
        return "ok"

    async def post(sid: str, data: dict[str, Any]) -> None:
        await sio.emit("msg", data, room=data["room"])

    sio.on("join", join)
    sio.on("post", post)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/healthz", healthz)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="python-socketio chat server (bench peer)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ping-interval", type=float, default=25.0, help="Engine.IO's (25)")
    p.add_argument("--ping-timeout", type=float, default=20.0, help="Engine.IO's (20)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    app = build(args.ping_interval, args.ping_timeout)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=2.0,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
