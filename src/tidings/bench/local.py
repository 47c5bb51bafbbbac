"""The server side of a bench: a local server process and the admin API."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import IO, Any

import aiohttp

from tidings.bench.procs import child_setup

HEALTH_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
ADMIN_CONCURRENCY = 16
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class LocalServer:
    """``python -m tidings serve`` in its own process, pinned to ``cores``."""

    settings: dict[str, str]
    cores: list[int]
    data_dir: str = ""
    keep: bool = False
    port: int = 0
    tcp_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _log: IO[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    _pin: Any = None

    def start(self) -> None:
        if not self.data_dir:
            self._tmp = tempfile.TemporaryDirectory(prefix="tidings-bench-")
            self.data_dir = self._tmp.name
        os.makedirs(self.data_dir, exist_ok=True)
        self.port = free_port()
        self.tcp_port = free_port()
        self.argv = [
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--data-dir",
            self.data_dir,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--tcp-port",
            str(self.tcp_port),
        ]
        for key, value in self.settings.items():
            self.argv += ["--set", f"{key}={value}"]
        self.log_path = os.path.join(self.data_dir, "server.log")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._pin = child_setup(self.cores)
        self._spawn()

    def _spawn(self) -> None:
        env = dict(os.environ)
        env.pop("TIDINGS_ADMIN_KEY", None)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=self._pin,
            env=env,
        )
        self._wait_healthy()

    def restart(self) -> int | None:
        """SIGTERM (the server drains), then the same command again on the same ports and
        data; returns the old process's exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._spawn()
        return code

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        url = f"http://{LOOPBACK}:{self.port}/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server did not become healthy:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def admin_key(self) -> str:
        with open(os.path.join(self.data_dir, "admin.key")) as fh:
            return fh.read().strip()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return b"\n".join(fh.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        code: int | None = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None and not self.keep:
            self._tmp.cleanup()
            self._tmp = None
        return code


async def create_users(
    base_url: str, admin_key: str, uids: list[str], device: str | None
) -> dict[str, str]:
    """PUT each user and (unless ``device`` is None) issue one bot-device token each;
    returns uid -> token."""
    headers = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
    sem = asyncio.Semaphore(ADMIN_CONCURRENCY)
    tokens: dict[str, str] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:

        async def one(uid: str) -> None:
            async with sem:
                async with http.put(f"{base_url}/v1/users/{uid}", data=b"{}") as resp:
                    if resp.status not in (200, 201):
                        raise RuntimeError(f"PUT user {uid}: {resp.status} {await resp.text()}")
                if device is None:
                    return
                body = {"device": device, "platform": "bot"}
                async with http.post(f"{base_url}/v1/users/{uid}/tokens", json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"token for {uid}: {resp.status} {await resp.text()}")
                    tokens[uid] = str((await resp.json())["token"])

        await asyncio.gather(*(one(u) for u in uids))
    return tokens


class LocalRelay:
    """The ceiling peer (``tidings.bench.relay``) in its own process, pinned like the
    server: a :class:`~tidings.bench.peers.DirectPeer` loaded by Tidings' own load
    generators (it speaks just enough of the protocol for them)."""

    name = "relay"

    def __init__(self) -> None:
        self.port = free_port()
        self.argv = [sys.executable, "-m", "tidings.bench.relay", "--port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def worker(self) -> Callable[[Connection, dict[str, Any]], None]:
        from tidings.bench.worker import worker_main

        return worker_main

    def make_pairs(self, pairs: int, nonce: str) -> list[tuple[Any, ...]]:
        """The relay takes a user id as its token."""
        out: list[tuple[Any, ...]] = []
        for i in range(pairs):
            s, r = f"bench-{nonce}-{i}-s", f"bench-{nonce}-{i}-r"
            out.append((s, s, r, r))
        return out

    def start(self, cores: list[int]) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=child_setup(cores),
        )
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited ({self.proc.returncode})")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("the relay did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
