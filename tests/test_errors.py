"""Every row of the error-code table and every close code, provoked over real sockets.

Each test also checks that nothing was stored and that the server keeps serving others.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import msgspec
import pytest

from tests.conftest import Harness, next_message
from tests.rawclient import Raw
from tidings.client import RequestError
from tidings.protocol import close
from tidings.protocol.errors import KINDS


def err(frame: Any, code: str, rid: int | None = None) -> None:
    assert frame is not None, "connection closed instead of an error"
    assert frame["t"] == "error", frame
    assert frame["code"] == code, frame
    assert frame["retryable"] == KINDS[code].retryable
    assert isinstance(frame["message"], str) and frame["message"]
    if rid is not None:
        assert frame["id"] == rid


async def message_count(h: Harness) -> int:
    rows = await h.server.store.changed_conversations("alice", 0, 10_000)
    return sum(r.last_seq for r in rows)


async def authed(h: Harness, codec: str = "json", uid: str = "alice") -> Raw:
    raw = await Raw.ws(h.ws_url, codec)
    ready = await raw.login(await h.token(uid))
    assert ready["t"] == "ready"
    return raw


async def still_serving(h: Harness) -> None:
    """Another client can still send and receive."""
    a = await h.client("carol")
    b = await h.client("dave")
    await a.send(to="dave", text="still here")
    assert (await next_message(b)).message.body["text"] == "still here"


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_malformed_frames(harness: Harness, codec: str) -> None:
    """Garbage bytes are `bad_frame`; a non-object is `bad_frame`; the connection survives."""
    raw = await authed(harness, codec)
    await raw.send_bytes(b"\xc1{not valid" if codec == "msgpack" else b"{not json")
    err(await raw.recv(), "bad_frame", 0)
    await raw.send([1, 2, 3])
    err(await raw.recv(), "bad_frame")
    await raw.send({"t": "ping", "id": 5})
    assert (await raw.recv())["t"] == "pong"
    await raw.close()


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_unknown_type_and_wrong_field_types(harness: Harness, codec: str) -> None:
    """Unknown `t` is `unknown_type`; a wrong field type is `invalid`; ids are echoed."""
    raw = await authed(harness, codec)
    await raw.send({"t": "teleport", "id": 7})
    err(await raw.recv(), "unknown_type", 7)
    await raw.send({"t": "send", "id": 8, "cid": 5, "to": "bob", "body": {"text": "x"}})
    err(await raw.recv(), "invalid", 8)
    await raw.send({"t": "send", "id": 9, "cid": "c", "to": "bob", "body": "not an object"})
    err(await raw.recv(), "invalid", 9)
    await raw.send({"id": 10})
    err(await raw.recv(), "invalid", 10)
    await raw.send(
        {
            "t": "send",
            "id": 11,
            "cid": "c",
            "to": "bob",
            "conv": "d:alice|bob",
            "body": {"text": "x"},
        }
    )
    err(await raw.recv(), "invalid", 11)
    await raw.send({"t": "send", "id": 12, "cid": "", "to": "bob", "body": {"text": "x"}})
    err(await raw.recv(), "invalid", 12)
    await raw.send({"t": "send", "id": 13, "cid": "c", "to": "bob", "body": {"text": ""}})
    err(await raw.recv(), "invalid", 13)
    await raw.send({"t": "send", "id": 14, "cid": "c", "to": "bad id!", "body": {"text": "x"}})
    err(await raw.recv(), "invalid", 14)
    assert await message_count(harness) == 0
    await raw.close()
    await still_serving(harness)


async def test_msgpack_binary_body_is_invalid(harness: Harness) -> None:
    """MessagePack bytes/ext values are outside the JSON data model: `invalid`."""
    raw = await authed(harness, "msgpack")
    await harness.user("bob")
    await raw.send(
        {
            "t": "send",
            "id": 3,
            "cid": "b",
            "to": "bob",
            "type": "custom",
            "body": {"blob": b"\x00\x01"},
        }
    )
    err(await raw.recv(), "invalid", 3)
    assert await message_count(harness) == 0
    await raw.close()


async def test_too_large_body_and_text(harness: Harness) -> None:
    """Text over max_text_bytes (UTF-8 bytes) and bodies over max_body_bytes are `too_large`."""
    raw = await authed(harness)
    await harness.user("bob")
    s = harness.server.settings
    text = "é" * (s.max_text_bytes // 2 + 1)  # fewer characters than the limit, more bytes
    await raw.send({"t": "send", "id": 2, "cid": "t", "to": "bob", "body": {"text": text}})
    err(await raw.recv(), "too_large", 2)
    await raw.send(
        {
            "t": "send",
            "id": 3,
            "cid": "u",
            "to": "bob",
            "type": "custom",
            "body": {"x": "a" * (s.max_body_bytes + 10)},
        }
    )
    err(await raw.recv(), "too_large", 3)
    assert await message_count(harness) == 0
    await raw.close()


async def test_oversize_frame_closes_websocket(harness: Harness) -> None:
    """A WebSocket frame over max_frame_bytes closes the connection with 1009."""
    raw = await authed(harness)
    await raw.send_bytes(b'{"t":"ping","pad":"' + b"x" * 70_000 + b'"}')
    assert await raw.closed() == close.TOO_BIG
    await still_serving(harness)


async def test_oversize_frame_refused_on_length_prefix(harness: Harness) -> None:
    """TCP: a length prefix over the limit closes with TOO_BIG before any payload is sent."""
    raw = await Raw.tcp(harness.server.tcp_port)
    await raw.send_raw((10_000_000).to_bytes(4, "big"))  # no payload follows
    assert await raw.closed() == close.TOO_BIG
    await still_serving(harness)


async def test_unsupported_version(harness: Harness) -> None:
    """hello with another version is `unsupported_version` then close 4010; TCP too."""
    raw = await Raw.ws(harness.ws_url)
    await raw.send({"t": "hello", "v": 99, "token": "x", "id": 1})
    err(await raw.recv(), "unsupported_version", 1)
    assert await raw.closed() == close.UNSUPPORTED_VERSION
    tcp = await Raw.tcp(harness.server.tcp_port, pre=b"TIDINGS\x07", read_hello=False)
    assert tcp._reader is not None
    assert await tcp._reader.readexactly(8) == b"TIDINGS\x01"
    assert await tcp.closed() == close.UNSUPPORTED_VERSION


async def test_bad_tcp_preface_is_dropped(harness: Harness) -> None:
    """A TCP client that does not speak the preface is disconnected without an answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.server.tcp_port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_requests_before_hello_are_unauthenticated(harness: Harness) -> None:
    """Any request before a successful hello gets `unauthenticated`; nothing is stored."""
    await harness.user("bob")
    raw = await Raw.ws(harness.ws_url)
    await raw.send({"t": "send", "id": 4, "cid": "x", "to": "bob", "body": {"text": "x"}})
    err(await raw.recv(), "unauthenticated", 4)
    await raw.send({"t": "history", "id": 5, "conv": "d:alice|bob"})
    err(await raw.recv(), "unauthenticated", 5)
    assert await message_count(harness) == 0
    await raw.close()


