"""Sans-I/O pieces: framing, codecs, ids, config; and the layering rule."""

from __future__ import annotations

import ast
import itertools
import os
import pathlib
from typing import Any

import msgspec
import pytest

from tidings.config import load_settings
from tidings.domain.ids import (
    MessageIdGenerator,
    direct_conversation_id,
    direct_members,
    message_id_time_ms,
    normalize_user_id,
)
from tidings.protocol.codec import CODECS, FrameError, check_json_model
from tidings.protocol.errors import TidingsError
from tidings.protocol.frames import Hello, Send
from tidings.protocol.framing import FramingError, TcpFrameDecoder, tcp_frame, ws_frame

SRC = pathlib.Path(__file__).parent.parent / "src" / "tidings"


def test_tcp_decoder_handles_split_and_joined_frames() -> None:
    """Frames split across reads and several frames in one read both decode."""
    d = TcpFrameDecoder(100, expect_preface=True, versions=frozenset({1}))
    data = b"TIDINGS\x01" + tcp_frame(b"abc") + tcp_frame(b"") + tcp_frame(b"x" * 50)
    out: list[bytes] = []
    for i in range(0, len(data), 3):
        out += d.feed(data[i : i + 3])
    assert out == [b"abc", b"", b"x" * 50] and d.version == 1


def test_tcp_decoder_refuses_on_length_prefix() -> None:
    """An oversize length is refused from the 4-byte prefix alone, nothing buffered."""
    d = TcpFrameDecoder(100, expect_preface=False, versions=frozenset({1}))
    with pytest.raises(FramingError) as e:
        d.feed((101).to_bytes(4, "big"))
    assert e.value.kind == "too_large" and d.buffered == 4


def test_tcp_decoder_preface_errors() -> None:
    """A wrong magic fails at the first wrong byte; an unknown version is reported."""
    with pytest.raises(FramingError) as e:
        TcpFrameDecoder(100, expect_preface=True, versions=frozenset({1})).feed(b"GET")
    assert e.value.kind == "preface"
    with pytest.raises(FramingError) as e:
        TcpFrameDecoder(100, expect_preface=True, versions=frozenset({1})).feed(b"TIDINGS\x02")
    assert e.value.kind == "version"


def test_ws_frame_header_sizes() -> None:
    """Server frames use the 7-bit, 16-bit and 64-bit length forms, unmasked."""
    assert ws_frame(b"a", 2)[:2] == b"\x82\x01"
    assert ws_frame(b"a" * 200, 1)[:4] == b"\x81\x7e\x00\xc8"
    big = ws_frame(b"a" * 70000, 2)
    assert big[:2] == b"\x82\x7f" and int.from_bytes(big[2:10], "big") == 70000


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_codec_classifies_errors(codec: str) -> None:
    """Decode errors say bad_frame / unknown_type / invalid and keep the request id."""
    c = CODECS[codec]
    enc = msgspec.json.encode if codec == "json" else msgspec.msgpack.encode
    assert isinstance(c.decode_client(enc({"t": "hello", "v": 1, "token": "x"})), Hello)
    cases = [
        (b"\xff\xfe", "bad_frame", 0),
        (enc({"t": "nope", "id": 4}), "unknown_type", 4),
        (enc({"t": "send", "id": 5, "cid": "c", "body": []}), "invalid", 5),
        (enc("string"), "bad_frame", 0),
        (enc({"t": 3, "id": 6}), "invalid", 6),
    ]
    for data, code, rid in cases:
        with pytest.raises(FrameError) as e:
            c.decode_client(data)
        assert (e.value.code, e.value.request_id) == (code, rid)
    send = c.decode_client(
        enc({"t": "send", "id": 1, "cid": "c", "to": "b", "body": {"text": "é"}})
    )
    assert isinstance(send, Send) and send.type == "text"


def test_json_model_check() -> None:
    """Only JSON-model values are accepted in bodies."""
    assert check_json_model({"a": [1, 2.5, None, True, "x", {"b": {}}]})
    assert not check_json_model({"a": b"bytes"})
    assert not check_json_model({1: "non-string key"})
    deep: dict[str, object] = {}
    cur = deep
    for _ in range(40):
        cur["x"] = {}
        cur = cur["x"]  # type: ignore[assignment]
    assert not check_json_model(deep)


def test_user_ids() -> None:
    """User ids are NFKC-normalised and case-folded; bad ones are `invalid`."""
    assert normalize_user_id("Ａlice") == "alice"
    assert normalize_user_id("Straße") == "strasse"
    for bad in ["", "a b", "a|b", "x" * 65, "tab\t", 5]:
        with pytest.raises(TidingsError):
            normalize_user_id(bad)  # type: ignore[arg-type]


def test_direct_conversation_ids() -> None:
    """The 1:1 conversation id is derived from the sorted pair."""
    assert direct_conversation_id("b", "a") == direct_conversation_id("a", "b") == "d:a|b"
    assert direct_members("d:a|b") == ("a", "b")
    assert direct_members("d:a") is None and direct_members("g:1") is None


