"""The web app end to end: Playwright drives Debian's Chromium (headless) against a real
`tidings serve` process, several browser contexts being several people and devices.

Screenshots of the main screens go to test-artifacts/web/ (not committed)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, expect

from tests.browser import PHONE, new_tab
from tests.netproxy import Proxy
from tests.procserver import ServerProcess
from tidings.client import Client

pytestmark = pytest.mark.asyncio(loop_scope="module")


def base_of(srv: ServerProcess) -> str:
    return f"http://127.0.0.1:{srv.port}/"


def server_send(srv: ServerProcess, sender: str, to: str, text: str, cid: str) -> Any:
    body = {"from": sender, "to": to, "cid": cid, "body": {"text": text}}
    return srv.http("POST", "/v1/messages", body)


async def test_app_is_served_locally(server: ServerProcess) -> None:
    """`/`, the app's modules and the SDK come from the server itself, with a CSP that
    allows nothing from elsewhere and no address of another site in them; unknown or
    escaping paths are 404."""
    base = base_of(server)
    async with aiohttp.ClientSession() as http:
        for path, ctype in (
            ("", "text/html"),
            ("app/app.js", "text/javascript"),
            ("app/room.js", "text/javascript"),
            ("app/style.css", "text/css"),
            ("sdk/tidings.js", "text/javascript"),
        ):
            async with http.get(base + path) as r:
                assert r.status == 200 and r.content_type == ctype, (path, r.headers)
                csp = r.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "script-src 'self'" in csp
                assert not re.search(r"https?://", await r.text()), path
        for bad in ("app/nope.js", "app/../__init__.py", "sdk/%2e%2e/__init__.py", "app/"):
            async with http.get(base + bad) as r:
                assert r.status == 404, bad


async def test_two_users_chat_and_a_second_device(browser: Browser, server: ServerProcess) -> None:
    """Alice and Bob chat both ways; Alice's second device (another browser) sees the same
    messages and read state; typing, presence, ticks, edit and recall; Bob on a phone."""
    base = base_of(server)
    alice = await (await new_tab(browser, base)).sign_up("alice")
    bob = await (await new_tab(browser, base, PHONE)).sign_up("bob")
    alice2 = await (await new_tab(browser, base)).sign_in("alice")
    await expect(alice2.page.locator("#empty-list")).to_be_visible()
    devices = [await t.page.evaluate("window.tidingsApp.client.device") for t in (alice, alice2)]
    assert devices[0] != devices[1], devices  # each tab is its own device

    # A chat with nobody: the send is refused with a clear message, nothing stays pending.
    await alice.chat_with("nobody-here")
    await alice.send("anyone?")
    await expect(alice.page.locator("#chat-error")).to_have_text("No such user or conversation.")
    await expect(alice.page.locator("#message-list .msg")).to_have_count(0)

    await alice.chat_with("bob")
    await alice.send("hello bob")
    # Stored: no longer pending; Bob's phone has it unread.
    await expect(alice.msg("hello bob").locator(".ticks")).not_to_have_attribute(
        "data-state", "pending"
    )
    await expect(bob.conv("alice").locator(".badge")).to_have_text("1")
    await expect(bob.conv("alice").locator(".conv-last")).to_have_text("hello bob")
    # Bob's phone holds it (acked) but he has not opened the chat: delivered, not read.
    await expect(alice.msg("hello bob").locator(".ticks")).to_have_attribute(
        "data-state", "delivered"
    )
    await bob.shot("phone-list")
    # Alice's second device: the conversation, no unread (she wrote it).
    await expect(alice2.conv("bob").locator(".conv-last")).to_have_text("hello bob")
    await expect(alice2.conv("bob").locator(".badge")).to_have_count(0)

    await bob.open_conv("alice")
    await expect(bob.msg("hello bob")).to_be_visible()
    await expect(alice.msg("hello bob").locator(".ticks")).to_have_attribute("data-state", "read")
    await expect(alice.page.locator("#chat-sub")).to_have_text("online")

    await bob.page.fill("#text", "typing away")
    await expect(alice.page.locator("#chat-sub")).to_have_text("bob is typing…")
    await bob.send("hi alice")
    await expect(alice.msg("hi alice")).to_be_visible()
    # Alice reads it on her open chat; her second device learns it was read there.
    await expect(alice2.conv("bob").locator(".conv-last")).to_have_text("hi alice")
    await expect(alice2.conv("bob").locator(".badge")).to_have_count(0)
    await expect(bob.msg("hi alice").locator(".ticks")).to_have_attribute("data-state", "read")

    # Edit, then recall: every device applies them.
    await alice.msg("hello bob").hover()
    await alice.msg("hello bob").locator("button.edit").click()
    await alice.page.fill("#text", "hello bob, edited")
    await alice.page.press("#text", "Enter")
    await expect(bob.msg("hello bob, edited").locator(".edited")).to_be_visible()
    await alice2.open_conv("bob")
    await expect(alice2.msg("hello bob, edited")).to_be_visible()
    await expect(alice2.msg("hi alice")).to_be_visible()
    await alice.shot("chat-desktop")
    await bob.shot("chat-phone")
    await alice.msg("hello bob, edited").hover()
    await alice.msg("hello bob, edited").locator("button.recall").click()
    for tab in (alice, alice2, bob):
        await expect(tab.msg("(message recalled)")).to_be_visible()
        await expect(tab.page.locator("#message-list .msg")).to_have_count(2)
    for tab in (alice, alice2, bob):
        tab.assert_no_errors()


async def test_offline_return_reload_and_history_paging(
    browser: Browser, server: ServerProcess
) -> None:
    """Carol closes her browser; Dan writes; Carol signs in again later and finds it
    all, unread. A reload keeps the history, and scrolling up pages older entries in."""
    base = base_of(server)
    carol = await (await new_tab(browser, base)).sign_up("carol")
    dan = await (await new_tab(browser, base)).sign_up("dan")
    await carol.page.context.close()  # offline

    # Older history, through the server API, so the chat has more than a page of it.
    for i in range(80):
        server_send(server, "dan", "carol", f"backlog {i:03d}", f"backlog-{i}")
    await expect(dan.conv("carol").locator(".conv-last")).to_have_text("backlog 079")
    await dan.open_conv("carol")
    for i in range(3):
        await dan.send(f"while you were away {i}")
    await expect(dan.page.locator(".ticks[data-state=pending]")).to_have_count(0)
    await asyncio.sleep(0.5)  # more than a delivered flush: no device of Carol's holds them
    await expect(dan.msg("while you were away 2").locator(".ticks")).to_have_attribute(
        "data-state", "sent"
    )

    carol = await (await new_tab(browser, base)).sign_in("carol")
    await expect(carol.conv("dan").locator(".badge")).to_have_text("83")
    await carol.open_conv("dan")
    await expect(carol.msg("while you were away 2")).to_be_visible()
    await expect(carol.conv("dan").locator(".badge")).to_have_count(0)
    await carol.page.reload()
    await expect(carol.page.locator("#chat-title")).to_have_text("dan")
    for i in range(3):
        await expect(carol.msg(f"while you were away {i}")).to_be_visible()
    # The tab synced only the newest entries (tail); scrolling up brings the rest.
    first = carol.msg("backlog 000")
    for _ in range(20):
        if await first.count():
            break
        await carol.page.eval_on_selector("#messages", "e => { e.scrollTop = 0; }")
        await asyncio.sleep(0.3)
    await expect(first).to_have_count(1)
    await expect(carol.page.locator("#history-status")).to_have_text("Start of the conversation")
    await expect(carol.page.locator("#message-list .msg")).to_have_count(83)
    await expect(dan.msg("while you were away 2").locator(".ticks")).to_have_attribute(
        "data-state", "read"
    )
    carol.assert_no_errors()
    dan.assert_no_errors()


async def test_group_of_three(browser: Browser, server: ServerProcess) -> None:
    """Erin creates a group with Finn and Gus; everyone chats; "read by N"; adding a
    member shows as an event in every member's chat."""
    base = base_of(server)
    erin = await (await new_tab(browser, base)).sign_up("erin")
    finn = await (await new_tab(browser, base)).sign_up("finn")
    gus = await (await new_tab(browser, base, PHONE)).sign_up("gus")
    await (await new_tab(browser, base)).sign_up("hal")

    await erin.page.click("#new-group")
    await erin.page.fill("#group-name", "Trip")
    await erin.page.fill("#group-members", "finn, gus")
    await erin.page.click("#group-form button[type=submit]")
    await expect(erin.page.locator("#chat-title")).to_have_text("Trip")
    await expect(erin.page.locator("#chat-sub")).to_have_text("3 members")
    await erin.send("who is in?")
    await expect(erin.msg("who is in?").locator(".readby")).to_have_text("read by 0")
    for tab in (finn, gus):
        await expect(tab.conv("Trip").locator(".badge")).to_have_text("1")
        await tab.open_conv("Trip")
        await expect(tab.page.locator("#message-list .event")).to_have_text(
            "erin created the group Trip"
        )
        await expect(tab.msg("who is in?")).to_be_visible()
    await finn.send("me!")
    await gus.send("me too")
    for tab in (erin, finn, gus):
        await expect(tab.msg("me!")).to_be_visible()
        await expect(tab.msg("me too")).to_be_visible()
    await expect(erin.msg("who is in?").locator(".readby")).to_have_text("read by 2")
    await expect(gus.msg("me!").locator(".from")).to_have_text("finn")

    await erin.page.fill("#add-member-user", "hal")
    await erin.page.click("#add-member button")
    for tab in (erin, finn, gus):
        await expect(
            tab.page.locator("#message-list .event", has_text="erin added hal")
        ).to_be_visible()
    await expect(erin.page.locator("#chat-sub")).to_have_text("4 members")
    await erin.shot("group")
    await gus.shot("group-phone")
    for tab in (erin, finn, gus):
        tab.assert_no_errors()