async def test_auth_timeout(make_server: Any) -> None:
    """A connection that never authenticates is closed with 4001 after the auth timeout."""
    h = await make_server(auth_timeout_ms=300)
    raw = await Raw.ws(h.ws_url)
    assert raw.hello["auth_timeout_ms"] == 300
    t0 = time.monotonic()
    assert await raw.closed() == close.AUTH_TIMEOUT
    assert time.monotonic() - t0 < 3
    tcp = await Raw.tcp(h.server.tcp_port)
    assert await tcp.closed() == close.AUTH_TIMEOUT


@pytest.mark.parametrize("case", ["garbage", "forged", "alg_none", "wrong_alg", "expired"])
async def test_bad_tokens(harness: Harness, case: str) -> None:
    """Forged, algorithm-swapped, malformed and expired tokens are refused and closed (4002)."""
    await harness.user("alice")
    now = int(time.time())
    claims = {
        "iss": "tidings",
        "sub": "alice",
        "dev": "d1",
        "plat": "web",
        "jti": "j",
        "ims": now * 1000,
        "iat": now,
        "exp": now + 3600,
    }
    token = {
        "garbage": "not-a-token",
        "forged": jwt.encode(claims, "another key that is long enough!!", algorithm="HS256"),
        "alg_none": jwt.encode(claims, None, algorithm="none"),
        "wrong_alg": jwt.encode(claims, "k" * 64, algorithm="HS512"),
        "expired": await harness.token("alice", ttl_s=1),
    }[case]
    if case == "expired":
        await asyncio.sleep(2.1)
    raw = await Raw.ws(harness.ws_url)
    answer = await raw.login(token)
    if case == "expired":
        err(answer, "token_expired", 1)
    else:
        err(answer, "auth_failed", 1)
    assert await raw.closed() == close.AUTH_FAILED


