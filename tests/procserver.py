"""Run `tidings serve` as a real child process (for SIGKILL / SIGTERM tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, data_dir: str, **settings: Any) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.tcp_port = free_port()
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(data_dir, "server.log")

    def start(self, env: dict[str, str] | None = None, **settings: Any) -> ServerProcess:
        """Start it (``env``: extra environment, e.g. TIDINGS_FAULTS) and wait for health."""
        os.makedirs(self.data_dir, exist_ok=True)
        merged = {"log_level": "WARNING", **self.settings, **settings}
        args = [
            sys.executable,
            "-m",
            "tidings",
            "serve",
            "--data-dir",
            self.data_dir,
            "--port",
            str(self.port),
            "--tcp-port",
            str(self.tcp_port),
        ]
        for k, v in merged.items():
            args += ["--set", f"{k}={v}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        # Its own process group: with --workers the supervisor's workers go down with it.
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                self.health()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.read_log()}") from None
                time.sleep(0.05)
        raise RuntimeError("server did not start")

    def read_log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()

    @property
    def admin_key(self) -> str:
        if "admin_key" in self.settings:
            return str(self.settings["admin_key"])
        with open(os.path.join(self.data_dir, "admin.key")) as fh:
            return fh.read().strip()

    def http(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.admin_key}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            data = r.read()
        return json.loads(data) if data else None

    def health(self) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
            return json.loads(r.read())

    def token(self, uid: str, device: str) -> str:
        self.http("PUT", f"/v1/users/{uid}", {})
        return str(
            self.http("POST", f"/v1/users/{uid}/tokens", {"device": device, "platform": "bot"})[
                "token"
            ]
        )

    def history(self, conv: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        before = 0
        while True:
            page = self.http("GET", f"/v1/conversations/{conv}/messages?before={before}&limit=100")
            out = page["msgs"] + out
            if not page["more"]:
                return out
            before = page["msgs"][0]["seq"]

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers included
            self.proc.wait(10)


async def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
