"""What the peers of ``tidings bench compare`` share: where they are installed, how a
peer's server process is started pinned to the server's cores and stopped, and the
interface a peer offers to ``tidings bench direct`` (durable-1:1 comparisons).

The peers are installed by ``scripts/bench-peers.sh`` (never into this repository):
Mosquitto from Debian, Synapse and python-socketio each in a virtual environment of its
own under :func:`peers_dir`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import IO, Any, Protocol

from tidings.bench.procs import child_setup

SETUP_HINT = "run scripts/bench-peers.sh first"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def peers_dir() -> str:
    """Where scripts/bench-peers.sh put the peers' virtual environments."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "tidings-peers")
    return os.environ.get("TIDINGS_PEERS_DIR") or default


def peer_python(name: str) -> str:
    """The interpreter of peer ``name``'s virtual environment (``synapse``, ``socketio``)."""
    path = os.path.join(peers_dir(), name, "bin", "python")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"peer {name!r} is not installed at {path}: {SETUP_HINT}")
    return path


def mosquitto_bin() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(f"mosquitto is not installed: {SETUP_HINT}")
    return found


def start_pinned(
    argv: list[str],
    cores: list[int],
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    log: IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group, pinned to ``cores`` (every thread it
    makes inherits the mask), output to ``log`` (or nowhere)."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        preexec_fn=child_setup(cores),
        start_new_session=True,
    )


def wait_ready(
    proc: subprocess.Popen[bytes],
    what: str,
    probe: Callable[[], bool],
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Poll ``probe`` until it is true; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) while starting")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} was not ready within {timeout_s:g}s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def stop_group(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGTERM the process's group, then SIGKILL it after STOP_TIMEOUT_S."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode


class DirectPeer(Protocol):
    """A peer ``tidings bench direct --peer NAME`` runs the same rates against.

    ``worker`` is a module-level function (it is the target of a spawned process) that
    speaks the pipe protocol of :func:`tidings.bench.worker.worker_main`: it gets the
    config, sends ``("ready", info)`` once its connections are up, waits for
    ``("go", t0)``, sends message ``k`` at ``t0 + k / rate`` open loop and answers
    ``("result", dict)`` with the keys of ``worker._result`` (``report.summarise`` merges
    them). Its config has ``port``, ``rate``, ``warmup``, ``duration``, ``grace``,
    ``text``, ``cid_prefix``, ``cores`` and ``pairs``: this process's share of what
    :meth:`make_pairs` returned."""

    name: str
    port: int

    @property
    def pid(self) -> int: ...

    @property
    def url(self) -> str: ...

    def start(self, cores: list[int]) -> None: ...

    def stop(self) -> None: ...

    def make_pairs(self, pairs: int, nonce: str) -> list[tuple[Any, ...]]: ...

    @property
    def worker(self) -> Callable[[Connection, dict[str, Any]], None]: ...
