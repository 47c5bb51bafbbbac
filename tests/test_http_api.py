"""The server HTTP API: admin key, users, tokens, registration, revocation, OpenAPI."""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Any

import aiohttp
import pytest

from tests.conftest import Harness, next_message
from tests.rawclient import Raw
from tidings.client import Client
from tidings.protocol import close


async def call(
    h: Harness,
    method: str,
    path: str,
    body: Any = None,
    key: str | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    headers = {}
    if key is not None or token is None:
        headers["Authorization"] = f"Bearer {key if key is not None else h.server.admin_key}"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, h.http_url + path, json=body, headers=headers) as r,
    ):
        data = await r.json() if r.content_type == "application/json" else None
        return r.status, data


async def test_health(harness: Harness) -> None:
    """GET /healthz answers 200 with a small JSON body."""
    status, body = await call(harness, "GET", "/healthz")
    assert status == 200 and body["status"] == "ok" and "version" in body


async def test_admin_key_file_is_generated_0600(harness: Harness) -> None:
    """With no admin key configured, one is generated into the data dir, mode 0600."""
    path = os.path.join(harness.server.settings.data_dir, "admin.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as fh:
        assert fh.read().strip() == harness.server.admin_key
    assert len(harness.server.admin_key) >= 32


async def test_admin_key_from_settings(make_server: Any) -> None:
    """An admin key given by settings/env is used instead of a generated one."""
    h = await make_server(admin_key="k" * 40)
    assert (await call(h, "PUT", "/v1/users/x", {}, key="k" * 40))[0] == 201
    assert not os.path.exists(os.path.join(h.server.settings.data_dir, "admin.key"))


async def test_put_user_is_idempotent(harness: Harness) -> None:
    """PUT creates (201) then updates (200) the same user; wrong key is refused (401)."""
    status, body = await call(harness, "PUT", "/v1/users/Alice", {"name": "Alice A."})
    assert status == 201 and body["uid"] == "alice" and body["display"] == "Alice"
    status, body = await call(harness, "PUT", "/v1/users/alice", {"name": "Alice B."})
    assert status == 200 and body["name"] == "Alice B."
    status, body = await call(harness, "GET", "/v1/users/ALICE")
    assert status == 200 and body["name"] == "Alice B."
    status, body = await call(harness, "PUT", "/v1/users/bob", {}, key="wrong")
    assert status == 401 and body["error"]["code"] == "auth_failed"
    status, body = await call(harness, "PUT", "/v1/users/bad%20id", {})
    assert status == 400 and body["error"]["code"] == "invalid"
    status, body = await call(harness, "PUT", "/v1/users/x", {"nmae": "typo"})
    assert status == 400 and body["error"]["code"] == "invalid"
    status, body = await call(harness, "GET", "/v1/users/ghost")
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_token_issue_and_use(harness: Harness) -> None:
    """A token issued over HTTP authenticates a device bound to that device id."""
    await call(harness, "PUT", "/v1/users/alice", {})
    status, tok = await call(
        harness, "POST", "/v1/users/alice/tokens", {"device": "phone-1", "platform": "ios"}
    )
    assert status == 200 and tok["device"] == "phone-1" and tok["expires_ms"] > 0
    raw = await Raw.ws(harness.ws_url)
    ready = await raw.login(tok["token"])
    assert ready["user"] == "alice" and ready["device"] == "phone-1"
    status, body = await call(
        harness, "POST", "/v1/users/alice/tokens", {"device": "x", "platform": "toaster"}
    )
    assert status == 400 and body["error"]["code"] == "invalid"
    status, body = await call(
        harness, "POST", "/v1/users/ghost/tokens", {"device": "x", "platform": "ios"}
    )
    assert status == 404
    await raw.close()


async def test_kick_device_closes_connections_and_revokes(harness: Harness) -> None:
    """Revoking a device closes its live sessions (4003); its old tokens stop working."""
    token = await harness.token("alice", "tab-1")
    raw = await Raw.ws(harness.ws_url)
    assert (await raw.login(token))["t"] == "ready"
    other = await harness.client("alice", "tab-2")
    status, _ = await call(harness, "POST", "/v1/users/alice/devices/tab-1/revoke")
    assert status == 204
    assert await raw.closed() == close.TOKEN_REVOKED
    again = await Raw.ws(harness.ws_url)
    assert (await again.login(token))["code"] == "token_revoked"
    assert other.ready.is_set()  # other devices are untouched
    fresh = await harness.token("alice", "tab-1")
    raw2 = await Raw.ws(harness.ws_url)
    assert (await raw2.login(fresh))["t"] == "ready"
    await raw2.close()


async def test_register_login_logout(harness: Harness) -> None:
    """Self-registration (argon2) gives a token; login works; logout revokes the token."""
    status, _tok = await call(
        harness,
        "POST",
        "/v1/auth/register",
        {"user": "zoe", "password": "correct horse", "device": "w1", "platform": "web"},
        key="",
    )
    assert status == 201
    user = await harness.server.store.get_user("zoe")
    assert user is not None and user.password_hash and user.password_hash.startswith("$argon2")
    status, body = await call(
        harness,
        "POST",
        "/v1/auth/register",
        {"user": "ZOE", "password": "another one", "device": "w1", "platform": "web"},
        key="",
    )
    assert status == 409 and body["error"]["code"] == "conflict"
    status, body = await call(
        harness,
        "POST",
        "/v1/auth/login",
        {"user": "zoe", "password": "wrong pass", "device": "w2", "platform": "web"},
        key="",
    )
    assert status == 401 and body["error"]["code"] == "auth_failed"
    status, tok2 = await call(
        harness,
        "POST",
        "/v1/auth/login",
        {"user": "zoe", "password": "correct horse", "device": "w2", "platform": "web"},
        key="",
    )
    assert status == 200
    c = Client(harness.ws_url, tok2["token"])
    await c.connect()
    status, _ = await call(harness, "POST", "/v1/auth/logout", token=tok2["token"])
    assert status == 204
    async for ev in c.events():
        if getattr(ev, "final", False):
            assert ev.code == close.TOKEN_REVOKED
            break
    await c.close()
    status, body = await call(harness, "POST", "/v1/auth/logout", token=tok2["token"])
    assert status == 401 and body["error"]["code"] == "token_revoked"
    status, body = await call(
        harness,
        "POST",
        "/v1/auth/register",
        {"user": "y", "password": "short", "device": "w1", "platform": "web"},
        key="",
    )
    assert status == 400


async def test_registration_can_be_disabled(make_server: Any) -> None:
    """With allow_registration off, self-registration is `forbidden`."""
    h = await make_server(allow_registration=False)
    status, body = await call(
        h,
        "POST",
        "/v1/auth/register",
        {"user": "y", "password": "long enough", "device": "w1", "platform": "web"},
        key="",
    )
    assert status == 403 and body["error"]["code"] == "forbidden"


async def test_server_send_and_history(harness: Harness) -> None:
    """The backend sends on a user's behalf (idempotent on cid) and reads history."""
    b = await harness.client("bob")
    await harness.user("alice")
    body = {
        "from": "alice",
        "to": "bob",
        "cid": "sys-1",
        "type": "system",
        "body": {"text": "Welcome!"},
    }
    status, sent = await call(harness, "POST", "/v1/messages", body)
    assert status == 200 and sent["seq"] == 1 and not sent["dup"]
    status, again = await call(harness, "POST", "/v1/messages", body)
    assert again["dup"] and again["mid"] == sent["mid"]
    ev = await next_message(b)
    assert ev.message.type == "system" and ev.message.dev == "server"
    status, page = await call(harness, "GET", "/v1/conversations/d:alice|bob/messages?limit=10")
    assert status == 200 and [m["seq"] for m in page["msgs"]] == [1] and not page["more"]
    status, page = await call(harness, "GET", "/v1/conversations/d:alice|bob/messages?limit=x")
    assert status == 400


async def test_bad_json_body(harness: Harness) -> None:
    """A malformed request body is `bad_frame` (400), never a crash."""
    async with (
        aiohttp.ClientSession() as s,
        s.put(
            harness.http_url + "/v1/users/a",
            data=b"{oops",
            headers={"Authorization": f"Bearer {harness.server.admin_key}"},
        ) as r,
    ):
        assert r.status == 400
        assert (await r.json())["error"]["code"] == "bad_frame"


async def test_openapi_document(harness: Harness) -> None:
    """The OpenAPI document lists every route with schemas generated from the models."""
    async with aiohttp.ClientSession() as s, s.get(harness.http_url + "/v1/openapi.json") as r:
        doc = await r.json()
    assert doc["openapi"].startswith("3.")
    for route in harness.server.api.routes:
        assert route.method.lower() in doc["paths"][route.path]
    schemas = doc["components"]["schemas"]
    assert set(schemas["TokenRequest"]["required"]) == {"device", "platform"}
    assert "from" in schemas["ServerSend"]["properties"]


@pytest.mark.parametrize("origin,ok", [(None, True), ("http://evil.example", False)])
async def test_websocket_origin_check(harness: Harness, origin: str | None, ok: bool) -> None:
    """A browser Origin not on the allow-list (nor the server's own) is refused with 403."""
    headers = {"Origin": origin} if origin else {}
    async with aiohttp.ClientSession() as s:
        try:
            ws = await s.ws_connect(harness.ws_url, protocols=("tidings.v1.json",), headers=headers)
            await ws.close()
            assert ok
        except aiohttp.WSServerHandshakeError as exc:
            assert not ok and exc.status == 403


async def test_revocation_during_hello_is_not_missed(harness: Harness, monkeypatch: Any) -> None:
    """A device revoked while its hello is being checked is closed right after `ready`."""
    import asyncio

    token = await harness.token("alice", "slow")
    store = harness.server.store
    original = store.watermark

    async def slow_watermark(uid: str) -> int:
        await asyncio.sleep(0.3)
        return await original(uid)

    monkeypatch.setattr(store, "watermark", slow_watermark)
    raw = await Raw.ws(harness.ws_url)
    await raw.send({"t": "hello", "v": 1, "token": token, "id": 1})
    await asyncio.sleep(0.1)  # the token has been checked; the session is not registered
    await harness.server.accounts.revoke_device("alice", "slow")
    assert await raw.closed() == close.TOKEN_REVOKED


async def test_concurrent_registrations_of_one_id(harness: Harness) -> None:
    """Two registrations racing for one id: one wins, the other gets `conflict`, and the
    winner's password is the one that logs in."""
    import asyncio

    async def register(pw: str) -> tuple[int, Any]:
        return await call(
            harness,
            "POST",
            "/v1/auth/register",
            {"user": "race", "password": pw, "device": "w", "platform": "web"},
            key="",
        )

    (s1, _), (s2, _) = await asyncio.gather(register("password-one"), register("password-two"))
    assert sorted([s1, s2]) == [201, 409]
    winner = "password-one" if s1 == 201 else "password-two"
    status, _ = await call(
        harness,
        "POST",
        "/v1/auth/login",
        {"user": "race", "password": winner, "device": "w2", "platform": "web"},
        key="",
    )
    assert status == 200


async def test_sdk_send_fails_after_final_close(harness: Harness) -> None:
    """Once the device is revoked, pending and new SDK sends fail instead of hanging."""
    import asyncio

    c = await harness.client("alice", "gone")
    await harness.user("bob")
    await harness.server.accounts.revoke_device("alice", "gone")
    async for ev in c.events():
        if getattr(ev, "final", False):
            break
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(c.send(to="bob", text="too late"), 2)


async def test_sdk_reconnects_promptly_after_refused_hello(
    harness: Harness, monkeypatch: Any
) -> None:
    """A hello refused as `unavailable` (close 1013) is retried on a new connection at once."""
    import time

    from tidings.protocol.errors import TidingsError

    store = harness.server.store
    original = store.login_state
    calls = {"n": 0}

    def flaky(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            failed: Any = asyncio.get_running_loop().create_future()
            failed.set_exception(
                TidingsError("unavailable", "database restarting", retry_after_ms=100)
            )
            return failed
        return original(*args)

    monkeypatch.setattr(store, "login_state", flaky)
    t0 = time.monotonic()
    c = await harness.client("alice", "flaky", backoff_min_s=0.05)
    assert c.ready.is_set() and time.monotonic() - t0 < 3
    assert calls["n"] >= 2


async def test_conversation_list_for_the_backend(harness: Harness) -> None:
    """A backend reads a user's conversation list and badge (e.g. for a notification's
    badge number); muted conversations stay out of the badge; bad input is refused."""
    a = await harness.client("alice")
    await harness.user("bob")
    await harness.user("carol")
    for i in range(3):
        await a.send(to="bob", text=f"m{i}")
    await a.send(to="carol", text="hey")
    b = await harness.client("bob")
    await b.mark_read("d:alice|bob", 1)
    status, out = await call(harness, "GET", "/v1/users/bob/conversations")
    assert status == 200 and out["badge"] == 2
    (item,) = out["convs"]
    assert (item["conv"], item["unread"], item["read_seq"], item["peer"]) == (
        "d:alice|bob",
        2,
        1,
        "alice",
    )
    assert item["last"]["body"] == {"text": "m2"} and item["n"] == 3
    await b.settings("d:alice|bob", muted=True)
    status, out = await call(harness, "GET", "/v1/users/bob/conversations")
    assert out["badge"] == 0 and out["convs"][0]["muted"]
    status, out = await call(harness, "GET", "/v1/users/alice/conversations?limit=1")
    assert status == 200 and len(out["convs"]) == 1 and out["badge"] == 0
    status, out = await call(harness, "GET", "/v1/users/alice/conversations?limit=0")
    assert status == 400 and out["error"]["code"] == "invalid"
    status, out = await call(harness, "GET", "/v1/users/alice/conversations?limit=x")
    assert status == 400 and out["error"]["code"] == "invalid"
    status, out = await call(harness, "GET", "/v1/users/nobody/conversations")
    assert status == 404 and out["error"]["code"] == "not_found"
    status, out = await call(harness, "GET", "/v1/users/bob/conversations", key="wrong" * 8)
    assert status == 401