def test_message_ids_increase_and_carry_time() -> None:
    """Ids strictly increase, even past 4096 per ms or when the clock steps back."""
    g = MessageIdGenerator(5)
    ids = [g.next(1_800_000_000_000) for _ in range(5000)]
    ids += [g.next(1_799_999_999_000)]  # clock stepped back
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert abs(message_id_time_ms(ids[0]) - 1_800_000_000_000) <= 1
    assert ids[-1] < 2**63


def test_settings_precedence(tmp_path: pathlib.Path) -> None:
    """Defaults < TOML < environment < explicit overrides; unknown keys are errors."""
    toml = tmp_path / "t.toml"
    toml.write_text(
        'port = 9000\ntcp-port = 9001\nrate_per_s = 7.5\nallowed_origins = ["http://a"]\n'
    )
    s = load_settings(
        str(toml),
        env={"TIDINGS_PORT": "9100", "TIDINGS_ALLOW_REGISTRATION": "off"},
        overrides={"tcp_port": 9200},
    )
    assert (s.port, s.tcp_port, s.rate_per_s) == (9100, 9200, 7.5)
    assert s.allow_registration is False and s.allowed_origins == ["http://a"]
    assert load_settings(env={"TIDINGS_CONFIG": str(toml)}).port == 9000
    (tmp_path / "bad.toml").write_text("prot = 1\n")
    with pytest.raises(ValueError):
        load_settings(str(tmp_path / "bad.toml"), env={})
    with pytest.raises(ValueError):
        load_settings(env={"TIDINGS_PORT": "eighty"})


FORBIDDEN_IN_PURE = {
    "asyncio",
    "socket",
    "sqlite3",
    "aiohttp",
    "uvloop",
    "threading",
    "selectors",
    "ssl",
    "subprocess",
}