async def test_revoked_token_is_refused_and_live_connection_closed(harness: Harness) -> None:
    """Revoking a token closes its live connection (4003) and refuses it afterwards."""
    token = await harness.token("alice")
    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(token))["t"] == "ready"
    await harness.server.accounts.revoke_token(token)
    assert await raw.closed() == close.TOKEN_REVOKED
    again = await Raw.ws(harness.ws_url)
    err(await again.login(token), "token_revoked", 1)


async def test_token_revoked_while_its_login_is_checked(harness: Harness, monkeypatch: Any) -> None:
    """A revocation stored and published while a hello's token is being checked (before
    the session is registered, so the published event finds nothing to close) still ends
    that session right after `ready`; an untouched login does not read the store a second
    time."""
    store = harness.server.store
    original = store.login_state
    reads = {"auth_state": 0}
    token = await harness.token("alice")
    other = await harness.token("alice", "d2")

    def slow(*args: Any) -> Any:
        async def read() -> Any:
            got = await original(*args)
            await harness.server.accounts.revoke_token(token)  # meanwhile, a logout
            return got

        return asyncio.ensure_future(read())  # login_state gives a future

    real_auth_state = store.auth_state

    async def counted(*args: Any) -> Any:
        reads["auth_state"] += 1
        return await real_auth_state(*args)

    monkeypatch.setattr(store, "auth_state", counted)
    clean = await Raw.ws(harness.ws_url)
    assert (await clean.login(other))["t"] == "ready"
    await asyncio.sleep(0.1)
    assert reads["auth_state"] == 0  # nothing revoked meanwhile: one read per login
    monkeypatch.setattr(store, "login_state", slow)
    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(token))["t"] == "ready"
    assert await raw.closed() == close.TOKEN_REVOKED
    assert reads["auth_state"] == 1


@pytest.mark.parametrize("how", ["raises", "fails_later", "crashes_later"])
async def test_login_read_failures_refuse_the_hello_and_close(
    harness: Harness, monkeypatch: Any, how: str
) -> None:
    """The login's store read failing (at once, with the store's `unavailable`, or with
    an unexpected error) answers the hello with an error and closes 1013 (try again
    later); the next login, with the store back, works."""
    from tidings.protocol.errors import TidingsError

    store = harness.server.store
    original = store.login_state
    token = await harness.token("alice")

    def broken(*args: Any) -> Any:
        if how == "raises":
            raise RuntimeError("the store could not start the read")
        fut = asyncio.get_running_loop().create_future()
        if how == "fails_later":
            fut.set_exception(TidingsError("unavailable", "storage read failed"))
        else:
            fut.set_exception(RuntimeError("boom"))
        return fut

    monkeypatch.setattr(store, "login_state", broken)
    raw = await Raw.ws(harness.ws_url)
    err(await raw.login(token), "internal" if how == "crashes_later" else "unavailable", 1)
    assert await raw.closed() == close.TRY_AGAIN_LATER
    monkeypatch.setattr(store, "login_state", original)
    again = await Raw.ws(harness.ws_url)
    assert (await again.login(token))["t"] == "ready"