async def test_live_room_danmaku_from_python_sdk(browser: Browser, server: ServerProcess) -> None:
    """A viewer in the browser watches danmaku and gifts posted by a Python-SDK client,
    and what the browser posts reaches the Python viewer."""
    base = base_of(server)
    ivy = await (await new_tab(browser, base)).sign_up("ivy")
    await ivy.page.fill("#join-room-id", "launch")
    await ivy.page.click("#join-room button")
    await expect(ivy.page.locator("#room-title")).to_have_text("launch")

    token = server.token("jay", "py-1")
    async with Client(f"ws://127.0.0.1:{server.port}/v1/ws", token) as jay:
        joined = await jay.join_room("r:launch")
        assert joined.online == 2
        seen: list[str] = []

        async def watch() -> None:
            async for ev in jay.events():
                for m in getattr(ev, "msgs", []):
                    seen.append(f"{m.sender}:{m.body.get('text')}")

        watcher = asyncio.ensure_future(watch())
        await jay.room_send("r:launch", "chat", text="hello from python")
        await jay.room_send("r:launch", "gift", body={"gift": "rocket"})
        layer = ivy.page.locator("#danmaku .danmaku")
        await expect(layer.filter(has_text="jay: hello from python")).to_have_count(1)
        await expect(ivy.page.locator("#gifts li").first).to_have_text("★ jay sent rocket")
        await expect(ivy.page.locator("#room-online")).to_have_text("2")
        await ivy.page.fill("#room-text", "hi from the browser")
        await ivy.page.press("#room-text", "Enter")
        for _ in range(100):
            if "ivy:hi from the browser" in seen:
                break
            await asyncio.sleep(0.05)
        assert "ivy:hi from the browser" in seen
        await ivy.page.click("#room-like")
        await ivy.page.click("#room-like")
        await jay.room_send("r:launch", "like")
        await expect(ivy.page.locator("#room-likes")).to_have_text("3")
        await asyncio.sleep(1.5)  # let the danmaku fly into view
        await ivy.shot("live-room")
        watcher.cancel()
    ivy.assert_no_errors()


