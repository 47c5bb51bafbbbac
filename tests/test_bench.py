"""`tidings bench direct` runs end to end and reports what docs/benchmarks.md promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`tidings bench ARGS` in a child process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tidings", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("transport", ["ws", "tcp"])
def test_bench_direct_small_run(tmp_path: Path, transport: str) -> None:
    """A short sweep starts its own server, measures, validates and writes the JSON."""
    out = tmp_path / "bench.json"
    proc = bench(
        "direct",
        "--pairs",
        "4",
        "--rate",
        "100,200",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--grace",
        "3",
        "--transport",
        transport,
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "offered/s" in proc.stdout and "rate_per_s=" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["runs"]
    assert [r["offered_per_s"] for r in rows] == [100, 200]
    for row in rows:
        for key in (
            "msgs_per_s",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "ack_p99_ms",
            "lost",
            "duplicated",
            "reordered",
            "server_cpu_us_per_msg",
            "client_cpu_pct",
        ):
            assert key in row, key
        assert row["valid"], row.get("reasons")
        assert row["lost"] == row["duplicated"] == row["reordered"] == 0
        assert row["msgs_per_s"] >= 0.99 * row["offered_per_s"]
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"]


def test_bench_flags_an_invalid_run(tmp_path: Path) -> None:
    """A run whose sends are refused is reported INVALID with reasons, exit status 1."""
    out = tmp_path / "bench.json"
    proc = bench(
        "direct",
        "--pairs",
        "2",
        "--rate",
        "50",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--grace",
        "2",
        "--server-set",
        "max_pending_writes=0",
        "--json",
        str(out),
    )
    assert proc.returncode != 0
    assert "INVALID" in proc.stdout
    row = json.loads(out.read_text())["runs"][0]
    assert not row["valid"] and row["reasons"]


def test_bench_sync_small_run(tmp_path: Path) -> None:
    """`tidings bench sync` seeds a user, measures the return of a device and a new device,
    checks what they hold, and writes `sync_ms` to the JSON."""
    out = tmp_path / "sync.json"
    argv = ["sync", "--conversations", "30"]
    argv += ["--missed", "300", "--history", "25", "--page", "20", "--repeat", "2"]
    proc = bench(*argv, "--sync-limit", "100", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["bench"] == "sync" and len(report["runs"]) == 2
    assert 0 < report["sync_ms"] < report["target_ms"]
    assert report["new_device_ms"] > 0
    for run in report["runs"]:
        # The device first got the newest 20 of 25 (tail), then the 10 it missed: 30 per
        # conversation; at 100 entries per answer that takes 3+ answers.
        assert run["entries_held"] == 30 * 30 and run["answers"] >= 3
    assert "meets the 500 ms target" in proc.stdout


def test_bench_sync_refuses_bad_arguments() -> None:
    proc = bench("sync", "--conversations", "0", timeout=60)
    assert proc.returncode == 2 and "--conversations out of range" in proc.stderr


KEYS = ("deliveries_per_s", "deliveries_per_server_cpu_s", "p50_ms", "p99_ms", "lost_high_priority")


def test_bench_room_small_run(tmp_path: Path) -> None:
    """`tidings bench room` runs a small room end to end: every viewer is in, every
    post is timed at the sampled viewers, no gift is lost, the JSON has the keys."""
    out = tmp_path / "room.json"
    proc = bench(
        "room",
        "--viewers",
        "60",
        "--senders",
        "3",
        "--rate",
        "40",
        "--duration",
        "2",
        "--sample",
        "10",
        "--json",
        str(out),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert all(r[k] is not None for k in KEYS), r
    assert r["connected"] == 60 and r["alive_at_end"] == 60
    assert r["lost_high_priority"] == 0 and r["high_priority_sent"] == 8
    # 40 posts/s stays under the render budget: every viewer gets every post.
    assert r["delivered"] == 60 * r["posts_sent"]
    assert "lost high" in proc.stdout


def test_bench_group_small_run(tmp_path: Path) -> None:
    """`tidings bench group` builds a group through the bulk API and every online
    member gets every stored message."""
    out = tmp_path / "group.json"
    proc = bench(
        "group",
        "--members",
        "300",
        "--online",
        "50",
        "--rate",
        "10",
        "--duration",
        "2",
        "--json",
        str(out),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert all(r[k] is not None for k in KEYS), r
    assert r["messages_stored"] == 20 and r["members_counted"] == 50
    assert r["missing_deliveries"] == 0 and r["delivered"] == 50 * 20


def test_bench_room_refuses_bad_arguments() -> None:
    for bad in (["--viewers", "0"], ["--rate", "-1"], ["--high-share", "2"], ["--tick-ms", "500"]):
        proc = bench("room", *bad, timeout=60)
        assert proc.returncode != 0 and "must be in" in proc.stderr, (bad, proc.stderr)


def test_bench_connections_small_run(tmp_path: Path) -> None:
    """Login storm, idle hold with heartbeats and a restart: every connection logs in,
    every ping is answered, every client is back and synced after the restart, and the
    JSON holds the figures docs/benchmarks.md quotes."""
    out = tmp_path / "conns.json"
    proc = bench(
        "connections",
        "--connections",
        "300",
        "--hold",
        "2",
        "--heartbeat",
        "1",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert (r["ready"], r["failed"], r["back"], r["back_failed"]) == (300, 0, 300, 0)
    assert r["saw_close"] == 300 and r["restart_old_exit_code"] == 0
    assert r["logins_per_s"] > 0 and r["login_server_cpu_us"] > 0
    assert r["hold_pings"] >= 300 and r["hold_pongs"] == r["hold_pings"]
    assert r["rss_kb_per_conn"] is not None and r["kb_per_conn"] is not None
    assert r["restart_all_back_s"] > 0 and r["heartbeat_cpu_us_per_ping"] > 0
    assert "login storm" in proc.stdout and "all back and synced" in proc.stdout
    assert r["settings"]["client_wait"] == "poll"


def test_bench_connections_refuses_bad_arguments() -> None:
    proc = bench("connections", "--connections", "0")
    assert proc.returncode != 0 and "--connections" in proc.stderr
    proc = bench("connections", "--connections", "50000")
    assert proc.returncode != 0 and "--connections" in proc.stderr
    proc = bench("connections", "--client-wait", "nap")
    assert proc.returncode != 0 and "--client-wait" in proc.stderr


def test_bench_direct_one_worker_against_two(tmp_path: Path) -> None:
    """`--store postgres --workers 1,2` starts PostgreSQL and Redis itself, runs each
    set-up in turn and reports them side by side with ratios; more than one worker on
    SQLite is refused."""
    out = tmp_path / "cluster.json"
    proc = bench(
        "direct",
        "--store",
        "postgres",
        "--workers",
        "1,2",
        "--pairs",
        "4",
        "--rate",
        "100",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--no-pin",
        "--json",
        str(out),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert [s["workers"] for s in r["setups"]] == [1, 2]
    assert all(run["valid"] and run["lost"] == 0 for run in r["runs"])
    two = [c for c in r["comparison"] if c["workers"] == 2]
    assert two and "msgs_per_s_ratio" in two[0] and two[0]["postgres_cpu_us_per_msg"]
    assert "side by side" in proc.stdout
    proc = bench("direct", "--workers", "2")
    assert proc.returncode != 0 and "--store postgres" in proc.stderr


def test_bench_direct_against_the_relay_ceiling(tmp_path: Path) -> None:
    """`--peer relay` runs the same rates against Tidings and then against the minimal
    relay (no IM work), side by side with the ratios; the relay delivers every message
    too (it is a fair ceiling, not a sink)."""
    out = tmp_path / "relay.json"
    proc = bench(
        "direct",
        "--peer",
        "relay",
        "--pairs",
        "4",
        "--rate",
        "100",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert [s["label"] for s in r["setups"]] == ["tidings", "relay"]
    assert all(run["valid"] and run["lost"] == 0 for run in r["runs"])
    relay = [c for c in r["comparison"] if c["setup"] == "relay"]
    assert relay and relay[0]["msgs_per_s"] > 0 and "server_cpu_us_per_msg_ratio" in relay[0]
    proc = bench("direct", "--peer", "relay", "--store", "postgres")
    assert proc.returncode != 0 and "--peer" in proc.stderr


def test_bench_compare_room_side_by_side_rewrites_the_docs(tmp_path: Path) -> None:
    """`bench compare --quick --only room`: every room set-up (Tidings with and without
    coalescing, python-socketio, Mosquitto QoS 0 and 1) at each size delivers every
    post to every viewer, the ratios are computed, the plot is drawn, and the marked
    section of the given Markdown file is replaced (the rest of it kept)."""
    from tidings.bench.compare import BEGIN, END, ROOM_PNG, ROOM_SETUPS

    doc = tmp_path / "docs" / "bench.md"
    doc.parent.mkdir()
    doc.write_text(f"# Before\n\n{BEGIN}\nold table\n{END}\n\n# After\n")
    out = tmp_path / "out"
    proc = bench(
        "compare",
        "--quick",
        "--only",
        "room",
        "--out",
        str(out),
        "--docs",
        str(doc),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "compare.json").read_text())
    rows = res["rooms"]
    assert {(r["setup"], r["viewers"]) for r in rows} == {
        (s, v) for s in ROOM_SETUPS for v in (50, 200)
    }
    for r in rows:
        assert r["lost"] == 0, r
        assert r["deliveries_per_server_cpu_s"] and r["p99_ms"] is not None, r
    ratios = res["headline"]["room_ratios"]
    assert set(ratios) == (set(ROOM_SETUPS) - {"tidings"}) | {
        "tidings-no-coalescing/mqtt-qos0",
        "tidings-no-coalescing/mqtt-qos1",
    }
    text = doc.read_text()
    assert text.startswith("# Before") and text.rstrip().endswith("# After")
    assert "old table" not in text and "| 200 | python-socketio |" in text
    assert f"![server CPU per delivery against room size](img/{ROOM_PNG})" in text
    png = (doc.parent / "img" / ROOM_PNG).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    proc = bench("compare", "--only", "nothing")
    assert proc.returncode != 0 and "--only" in proc.stderr


def test_a_bench_killed_midway_leaves_no_server_behind(tmp_path: Path) -> None:
    """The servers a bench starts die with it (SIGTERM on the bench's death): a bench
    killed by a timeout must not leave a server busy on a core it pinned."""
    import os
    import signal
    import time

    script = (
        "import sys, time\n"
        "from tidings.bench.local import LocalServer\n"
        f"s = LocalServer({{}}, [], data_dir={str(tmp_path / 'data')!r})\n"
        "s.start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    bench_proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert bench_proc.stdout is not None
    server_pid = int(bench_proc.stdout.readline())
    os.kill(server_pid, 0)  # it is running
    bench_proc.kill()
    bench_proc.wait()

    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while running(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(server_pid):
        os.kill(server_pid, signal.SIGKILL)
        raise AssertionError("the server outlived the bench that started it")
