"""Load-generator processes: spawning them with a pipe, talking to them, stopping them.

The pipe protocol: a worker sends ``(kind, payload)`` tuples (``"ready"``, ``"result"``,
..., or ``("error", traceback)`` when it fails); the parent waits for the kind it wants
with :func:`recv_from`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any

Worker = tuple[multiprocessing.process.BaseProcess, Connection]
WorkerMain = Callable[[Connection, dict[str, Any]], None]


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: a child before exec only calls it


def child_setup(cores: list[int] | set[int], sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for a server a bench or a test starts: pinned to ``cores`` (every
    thread it makes inherits the mask; none: as it is), and sent ``sig`` when the process
    that started it dies, so one killed midway leaves no server busy on a core. The
    signal comes when the *thread* that started the child exits: call it from the main
    thread."""
    mask = set(cores)
    parent = os.getpid()

    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            _libc.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), sig)
        if mask:
            os.sched_setaffinity(0, mask)

    return setup


def spawn(target: WorkerMain, cfg: dict[str, Any]) -> Worker:
    """Start ``target(child_end, cfg)`` in a fresh (spawned, daemon) process."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, cfg), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def stop_workers(workers: list[Worker], *, join_s: float = 10.0, kill: bool = True) -> None:
    """Wait ``join_s`` for each worker to exit, then terminate it (and, with ``kill``,
    kill it if it is still there 5 s later); close the pipes."""
    for proc, conn in workers:
        proc.join(join_s)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if kill and proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()


def recv_from(
    conn: Connection,
    deadline: float,
    want: str,
    *,
    poll_s: float = 1.0,
    tick: Callable[[], None] | None = None,
) -> Any:
    """The payload of the next ``want`` message on ``conn`` (other kinds are skipped) by
    ``deadline`` (monotonic). ``tick`` runs after every wait of at most ``poll_s``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"a load generator did not answer {want!r} in time")
        if conn.poll(min(left, poll_s)):
            try:
                kind, payload = conn.recv()
            except EOFError:
                raise RuntimeError(f"a load generator died before {want!r}") from None
            if kind == "error":
                raise RuntimeError(f"load generator failed:\n{payload}")
            if kind == want:
                return payload
        if tick is not None:
            tick()


def sleep_until(t: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``t``."""
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def rss_kb(pid: int) -> int | None:
    """A process's resident memory (KB), or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pin(cores: list[int]) -> None:
    """Pin this process to ``cores`` (none: leave it as it is)."""
    if cores:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(cores))


def run_async_worker(
    conn: Connection,
    cfg: dict[str, Any],
    run: Callable[[Connection, dict[str, Any]], Coroutine[Any, Any, None]],
) -> None:
    """The body of an asyncio load-generator process: pinned to ``cfg["cores"]``, on
    uvloop where installed; a failure goes to the parent as ``("error", traceback)``."""
    pin(cfg.get("cores") or [])
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    try:
        asyncio.run(run(conn, cfg))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
