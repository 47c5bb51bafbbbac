"""Real PostgreSQL and Redis servers for the tests and benchmarks, each started in a
temporary directory on a free loopback port and stopped at the end (never a running
system service).

scripts/test.sh installs Debian's ``postgresql`` and ``redis-server``; when a binary is
missing here that is an error, not a skip. PostgreSQL refuses to run as root, so as root
the cluster is made and run as the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tidings.bench.procs import child_setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (run scripts/test.sh)")
    return path


def _version_key(path: str) -> int:
    part = path.split("/")[4]
    return int(part) if part.isdigit() else 0


class Postgres:
    """A throwaway PostgreSQL cluster. ``dsn`` names database ``postgres``; each test
    makes its own database with ``new_database()``."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="tidings-pg-")
        self.port = free_port()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._n = 0
        subprocess.run(
            [
                *self._as_user,
                _pg_bin("initdb"),
                "-D",
                self.data,
                "-U",
                "tidings",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    @property
    def data(self) -> str:
        return os.path.join(self.dir, "data")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # (as root: runuser's, the postmaster is below it)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://tidings@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        # fsync off for the suite's speed only (the benchmarks run with it on); commits
        # still happen in order, and killing Tidings never kills this server.
        self.proc = subprocess.Popen(
            [
                *self._as_user,
                _pg_bin("postgres"),
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                self.dir,
                "-c",
                f"fsync={'on' if self.fsync else 'off'}",
                "-c",
                "max_connections=300",
                "-c",
                "shared_buffers=64MB",
                "-c",
                "track_commit_timestamp=on",
                "-c",
                "log_min_messages=fatal",
                "-c",
                "logging_collector=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_setup([], signal.SIGTERM),  # runuser passes it on
        )
        _wait_port(self.port, self.proc, "postgres")
        # Accepting TCP comes a moment before accepting sessions.
        deadline = time.monotonic() + 30
        while (
            subprocess.run(
                [_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "tidings"],
                stdout=subprocess.DEVNULL,
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not accept sessions")
            time.sleep(0.05)

    def stop(self, *, fast: bool = True) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT if fast else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def new_database(self) -> str:
        """A fresh empty database; returns its DSN."""
        self._n += 1
        name = f"t{self._n}_{os.getpid()}"
        subprocess.run(
            [
                _pg_bin("psql"),
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "tidings",
                "-d",
                "postgres",
                "-c",
                f"CREATE DATABASE {name}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return self.dsn(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """A throwaway Redis server without persistence."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tidings-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server is not installed (run scripts/test.sh)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_setup([], signal.SIGKILL),
        )
        _wait_port(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def postgres_server(*, fsync: bool = False) -> Iterator[Postgres]:
    pg = Postgres(fsync=fsync)
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()


@contextmanager
def redis_server() -> Iterator[Redis]:
    r = Redis()
    try:
        r.start()
        yield r
    finally:
        r.cleanup()