async def test_connection_lost_banner_and_recovery(browser: Browser, tmp_path: Path) -> None:
    """The server stops: both apps say the connection is down; a message written then
    waits; the server comes back: the apps say so, the message goes out, nothing is
    lost or doubled."""
    srv = ServerProcess(str(tmp_path / "data")).start()
    try:
        base = base_of(srv)
        kate = await (await new_tab(browser, base)).sign_up("kate")
        leo = await (await new_tab(browser, base)).sign_up("leo")
        await kate.chat_with("leo")
        await kate.send("before the outage")
        await expect(leo.conv("kate")).to_be_visible()
        await leo.open_conv("kate")

        assert srv.terminate() == 0
        for tab in (kate, leo):
            await expect(tab.page.locator("#banner")).to_have_text("Connection lost. Reconnecting…")
        await kate.send("written while down")
        await expect(kate.msg("written while down").locator(".ticks")).to_have_attribute(
            "data-state", "pending"
        )
        await kate.shot("connection-lost")

        srv.start()
        for tab in (kate, leo):
            await expect(tab.page.locator("#banner")).to_have_text("Connected again.")
        await expect(leo.msg("written while down")).to_have_count(1)
        await expect(kate.msg("written while down").locator(".ticks")).to_have_attribute(
            "data-state", "read"
        )
        texts = [m["body"]["text"] for m in srv.history("d:kate|leo")]
        assert texts == ["before the outage", "written while down"]
        for tab in (kate, leo):
            await expect(tab.page.locator("#message-list .msg")).to_have_count(2)
            await expect(tab.page.locator("#banner")).to_be_hidden()
            tab.assert_no_errors()
    finally:
        srv.stop()


