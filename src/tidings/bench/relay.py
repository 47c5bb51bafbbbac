"""The ceiling for `tidings bench direct`: a minimal aiohttp + uvloop relay that speaks
just enough of the Tidings protocol for the bench's clients — receive a `send` from A,
forward it to B as a `push`, answer A with `sent` — and nothing else: no storage, no
durability, no checks, no retransmits, no acks kept, tokens are the user ids.

It is what the message path would cost with no IM work at all, on the same framework
and codec, so Tidings' figure divided by this one is the price of the IM work.

    python -m tidings.bench.relay --port 8090

The bench makes its users through `PUT /v1/users/{uid}` and `POST /v1/users/{uid}/tokens`
(the token is the user id) and reads `GET /healthz`, as with Tidings.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import msgspec
from aiohttp import WSMsgType, web

SUBPROTOCOL = "tidings.v1.msgpack"


class Relay:
    def __init__(self) -> None:
        self.by_user: dict[str, web.WebSocketResponse] = {}
        self.seqs: dict[str, int] = {}  # conversation -> last seq
        self.mid = 0
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder().decode
        self.hello = self.encode({"t": "hello", "heartbeat_ms": 25_000})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), compress=False, autoping=True)
        await ws.prepare(request)
        await ws.send_bytes(self.hello)
        uid = ""
        encode, decode = self.encode, self.decode
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                break
            f = decode(msg.data)
            t = f.get("t")
            if t == "send":
                to = f["to"]
                conv = f"d:{uid}|{to}" if uid <= to else f"d:{to}|{uid}"
                seq = self.seqs[conv] = self.seqs.get(conv, 0) + 1
                self.mid += 1
                mid = str(self.mid)
                peer = self.by_user.get(to)
                if peer is not None:
                    m = {"conv": conv, "seq": seq, "mid": mid, "cid": f["cid"], "body": f["body"]}
                    await peer.send_bytes(encode({"t": "push", "m": m}))
                await ws.send_bytes(encode({"t": "sent", "id": f["id"], "seq": seq, "mid": mid}))
            elif t == "hello":
                uid = str(f["token"])
                self.by_user[uid] = ws
                await ws.send_bytes(encode({"t": "ready", "id": f.get("id", 0)}))
            elif t == "ping":
                await ws.send_bytes(encode({"t": "pong", "id": f.get("id", 0)}))
            # acks and anything else: nothing to do
        if uid and self.by_user.get(uid) is ws:
            del self.by_user[uid]
        return ws


async def _put_user(request: web.Request) -> web.Response:
    return web.json_response({"uid": request.match_info["uid"]}, status=201)


async def _token(request: web.Request) -> web.Response:
    return web.json_response({"token": request.match_info["uid"]})


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    relay = Relay()
    app = web.Application()
    app.router.add_get("/v1/ws", relay.ws)
    app.router.add_put("/v1/users/{uid}", _put_user)
    app.router.add_post("/v1/users/{uid}/tokens", _token)
    app.router.add_get("/healthz", _health)
    return app


async def _serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    print(f"relay: ready on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tidings.bench.relay", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    args: Any = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("the relay listens on loopback only")
    import uvloop

    uvloop.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