@pytest.mark.parametrize("read", ["answers", "fails"])
async def test_client_gone_while_its_login_is_read(
    harness: Harness, monkeypatch: Any, caplog: Any, read: str
) -> None:
    """A client that hangs up after its hello, before the login's read is back: the
    late answer finds the session closed and neither registers it nor writes; a late
    failure is taken (no "exception was never retrieved" from asyncio)."""
    import gc

    from tidings.protocol.errors import TidingsError

    store = harness.server.store
    original = store.login_state
    token = await harness.token("alice")
    answered = asyncio.Event()

    def slow(*args: Any) -> Any:
        async def later() -> Any:
            await asyncio.sleep(0.3)
            try:
                if read == "fails":
                    raise TidingsError("unavailable", "storage read failed")
                return await original(*args)
            finally:
                answered.set()

        return asyncio.ensure_future(later())

    monkeypatch.setattr(store, "login_state", slow)
    raw = await Raw.ws(harness.ws_url)
    await raw.send({"t": "hello", "v": 1, "token": token, "id": 1})
    await asyncio.sleep(0.05)
    await raw.close()
    await asyncio.wait_for(answered.wait(), 5)
    await asyncio.sleep(0.05)
    assert harness.server.hub.online == 0 and not harness.server.hub.by_user
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_failure_after_the_login_read_ends_the_login(
    harness: Harness, monkeypatch: Any
) -> None:
    """Something failing after the login's read (here the hub's announce) closes the
    connection with 1013 and an error, as any failed login does; it is not left open
    half admitted."""
    hub = harness.server.hub

    def broken(session: Any) -> None:
        raise RuntimeError("announce failed")

    monkeypatch.setattr(hub, "announce", broken)
    token = await harness.token("alice")
    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(token))["t"] == "ready"
    err(await raw.recv(), "internal", 1)
    assert await raw.closed() == close.TRY_AGAIN_LATER
    assert hub.online == 0


async def test_forbidden_and_not_found(harness: Harness) -> None:
    """Reading someone else's conversation is `forbidden`; unknown users/convs `not_found`."""
    raw = await authed(harness)
    await harness.user("bob")
    await harness.user("carol")
    b = await harness.client("bob")
    await b.send(to="carol", text="private")
    await raw.send({"t": "history", "id": 2, "conv": "d:bob|carol"})
    err(await raw.recv(), "forbidden", 2)
    await raw.send(
        {"t": "send", "id": 3, "cid": "f", "conv": "d:bob|carol", "body": {"text": "let me in"}}
    )
    err(await raw.recv(), "forbidden", 3)
    await raw.send(
        {
            "t": "send",
            "id": 4,
            "cid": "s",
            "to": "bob",
            "type": "system",
            "body": {"text": "fake system"},
        }
    )
    err(await raw.recv(), "forbidden", 4)
    await raw.send({"t": "send", "id": 5, "cid": "n", "to": "nobody", "body": {"text": "?"}})
    err(await raw.recv(), "not_found", 5)
    await raw.send({"t": "history", "id": 6, "conv": "g:nothing"})
    err(await raw.recv(), "not_found", 6)
    assert await message_count(harness) == 0
    await raw.close()


async def test_conflict(harness: Harness) -> None:
    """The same cid with different content is `conflict`; the original stays."""
    raw = await authed(harness)
    await harness.user("bob")
    await raw.send({"t": "send", "id": 1, "cid": "k", "to": "bob", "body": {"text": "one"}})
    assert (await raw.until("sent"))["seq"] == 1
    await raw.send({"t": "send", "id": 2, "cid": "k", "to": "bob", "body": {"text": "two"}})
    err(await raw.until("error"), "conflict", 2)
    assert await message_count(harness) == 1
    await raw.close()


async def test_rate_limit_then_flood_close(make_server: Any) -> None:
    """Past the burst, requests get `rate_limited` with retry_after_ms; a flood is closed 4008."""
    h = await make_server(rate_per_s=5, rate_burst=5)
    raw = await Raw.ws(h.ws_url)
    assert (await raw.login(await h.token("alice")))["t"] == "ready"
    for i in range(4):
        await raw.send({"t": "history", "id": 100 + i, "conv": "d:alice|alice"})
    await raw.send({"t": "history", "id": 200, "conv": "d:alice|alice"})
    frame = await raw.until("error")
    err(frame, "rate_limited", 200)
    assert frame["retry_after_ms"] > 0
    for i in range(40):
        await raw.send({"t": "history", "id": 300 + i, "conv": "d:alice|alice"})
    assert await raw.closed() == close.FLOOD
    await still_serving(h)


