"""The python-socketio peer of `tidings bench compare`: its Engine.IO / Socket.IO
reading, and a real room fan-out run against python-socketio (installed by
scripts/bench-peers.sh; without it the run fails with that hint)."""

from __future__ import annotations

import os
import struct

import pytest

from tidings.bench.peer_socketio import (
    MarkerCounter,
    PacketReader,
    event_frame,
    event_t0,
    parse_packet,
    run_room,
)
from tidings.bench.peers import peer_python


def server_frame(payload: bytes) -> bytes:
    """A server's (unmasked) text frame."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x81, n) + payload
    return struct.pack("!BBH", 0x81, 126, n) + payload


MSG = b'42["msg",{"room":"bench","text":"hi","k":7,"t0":1700000000123456}]'


def test_parse_packet_kinds() -> None:
    assert parse_packet(b'0{"sid":"abc","upgrades":[]}') == (
        "0",
        "",
        None,
        b'{"sid":"abc","upgrades":[]}',
    )
    assert parse_packet(b"2") == ("2", "", None, b"")
    assert parse_packet(b'40{"sid":"x"}') == ("4", "0", None, b'{"sid":"x"}')
    assert parse_packet(b'431["ok"]') == ("4", "3", 1, b'["ok"]')
    assert parse_packet(b'42/chat,17["msg",{}]') == ("4", "2", 17, b'["msg",{}]')
    assert parse_packet(b"") == ("", "", None, b"")
    assert event_t0(parse_packet(MSG)) == 1700000000123456
    assert event_t0(parse_packet(b'42["other",{"t0":5}]')) is None
    assert event_t0(parse_packet(b'431["ok"]')) is None
    assert event_t0(parse_packet(b"42[")) is None  # broken JSON is no post


def test_packet_reader_split_and_joined_reads() -> None:
    """Frames cut anywhere by the reads, and several in one read, come out whole."""
    big = b'42["msg",{"room":"bench","text":"' + b"x" * 300 + b'","t0":42}]'
    stream = b"".join(server_frame(p) for p in (b'0{"sid":"s"}', b"2", MSG, big, b'431["ok"]', MSG))
    whole = PacketReader().feed(stream)  # all in one read
    assert [(p.eio, p.sio) for p in whole] == [
        ("0", ""),
        ("2", ""),
        ("4", "2"),
        ("4", "2"),
        ("4", "3"),
        ("4", "2"),
    ]
    assert [event_t0(p) for p in whole] == [
        None,
        None,
        1700000000123456,
        42,
        None,
        1700000000123456,
    ]
    for size in (1, 2, 3, 7, 64, 129):  # every cut, including inside headers
        reader = PacketReader()
        got = []
        for i in range(0, len(stream), size):
            got += reader.feed(stream[i : i + size])
        assert got == whole, size
        assert reader.pending == b""
    reader = PacketReader()
    assert reader.feed(stream[:-3]) == whole[:-1]
    assert reader.pending == stream[-len(server_frame(MSG)) : -3]


def test_marker_counter_counts_posts_and_pings_once() -> None:
    stream = b"".join(server_frame(p) for p in (MSG, b"2", MSG, MSG, b"2", b'431["ok"]', MSG))
    for size in (1, 2, 5, 9, 10, 50, len(stream)):
        counter = MarkerCounter()
        msgs = pings = 0
        for i in range(0, len(stream), size):
            m, p = counter.feed(stream[i : i + size])
            msgs, pings = msgs + m, pings + p
        assert (msgs, pings) == (4, 2), size


def test_event_frame_is_a_masked_socketio_event() -> None:
    frame = event_frame("join", "bench", ack=1)
    assert frame[0] == 0x81 and frame[1] & 0x80  # final text frame, masked
    assert frame[6:] == b'421["join","bench"]'  # the zero mask: the payload as is
    assert event_frame("post", {"t0": 1})[6:] == b'42["post",{"t0":1}]'


def test_room_fanout_against_python_socketio() -> None:
    """A real run: every post reaches every viewer, timed, with the server's CPU."""
    try:
        peer_python("socketio")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    cpus = sorted(os.sched_getaffinity(0))
    server_cores, client_cores = (cpus[:1], cpus[1:]) if len(cpus) >= 2 else ([], [])
    r = run_room(100, 2, 20.0, 2.0, server_cores=server_cores, client_cores=client_cores, sample=20)
    assert r["peer"] == "python-socketio"
    assert r["aborted"] is None, r.get("server_log_tail")
    assert r["connected"] == r["viewers_alive"] == 100, r["failures"]
    assert r["posts"] == 40 and r["sender_errors"] == 0
    assert r["deliveries"] == r["posts"] * 100 == r["expected_deliveries"]
    assert r["lost"] == 0
    assert r["sender_deliveries"] == 40 * 2  # the broadcast includes the poster
    assert r["timed_deliveries"] == 40 * 20
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["deliveries_per_s"] > 0
    assert r["server_cpu_s"] > 0 and r["server_cpu_pct"] > 0
    assert r["deliveries_per_server_cpu_s"] > 0 and r["server_cpu_us_per_delivery"] > 0
    assert r["server_rss_kb"]["joined"] > 0 and r["join_s"] > 0
    assert r["versions"]["python-socketio"] == "5.18.1"
    assert r["server_exit_code"] in (0, None)


def test_viewers_answer_pings() -> None:
    """With a short heartbeat the lean clients keep their connections by answering
    pings (and the drain ends with the posts, not with the pings)."""
    try:
        peer_python("socketio")
    except RuntimeError as exc:
        pytest.fail(str(exc))
    r = run_room(20, 1, 10.0, 2.0, server_cores=[], client_cores=[], ping_interval_s=0.3)
    assert r["viewers_alive"] == 20 and r["lost"] == 0
    assert r["pongs"] >= 20 * 4
    assert not r["drain_capped"] and r["drain_s"] < 5