@pytest.mark.parametrize("lost", ["answer", "send"])
async def test_reload_while_a_send_is_unanswered(
    browser: Browser, server: ServerProcess, lost: str
) -> None:
    """The network loses a send (or only its answer) and the user reloads the tab: the
    app keeps the unanswered send across the reload and sends it again with its client
    id, so it is stored once and shown once."""
    proxy = await Proxy("127.0.0.1", server.port).start()
    a, b = f"nina-{lost}", f"olaf-{lost}"
    conv = f"d:{a}|{b}"
    try:
        base = f"http://127.0.0.1:{proxy.port}/"
        await (await new_tab(browser, base)).sign_up(a)
        olaf = await (await new_tab(browser, base)).sign_up(b)
        await olaf.chat_with(a)
        await olaf.send("first")
        await expect(olaf.msg("first").locator(".ticks")).not_to_have_attribute(
            "data-state", "pending"
        )
        # From now on the app's WebSocket loses the server's answers (or everything).
        if lost == "answer":
            proxy.mute_replies(websockets_only=True)
        else:
            proxy.blackhole(websockets_only=True)
        await olaf.send("in doubt")
        await asyncio.sleep(0.5)
        assert len(server.history(conv)) == (2 if lost == "answer" else 1)
        await expect(olaf.msg("in doubt").locator(".ticks")).to_have_attribute(
            "data-state", "pending"
        )
        await olaf.page.reload()  # a new connection, through which all goes
        await expect(olaf.page.locator("#chat-title")).to_have_text(a)
        await expect(olaf.msg("in doubt")).to_have_count(1)
        await expect(olaf.msg("in doubt").locator(".ticks")).not_to_have_attribute(
            "data-state", "pending"
        )
        assert [m["body"]["text"] for m in server.history(conv)] == ["first", "in doubt"]
        olaf.assert_no_errors()
    finally:
        await proxy.stop()


async def test_a_hole_after_being_away_is_paged_in(browser: Browser, server: ServerProcess) -> None:
    """Rita holds the first messages, goes away while 80 more come in, and comes back:
    the sync brings the newest 50 (tail); the 30 between are paged in as she scrolls up,
    so none is skipped."""
    base = base_of(server)
    rita = await (await new_tab(browser, base)).sign_up("rita")
    server.token("sam", "py")
    for i in range(5):
        server_send(server, "sam", "rita", f"early {i}", f"early-{i}")
    await rita.open_conv("sam")
    await expect(rita.page.locator("#message-list .msg")).to_have_count(5)
    await rita.page.evaluate("window.tidingsApp.client.disconnect()")
    for i in range(80):
        server_send(server, "sam", "rita", f"later {i:02d}", f"later-{i}")
    await rita.page.evaluate("window.tidingsApp.client.connect()")
    await expect(rita.msg("later 79")).to_be_visible()
    await expect(rita.msg("later 29")).to_have_count(0)  # the hole is not shown as if gapless
    for _ in range(20):
        if await rita.page.locator("#message-list .msg").count() == 85:
            break
        await rita.page.eval_on_selector("#messages", "e => { e.scrollTop = 0; }")
        await asyncio.sleep(0.3)
    texts = await rita.page.locator("#message-list .msg .body").all_inner_texts()
    assert texts == [f"early {i}" for i in range(5)] + [f"later {i:02d}" for i in range(80)]
    rita.assert_no_errors()


async def test_sign_out_and_in_again_in_the_same_tab(
    browser: Browser, server: ServerProcess
) -> None:
    """On a phone: Uma signs out from inside a live room; nothing of hers stays on the
    form or the screen, and Vic, signing in next in the same tab, gets a working app."""
    base = base_of(server)
    tab = await (await new_tab(browser, base, PHONE)).sign_up("uma")
    await tab.page.fill("#join-room-id", "lobby")
    await tab.page.click("#join-room button")
    await expect(tab.page.locator("#room-title")).to_have_text("lobby")
    await tab.page.click("#room-back")
    await tab.page.click("#sign-out")
    await expect(tab.page.locator("#auth")).to_be_visible()
    assert await tab.page.input_value("#auth-user") == ""
    assert await tab.page.input_value("#auth-password") == ""
    await expect(tab.page.locator("#auth-submit")).to_have_text("Sign in")
    await tab.page.click("#tab-signup")
    await tab.page.fill("#auth-user", "vic")
    await tab.page.fill("#auth-password", "pw-vic-2026")
    await tab.page.click("#auth-submit")
    await expect(tab.page.locator("#me-name")).to_have_text("vic")
    await expect(tab.page.locator("#sidebar")).to_be_visible()
    await tab.page.fill("#join-room-id", "lobby")
    await tab.page.click("#join-room button")
    await tab.page.fill("#room-text", "vic was here")
    await tab.page.press("#room-text", "Enter")
    await expect(tab.page.locator("#danmaku .danmaku", has_text="vic: vic was here")).to_have_count(
        1
    )
    await expect(tab.page.locator("#room-online")).to_have_text("1")
    tab.assert_no_errors()