async def test_unavailable_when_write_queue_full(harness: Harness) -> None:
    """When the store's write queue is full, sends get retryable `unavailable`; nothing stored."""
    raw = await authed(harness)
    await harness.user("bob")
    harness.server.store.max_pending = 0
    await raw.send({"t": "send", "id": 1, "cid": "u", "to": "bob", "body": {"text": "x"}})
    frame = await raw.recv()
    err(frame, "unavailable", 1)
    assert frame["retry_after_ms"] > 0
    harness.server.store.max_pending = 1000
    assert await message_count(harness) == 0
    await raw.close()


async def test_internal_error_is_reported_not_fatal(harness: Harness, monkeypatch: Any) -> None:
    """A bug in a request handler answers `internal` and the connection keeps working."""
    raw = await authed(harness)

    async def broken(*_: Any) -> Any:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(harness.server.store, "history", broken)
    await raw.send({"t": "history", "id": 9, "conv": "d:alice|alice"})
    err(await raw.recv(), "internal", 9)
    monkeypatch.undo()
    await raw.send({"t": "ping", "id": 10})
    assert (await raw.recv())["t"] == "pong"
    await raw.close()


async def test_wrong_frame_kind_for_subprotocol(harness: Harness) -> None:
    """A text frame on the msgpack subprotocol closes with 1003."""
    raw = await authed(harness, "msgpack")
    await raw.send_bytes(b'{"t":"ping"}', text=True)
    assert await raw.closed() == close.UNSUPPORTED_DATA


async def test_idle_timeout(make_server: Any) -> None:
    """An authenticated connection that sends nothing is closed with 4006."""
    h = await make_server(idle_timeout_ms=400)
    raw = await Raw.ws(h.ws_url)
    assert (await raw.login(await h.token("alice")))["t"] == "ready"
    assert await raw.closed() == close.IDLE_TIMEOUT


async def test_second_hello_is_invalid(harness: Harness) -> None:
    """A hello after authentication is `invalid` and changes nothing."""
    raw = await authed(harness)
    await raw.send({"t": "hello", "v": 1, "token": "x", "id": 3})
    err(await raw.recv(), "invalid", 3)
    await raw.close()


async def test_client_close_frame_on_tcp(harness: Harness) -> None:
    """A TCP client's close frame is answered with a normal close."""
    raw = await Raw.tcp(harness.server.tcp_port)
    assert (await raw.login(await harness.token("alice")))["t"] == "ready"
    await raw.send({"t": "close", "code": 1000})
    assert await raw.closed() == close.NORMAL


def test_every_error_code_is_tested() -> None:
    """Every row of the error table is asserted by at least one test in this module."""
    import pathlib
    import re

    source = pathlib.Path(__file__).read_text()
    asserted = set(re.findall(r'err\([^,]+, "(\w+)"', source))
    missing = set(KINDS) - asserted
    assert not missing, f"error codes with no test: {sorted(missing)}"


_ = msgspec


async def test_slow_consumer_window_close(make_server: Any) -> None:
    """Over max_unacked unacknowledged pushes the connection is closed with 4009."""
    h = await make_server(max_unacked=5, retransmit_ms=60_000, rate_per_s=1000, rate_burst=1000)
    raw = await Raw.ws(h.ws_url)
    assert (await raw.login(await h.token("bob")))["t"] == "ready"
    a = await h.client("alice")
    for i in range(6):
        await a.send(to="bob", text=f"{i}")
    assert await raw.closed() == close.SLOW_CONSUMER


async def test_listen_backlog_is_raised(harness: Harness) -> None:
    """Both listeners use a large backlog (ss shows it as Send-Q of the listening socket)."""
    import shutil
    import subprocess

    assert shutil.which("ss"), "iproute2's ss is installed by scripts/test.sh"
    with open("/proc/sys/net/core/somaxconn") as fh:
        expected = min(harness.server.settings.backlog, int(fh.read()))
    for port in (harness.server.http_port, harness.server.tcp_port):
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert int(out[2]) == expected > 128


