"""The Mosquitto peer of `tidings bench compare`: the MQTT 3.1.1 codec, 1:1 runs through
the DirectPeer interface, and the room fan-out. Needs Mosquitto (scripts/bench-peers.sh):
without it these tests fail with that hint, they are not skipped."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random

import pytest

from tidings.bench import peer_mqtt as m
from tidings.bench.peers import SETUP_HINT, port_open


def _cores() -> tuple[list[int], list[int]]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[:1], cpus[1:]) if len(cpus) >= 2 else ([], [])


# ------------------------------------------------------------------ codec


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (1, 1),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
        (268_435_455, 4),
    ],
)
def test_remaining_length_round_trip(value: int, size: int) -> None:
    raw = m.encode_length(value)
    assert len(raw) == size
    assert m.decode_length(b"\xaa" + raw + b"rest", 1) == (value, 1 + size)
    for cut in range(size):  # every prefix is incomplete, not wrong
        assert m.decode_length(raw[:cut], 0) is None


def test_remaining_length_limits() -> None:
    assert m.encode_length(321) == bytes([0xC1, 0x02])  # the spec's example
    with pytest.raises(ValueError):
        m.encode_length(268_435_456)
    with pytest.raises(ValueError):
        m.encode_length(-1)
    with pytest.raises(m.ProtocolError):
        m.decode_length(b"\xff\xff\xff\xff\x7f", 0)


def test_packets_round_trip() -> None:
    parser = m.Parser()
    stream = (
        m.connect("client-1", keepalive=30)
        + m.connack(0, session_present=True)
        + m.subscribe(7, [("a/b", 1), ("c", 0)])
        + m.suback(7, [1, 0x80])
        + m.publish("t/x", b"hello", qos=0)
        + m.publish("t/y", b"z" * 300, qos=1, packet_id=65535, dup=True)
        + m.puback(513)
        + m.PINGREQ_PACKET
        + m.PINGRESP_PACKET
        + m.DISCONNECT_PACKET
    )
    packets = parser.feed(stream)
    assert [p[0] for p in packets] == [
        m.CONNECT,
        m.CONNACK,
        m.SUBSCRIBE,
        m.SUBACK,
        m.PUBLISH,
        m.PUBLISH,
        m.PUBACK,
        m.PINGREQ,
        m.PINGRESP,
        m.DISCONNECT,
    ]
    assert m.parse_connect(packets[0][2]) == ("client-1", 30, True)
    assert m.parse_connack(packets[1][2]) == (True, 0)
    assert packets[2][1] == 0x02  # SUBSCRIBE's reserved flags
    assert m.parse_subscribe(packets[2][2]) == (7, [("a/b", 1), ("c", 0)])
    assert m.parse_suback(packets[3][2]) == (7, [1, 0x80])
    assert m.parse_publish(packets[4][1], packets[4][2]) == ("t/x", 0, 0, b"hello")
    assert packets[5][1] == 0x0A  # DUP, QoS 1, no retain
    assert m.parse_publish(packets[5][1], packets[5][2]) == ("t/y", 1, 65535, b"z" * 300)
    assert m.parse_packet_id(packets[6][2]) == 513
    assert all(p[2] == b"" for p in packets[7:])
    assert parser.take_rest() == b""


def test_publish_header_is_the_head_of_publish() -> None:
    for qos in (0, 1):
        payload = b"p" * 200  # a two-byte remaining length
        head = m.publish_header("room/1", qos, len(payload))
        pid = b"\x01\x02" if qos else b""
        assert head + pid + payload == m.publish("room/1", payload, qos=qos, packet_id=258)


def test_parser_across_reads() -> None:
    """A stream cut anywhere, a PUBLISH split inside its varint and its topic included,
    gives the same packets as the whole stream at once."""
    stream = b"".join(
        m.publish(f"t/{i}", bytes([i]) * (i * 37 % 400), qos=i % 2, packet_id=i + 1)
        for i in range(60)
    )
    whole = m.Parser().feed(stream)
    assert len(whole) == 60
    one = m.Parser()
    assert [p for b in range(len(stream)) for p in one.feed(stream[b : b + 1])] == whole
    rng = random.Random(7)
    for _ in range(20):
        parser = m.Parser()
        got = []
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 700)
            got += parser.feed(stream[pos : pos + step])
            pos += step
        assert got == whole
    first = m.publish("topic", b"x" * 200, qos=1, packet_id=9)  # varint is bytes 1-2
    parser = m.Parser()
    assert parser.feed(first[:2]) == []
    assert parser.feed(first[2:9]) == []
    (packet,) = parser.feed(first[9:])
    assert m.parse_publish(packet[1], packet[2]) == ("topic", 1, 9, b"x" * 200)


def test_parser_rejects_garbage() -> None:
    with pytest.raises(m.ProtocolError):
        m.Parser().feed(b"\x00\x00")
    with pytest.raises(m.ProtocolError):
        m.Parser(max_packet=100).feed(b"\x30" + m.encode_length(101))
    with pytest.raises(m.ProtocolError):
        m.parse_publish(0x06, b"\x00\x01t")  # QoS 3


# ------------------------------------------------------------------ Mosquitto


def test_missing_mosquitto_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> str:
        raise RuntimeError(f"mosquitto is not installed: {SETUP_HINT}")

    monkeypatch.setattr(m, "mosquitto_bin", missing)
    with pytest.raises(RuntimeError, match=r"bench-peers\.sh"):
        m.MosquittoPeer(0).start([])


def test_p2p_qos1_delivers_every_message_once_in_order() -> None:
    """2 pairs, 50 msgs/s, 2 s at QoS 1: the load generator's results, merged by
    report.summarise, show every message delivered once and in order, every PUBACK."""
    server, client = _cores()
    peer = m.MosquittoPeer(qos=1)
    assert peer.name == "mqtt-qos1"
    pairs = peer.make_pairs(2, "n0")
    assert pickle.loads(pickle.dumps(pairs)) == pairs
    assert len({p[2] for p in pairs}) == 2
    peer.start(server)
    try:
        assert peer.url == f"mqtt://127.0.0.1:{peer.port}" and peer.port != 1883
        assert "max_inflight_messages 65535" in peer.config
        row = m.run_p2p(peer, 2, 50, 2, warmup=0.5, grace=3, client_cores=client)
    finally:
        peer.stop()
    assert peer.exit_code == 0, peer.last_log
    assert not port_open("127.0.0.1", peer.port)
    counts = row["counts"]
    assert counts["sent"] == 125 and counts["send_failed"] == 0
    assert counts["delivered"] == counts["sent"] == counts["answered"]
    assert counts["acks_out"] == counts["sent"]  # the recipients PUBACK each message
    assert row["lost"] == row["duplicated"] == row["reordered"] == 0
    assert counts["unanswered"] == counts["foreign"] == 0
    assert not row["errors"] and not row["closes"]
    assert row["samples"] > 0 and row["ack_p50_ms"] > 0
    assert row["server_cpu_s"] is not None and row["client_cpu_pct"] >= 0


@pytest.mark.parametrize("qos", [0, 1])
def test_room_every_viewer_gets_every_post(qos: int) -> None:
    """200 viewers (20 of them timing every post, the rest counting), 2 senders,
    20 posts/s for 2 s: every post reaches every viewer once."""
    server, client = _cores()
    r = m.run_room(200, 2, 20, 2, qos=qos, server_cores=server, client_cores=client, sample=20)
    assert r["peer"] == f"mosquitto-qos{qos}"
    assert r["connected"] == r["viewers_alive"] == 200 and r["failed_connections"] == 0
    assert r["posts_sent"] == 40
    assert r["deliveries"] == 40 * 200
    assert r["lost"] == r["duplicates"] == r["foreign_packets"] == 0
    assert r["timed_viewers"] == 20 and r["timed_deliveries"] == 40 * 20
    if qos:
        assert r["posts_answered"] == 40
    for key in (
        "server_cpu_s",
        "server_cpu_pct",
        "deliveries_per_server_cpu_s",
        "server_cpu_us_per_delivery",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "join_s",
    ):
        assert r[key] is not None and r[key] >= 0, key
    assert r["deliveries_per_s"] == 40 * 200 / 2
    assert not r["behind"] and not r["drain_capped"] and r["delivery_span_s"] is not None
    assert r["server_rss_kb"]["joined"] and r["server_exit_code"] == 0
    assert not multiprocessing.active_children()
