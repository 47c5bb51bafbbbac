"""Command line: ``tidings serve``, ``tidings bench``, ``tidings admin-key``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

from tidings.config import Settings, load_settings

log = logging.getLogger("tidings")


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {
        "host": args.host,
        "port": args.port,
        "tcp_port": args.tcp_port,
        "data_dir": args.data_dir,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "workers": getattr(args, "workers", None),
    }
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        overrides[key.strip().replace("-", "_")] = value
    return load_settings(args.config, overrides=overrides)


async def _serve(settings: Settings, worker: int | None = None) -> int:
    from tidings.app import Server
    from tidings.bus.base import BusUnavailable
    from tidings.protocol.errors import TidingsError

    server = Server(settings)
    try:
        await server.start()
    except (OSError, BusUnavailable, TidingsError) as exc:  # PostgreSQL or Redis away
        print(f"tidings: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        await server.abort()
        return 1
    # Start-up objects live for the whole run: keep them out of the cyclic collector, and
    # collect the young generation less often (allocation-heavy message path).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 50)
    who = "" if worker is None else f" (worker {worker}, pid {os.getpid()})"
    print(
        f"tidings: ready on http://{settings.host}:{server.http_port} "
        f"(tcp {server.tcp_port}){who}; admin key in "
        f"{os.path.join(settings.data_dir, 'admin.key')}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    await server.drain()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings_from(args)
    except (ValueError, OSError) as exc:  # bad settings: say which, no traceback
        print(f"tidings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if settings.workers > 1:
        return _supervise(settings)
    _install_uvloop()
    return asyncio.run(_serve(settings))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _supervise(settings: Settings) -> int:
    """``workers`` processes share the listening ports (SO_REUSEPORT: the kernel spreads
    new connections over them); each is a full server over the shared PostgreSQL and
    Redis. A worker that dies is started again; SIGTERM/SIGINT drain them all."""
    # Every worker must bind the same ports: fix "any free port" (0) here, once.
    if settings.port == 0:
        settings = settings.replace(port=_free_port(settings.host))
    if settings.tcp_port == 0:
        settings = settings.replace(tcp_port=_free_port(settings.host))
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def spawn(n: int) -> None:
        # Signals wait while forking: the child must not run the supervisor's handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
                _install_uvloop()
                code = asyncio.run(_serve(settings, worker=n))
            except BaseException:
                log.exception("worker %d failed", n)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = n
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("starting %d workers on port %d", settings.workers, settings.port)
    for n in range(settings.workers):
        spawn(n)
    restarts: list[float] = []
    gave_up = False
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        n = children.pop(pid, -1)
        if n < 0 or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10 * settings.workers:
            log.error("workers keep dying (last: %d, exit %d); giving up", n, code)
            gave_up = True
            stop(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with %d; starting it again", n, pid, code)
        time.sleep(0.2)
        if not stopping:  # (a SIGTERM may have come during the pause)
            spawn(n)
    return 1 if gave_up else 0


def cmd_admin_key(args: argparse.Namespace) -> int:
    from tidings.services.secrets import load_or_create

    settings = load_settings(args.config, overrides={"data_dir": args.data_dir})
    print(load_or_create(os.path.join(settings.data_dir, "admin.key"), settings.admin_key))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tidings.bench import direct, fanout, sync

    _install_uvloop()
    if args.scenario == "sync":
        return sync.main(args)
    if args.scenario == "connections":
        from tidings.bench import conns

        return conns.main(args)
    if args.scenario in ("room", "group"):
        return fanout.main(args, args.scenario)
    if args.scenario == "compare":
        from tidings.bench import compare

        return compare.main(args)
    return direct.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidings", description="Tidings instant-messaging server")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--config", help="TOML settings file (also TIDINGS_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="HTTP/WebSocket port (default 8080)")
    serve.add_argument("--tcp-port", type=int, help="raw TCP port (default 8081, -1: off)")
    serve.add_argument("--data-dir", help="data directory (default ./tidings-data)")
    serve.add_argument("--tls-cert", help="PEM certificate: enables TLS on every listener")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the ports (default 1; more need database_url and redis_url)",
    )
    serve.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other setting, e.g. --set rate_per_s=1000",
    )
    serve.set_defaults(func=cmd_serve)

    ak = sub.add_parser("admin-key", help="print the admin key (creating it if needed)")
    ak.add_argument("--config")
    ak.add_argument("--data-dir")
    ak.set_defaults(func=cmd_admin_key)

    bench = sub.add_parser("bench", help="load benchmarks")
    bsub = bench.add_subparsers(dest="scenario", required=True)
    from tidings.bench import direct, fanout, sync

    direct.add_arguments(bsub.add_parser("direct", help="durable 1:1 messaging, open loop"))
    sync.add_arguments(bsub.add_parser("sync", help="a device back after missing messages"))
    fanout.add_room_arguments(bsub.add_parser("room", help="a live room's fan-out"))
    fanout.add_group_arguments(bsub.add_parser("group", help="a large group's fan-out"))
    from tidings.bench import conns

    conns.add_arguments(bsub.add_parser("connections", help="idle connections, logins, restart"))
    from tidings.bench import compare

    compare.add_arguments(bsub.add_parser("compare", help="Tidings side by side with its peers"))
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