async def test_json_integer_beyond_64_bits_is_invalid(harness: Harness) -> None:
    """A JSON body integer too large for 64 bits is `invalid`, not an internal error."""
    raw = await authed(harness, "json")
    await harness.user("bob")
    await raw.send_bytes(
        b'{"t":"send","id":4,"cid":"big","to":"bob","type":"custom",'
        b'"body":{"n":123456789012345678901234567890}}'
    )
    err(await raw.recv(), "invalid", 4)
    assert await message_count(harness) == 0
    await raw.close()


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_deep_nesting(harness: Harness, codec: str) -> None:
    """Bodies nested past 32 levels are `invalid`; absurd nesting is `bad_frame`; no crash."""
    raw = await authed(harness, codec)
    await harness.user("bob")
    body: Any = {"x": 1}
    for _ in range(40):
        body = {"x": body}
    await raw.send(
        {"t": "send", "id": 1, "cid": "deep", "to": "bob", "type": "custom", "body": body}
    )
    err(await raw.recv(), "invalid", 1)
    if codec == "json":
        await raw.send_bytes(
            b'{"t":"send","id":2,"cid":"d2","to":"bob","body":' + b"[" * 3000 + b"]" * 3000 + b"}"
        )
        err(await raw.recv(), "bad_frame")
    assert await message_count(harness) == 0
    await raw.close()


async def test_out_of_range_integers(harness: Harness) -> None:
    """History/sync integers past 63 bits are `invalid`, not an internal error."""
    raw = await authed(harness, "json")
    await raw.send({"t": "history", "id": 1, "conv": "d:alice|alice", "before": 2**64})
    err(await raw.recv(), "invalid", 1)
    await raw.send({"t": "sync", "id": 2, "have": {"d:alice|alice": 2**63}})
    err(await raw.recv(), "invalid", 2)
    await raw.close()


async def test_blocked(harness: Harness) -> None:
    """A send to a user who blocks the sender is `blocked`; nothing is stored."""
    raw = await authed(harness)
    await harness.user("bob")
    await harness.server.contacts.set_block("bob", "alice", True)
    await raw.send({"t": "send", "id": 5, "cid": "b", "to": "bob", "body": {"text": "x"}})
    err(await raw.recv(), "blocked", 5)
    assert await message_count(harness) == 0
    await raw.close()


async def test_group_errors(make_server: Any) -> None:
    """A muted member's send is `muted` (nothing stored); an add past the group's limit
    is `group_full` (nobody added); the server keeps serving."""
    h = await make_server(group_max_members=3)
    for u in ("alice", "bob", "carol", "dave"):
        await h.user(u)
    raw = await authed(h)
    await raw.send({"t": "group", "id": 2, "op": "create", "users": ["bob"]})
    conv = (await raw.until("group"))["conv"]
    await raw.send(
        {"t": "group", "id": 3, "op": "mute", "conv": conv, "users": ["bob"], "duration_ms": 60_000}
    )
    assert (await raw.until("group"))["seq"] == 2
    bob = await authed(h, uid="bob")
    await bob.send({"t": "send", "id": 4, "cid": "b1", "conv": conv, "body": {"text": "x"}})
    err(await bob.until("error"), "muted", 4)
    await raw.send({"t": "group", "id": 5, "op": "add", "conv": conv, "users": ["carol", "dave"]})
    err(await raw.until("error"), "group_full", 5)
    info = await h.server.store.group_info(conv)
    assert info is not None and (info.last_seq, info.member_count) == (2, 2)
    await raw.close()
    await bob.close()
    await still_serving(h)


async def test_sdk_refuses_a_send_over_the_frame_limit(harness: Harness) -> None:
    """The Python SDK refuses a send whose frame would exceed max_frame_bytes with
    `too_large` instead of letting the server close the connection (1009) over and over
    as the outbox resends it; the connection stays up."""
    await harness.user("bob")
    c = await harness.client("alice", "d1")
    with pytest.raises(RequestError) as err:
        await c.send(to="bob", body={"blob": "x" * 70_000}, type="custom")
    assert err.value.code == "too_large"
    assert c.unacked_sends == 0
    sent = await c.send(to="bob", text="small")
    assert sent.seq == 1 and c.connects == 1