@pytest.mark.parametrize("package", ["protocol", "domain"])
def test_pure_packages_do_no_io(package: str) -> None:
    """protocol/ and domain/ import nothing that does I/O (sans-I/O cores)."""
    for path in (SRC / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in FORBIDDEN_IN_PURE, f"{path.name} imports {name}"
                if name.startswith("tidings."):
                    assert name.split(".")[1] in ("protocol", "domain"), f"{path.name}: {name}"


def test_layering() -> None:
    """Dependencies point one way: services never import gateway/session/api."""
    for path in (SRC / "services").rglob("*.py"):
        text = path.read_text()
        for upper in ("tidings.gateway", "tidings.session", "tidings.api"):
            assert upper not in text, f"{path.name} imports {upper}"
    assert os.path.exists(SRC / "store" / "migrations" / "0001_init.sql")


def test_message_ids_stay_above_stored_ids_after_clock_step_back() -> None:
    """A generator seeded with the highest stored id never draws below it."""
    first = MessageIdGenerator(3)
    stored = first.next(1_800_000_000_000)
    restarted = MessageIdGenerator(3, after=stored)
    nxt = restarted.next(1_800_000_000_000 - 5_000)  # the clock went back 5 s
    assert nxt > stored
    assert restarted.next(1_800_000_000_000 + 10) > nxt


def _key_in_child(path: str, out: Any) -> None:
    from tidings.services.secrets import load_or_create

    out.put(load_or_create(path, ""))


def test_keys_made_once_when_workers_start_together(tmp_path: Any) -> None:
    """Eight processes making the signing key at the same moment (`--workers 8` on a new
    data directory) all end up with the one key, and the file is 0600 with no leftovers."""
    import multiprocessing
    import stat

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    path = str(tmp_path / "signing.key")
    procs = [ctx.Process(target=_key_in_child, args=(path, out)) for _ in range(8)]
    for p in procs:
        p.start()
    keys = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    assert len(set(keys)) == 1 and len(keys[0]) >= 40
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["signing.key"]


def test_token_checks_refuse_every_kind_of_bad_token() -> None:
    """The token check (HS256 only, constant-time signature, the claims' shape): a good
    token passes; any change, another algorithm even with the right key, a missing or
    wrong issuer, a non-integer or past expiry, a non-object payload and malformed
    segments are refused with a clear code."""
    import jwt

    from tidings.bus.memory import MemoryBus
    from tidings.clock import SystemClock
    from tidings.protocol.errors import TidingsError
    from tidings.services.accounts import Accounts

    key = "k" * 64

    def make_accounts() -> Accounts:
        return Accounts(
            None,  # type: ignore[arg-type]  # decoding reads no store
            MemoryBus(),
            SystemClock(),
            key,
            "admin",
            token_ttl_s=3600,
            allow_registration=False,
        )

    accounts = make_accounts()
    exp = int(SystemClock().now_ms() / 1000) + 3600
    good = {
        "iss": "tidings",
        "sub": "alice",
        "jti": "j",
        "dev": "d",
        "plat": "bot",
        "ims": 1,
        "exp": exp,
    }
    token = jwt.encode(good, key, algorithm="HS256")
    claims = accounts.decode(token)
    assert (claims.uid, claims.device, claims.expires_ms) == ("alice", "d", exp * 1000)

    def code_of(acc: Accounts, tok: object) -> str:
        with pytest.raises(TidingsError) as err:
            acc.decode(tok)  # type: ignore[arg-type]
        return err.value.code

    def code(tok: object) -> str:
        return code_of(accounts, tok)

    head, body, sig = token.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    assert code(f"{head}.{flipped}.{sig}") == "auth_failed"
    assert code(f"{head}.{body}.{sig[:-2]}AA") == "auth_failed"
    assert code(jwt.encode(good, key, algorithm="HS512")) == "auth_failed"
    assert code(jwt.encode(good, None, algorithm="none")) == "auth_failed"
    assert code(f"{head}.{body}.{sig[:-1]}é") == "auth_failed"
    assert code(f"{head}.{body}.{sig}=") == "auth_failed"  # padding is not base64url
    changes: list[dict[str, object]] = [
        {"iss": "other"},
        {"exp": str(exp)},
        {"exp": True},
        {"exp": float(exp)},
        {"exp": exp - 7200},
        {"dev": 5},
        {"ims": "1"},
        {"sub": ""},
    ]
    for change in changes:
        bad = {**good, **change}
        want = "token_expired" if change == {"exp": exp - 7200} else "auth_failed"
        assert code(jwt.encode(bad, key, algorithm="HS256")) == want, change
    no_iss = {k: v for k, v in good.items() if k != "iss"}
    assert code(jwt.encode(no_iss, key, algorithm="HS256")) == "auth_failed"
    no_dev = {k: v for k, v in good.items() if k != "dev"}
    assert code(jwt.encode(no_dev, key, algorithm="HS256")) == "auth_failed"
    import base64
    import hashlib
    import hmac

    def signed(h: bytes, p: bytes) -> str:
        enc = [base64.urlsafe_b64encode(x).rstrip(b"=").decode() for x in (h, p)]
        mac = hmac.new(key.encode(), ".".join(enc).encode(), hashlib.sha256).digest()
        return ".".join([*enc, base64.urlsafe_b64encode(mac).rstrip(b"=").decode()])

    # Headers are remembered only from valid tokens: forged ones cannot fill the cache.
    fresh = make_accounts()
    for i in range(40):
        forged_head = base64.urlsafe_b64encode(b'{"alg":"HS256","n":%d}' % i).rstrip(b"=")
        assert code_of(fresh, f"{forged_head.decode()}.{body}.{sig}") == "auth_failed"
    assert not fresh._hs256_heads
    fresh.decode(token)
    assert fresh._hs256_heads == {head}
    assert code(signed(b'{"alg":"HS256"}', b'["not","an","object"]')) == "auth_failed"
    assert code(signed(b'{"alg":"HS256"}', b"not json")) == "auth_failed"
    assert code(signed(b"[]", b"{}")) == "auth_failed"
    for junk in ("", "a.b", "a.b.c.d", "@@.@@.@@", f"{head}.{body}.", "x" * 5000, 42, None):
        assert code(junk) == "auth_failed", junk


def test_hub_sweep_sees_every_session_once_a_full_round() -> None:
    """The timer sweep: sessions still logging in and those with unacked pushes every
    round; every other session once in FULL_SWEEP_EVERY rounds (its share), including
    after others left; a session gone is swept no more."""
    import secrets
    from collections import Counter

    from tests.conftest import ManualClock
    from tidings.gateway.hub import FULL_SWEEP_EVERY, Hub
    from tidings.session.session import Session

    ticks: Counter[object] = Counter()

    class Fake:
        def __init__(self, i: int) -> None:
            self.uid, self.state, self.unacked_count = f"u{i % 7}", "ready", 0
            self.session_id = secrets.token_hex(8)
            self.rooms: set[str] = set()

        def tick(self, now: float) -> None:
            ticks[self] += 1

    hub = Hub(ManualClock())
    ready = [Fake(i) for i in range(60)]
    for s in ready:
        hub.register(s)  # type: ignore[arg-type]
    pending, busy = Fake(100), ready[0]
    hub.track(pending)  # type: ignore[arg-type]
    busy.unacked_count = 3
    hub.watch(busy)  # type: ignore[arg-type]
    gone = ready[1]
    hub.unregister(gone)  # type: ignore[arg-type]
    for _ in range(2 * FULL_SWEEP_EVERY):
        hub.sweep()
    assert ticks[pending] == ticks[busy] == 2 * FULL_SWEEP_EVERY
    assert ticks[gone] == 0
    assert all(ticks[s] == 2 for s in ready[2:]), sorted(ticks[s] for s in ready[2:])
    # The shares are even (each round sees about a quarter), real sessions included:
    # an object's own hash would put every Session in the same share.
    sizes = sorted(len(share) for share in hub._shares)
    assert sizes[0] >= 5, sizes
    real = Hub(ManualClock())
    for i in range(400):
        s = Session.__new__(Session)
        s.uid, s.rooms, s.session_id = f"r{i}", set(), secrets.token_hex(8)
        real.register(s)
    assert min(len(share) for share in real._shares) >= 60, [len(x) for x in real._shares]
