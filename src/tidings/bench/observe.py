"""What the bench observes besides its own clients: CPU time from /proc, the machine.

A :class:`Snapshot` is taken at both ends of the measured window; :func:`window_figures`
turns the pair into the server's CPU (total, system, per thread: its event loop vs the
rest), everything else the machine ran meanwhile, and the hypervisor's steal time.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Any


def _stat_times_s(path: str) -> tuple[float, float] | None:
    try:
        with open(path) as fh:
            raw = fh.read()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_s(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of a process, all its threads, from /proc/<pid>/stat."""
    return _stat_times_s(f"/proc/{pid}/stat")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (a supervisor's workers, PostgreSQL's backends)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_s(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of ``pid`` and its descendants alive now, summed."""
    total: tuple[float, float] | None = None
    for p in descendants(pid):
        t = proc_cpu_s(p)
        if t is not None:
            total = t if total is None else (total[0] + t[0], total[1] + t[1])
    return total


def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, steal) seconds summed over all CPUs since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            first = fh.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    ticks = [int(v) for v in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    steal = ticks[7] if len(ticks) > 7 else 0
    busy = sum(ticks[:8]) - idle - steal  # guest time is already inside user
    tick = os.sysconf("SC_CLK_TCK")
    return busy / tick, steal / tick


def thread_cpu_s(pid: int) -> dict[int, tuple[float, float]]:
    """(utime, stime) of each thread of a process, by thread id."""
    out: dict[int, tuple[float, float]] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            times = _stat_times_s(f"/proc/{pid}/task/{tid}/stat")
            if times is not None:
                out[int(tid)] = times
    return out


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port``, when this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{inode}]")
        except OSError:
            continue
    if not inodes:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}") in inodes:
                        return int(entry)
        except OSError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    versions: dict[str, str] = {}
    for name in ("aiohttp", "msgspec", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "cpu_model": model,
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg": os.getloadavg(),
    }


def code_info() -> dict[str, Any]:
    """The tidings version and, when run from a git checkout, its commit and dirtiness."""
    from tidings import __version__

    info: dict[str, Any] = {"version": __version__}
    here = os.path.dirname(os.path.abspath(__file__))
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--", "."],
                cwd=os.path.dirname(here),
                capture_output=True,
                text=True,
                timeout=5,
            )
            info["dirty"] = bool(status.stdout.strip())
    return info


@dataclass
class Snapshot:
    server: tuple[float, float] | None = None  # (utime, stime) of the server process
    threads: dict[int, tuple[float, float]] = field(default_factory=dict)
    machine: tuple[float, float] | None = None  # (busy, steal) over all CPUs
    others: dict[str, tuple[float, float] | None] = field(default_factory=dict)


def snapshot(server_pid: int | None, others: dict[str, int] | None = None) -> Snapshot:
    """CPU times now: the server (with its workers, if it is a supervisor), its threads,
    the machine, and each of ``others`` (name -> pid, with their descendants)."""
    extra = {name: tree_cpu_s(pid) for name, pid in (others or {}).items()}
    if not server_pid:
        return Snapshot(machine=machine_cpu_s(), others=extra)
    return Snapshot(tree_cpu_s(server_pid), thread_cpu_s(server_pid), machine_cpu_s(), extra)


def others_cpu_s(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each of the other processes used between the snapshots."""
    out = {}
    for name, t1 in after.others.items():
        t0 = before.others.get(name)
        if t0 is not None and t1 is not None:
            out[name] = sum(t1) - sum(t0)
    return out


def server_cpu_s(before: Snapshot, after: Snapshot) -> float | None:
    if before.server is None or after.server is None:
        return None
    return sum(after.server) - sum(before.server)


def window_figures(
    before: Snapshot, after: Snapshot, server_pid: int | None, seconds: float
) -> dict[str, Any]:
    """Server CPU split by thread and by user/system, in % of one core over the window."""

    def pct(value: float) -> float:
        return round(100 * value / seconds, 1)

    out: dict[str, Any] = {}
    if before.server is not None and after.server is not None:
        out["server_sys_cpu_pct"] = pct(after.server[1] - before.server[1])
    if server_pid in before.threads and server_pid in after.threads:
        # The event loop is the main thread; the others are the SQLite writer,
        # checkpointer and reader threads.
        per_thread = []
        for tid, (u1, s1) in sorted(after.threads.items()):
            u0, s0 = before.threads.get(tid, (0.0, 0.0))
            per_thread.append(
                {
                    "tid": tid,
                    "loop": tid == server_pid,
                    "user_pct": pct(u1 - u0),
                    "sys_pct": pct(s1 - s0),
                }
            )
        loop = sum(t["user_pct"] + t["sys_pct"] for t in per_thread if t["loop"])
        rest = sum(t["user_pct"] + t["sys_pct"] for t in per_thread if not t["loop"])
        out["server_loop_cpu_pct"] = round(loop, 1)
        out["server_other_threads_cpu_pct"] = round(rest, 1)
        out["server_threads"] = [t for t in per_thread if t["user_pct"] or t["sys_pct"]]
    if before.machine is not None and after.machine is not None:
        out["machine_busy_pct"] = pct(after.machine[0] - before.machine[0])
        out["steal_pct"] = pct(after.machine[1] - before.machine[1])
    return out


def store_files(data_dir: str) -> dict[str, int]:
    """Sizes of the store's files: a WAL that only grows means it never restarts."""
    out: dict[str, int] = {}
    for name, suffix in (("server_db_bytes", ""), ("server_wal_bytes", "-wal")):
        with contextlib.suppress(OSError):
            out[name] = os.path.getsize(os.path.join(data_dir, "tidings.db" + suffix))
    return out
