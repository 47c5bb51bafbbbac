"""The JavaScript SDK's delivery behaviour, run inside Chromium against a real server:
resending with the same client id after a lost answer, reconnecting with backoff, gap
sync when a push goes missing, and the pong watermark finding a lost last push.

The page is loaded through a userspace proxy (tests/netproxy.py) so the network between
the browser and the server can be cut or made to lose the server's answers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from tests.browser import Tab, new_tab
from tests.netproxy import Proxy
from tests.procserver import ServerProcess
from tidings.client import Client

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Installed before the page's own scripts: a WebSocket that drops the pushes for which
# `window.dropPush(message)` says so (a publish lost between nodes, say).
LOSSY_SOCKET = """
window.dropPush = () => false;
window.droppedPushes = [];
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  set onmessage(handler) {
    if (!handler) {
      super.onmessage = null;
      return;
    }
    super.onmessage = (ev) => {
      const f = JSON.parse(ev.data);
      if (f.t === "push" && window.dropPush(f.m)) {
        window.droppedPushes.push(f.m.seq);
        return;
      }
      handler(ev);
    };
    window.injectFrame = (frame) => handler({ data: JSON.stringify(frame) });
  }
  get onmessage() { return super.onmessage; }
};
"""

# A client in the page, recording what it does in `window.log`.
START_CLIENT = """
async ([url, token, opts]) => {
  const sdk = await import("/sdk/tidings.js");
  const c = new sdk.TidingsClient(url, token, opts);
  window.log = [];
  const t0 = performance.now();
  const at = () => Math.round(performance.now() - t0);
  c.addEventListener("connected", () => window.log.push(["connected", at()]));
  c.addEventListener("disconnected", (e) => window.log.push(["disconnected", at(), e.detail.code]));
  c.addEventListener("message", (e) => {
    const m = e.detail.message;
    window.log.push(["message", at(), m.conv, m.seq, m.cid, e.detail.echo, m.body.text]);
  });
  window.c = c;
  await c.connect();
  return c.user;
}
"""


@pytest_asyncio.fixture(loop_scope="module")
async def proxy(server: ServerProcess) -> AsyncIterator[Proxy]:
    px = await Proxy("127.0.0.1", server.port).start()
    try:
        yield px
    finally:
        await px.stop()


async def page_via(browser: Browser, proxy: Proxy, lossy: bool = False) -> Tab:
    """A page of the server's origin, reached through the proxy (so the WebSocket's
    Origin matches its Host)."""
    tab = await new_tab(browser, f"http://127.0.0.1:{proxy.port}/")
    if lossy:
        await tab.page.add_init_script(LOSSY_SOCKET)
    await tab.page.goto(tab.base + "app/icon.svg")
    return tab


async def start_client(page: Page, proxy: Proxy, token: str, **opts: Any) -> str:
    url = f"ws://127.0.0.1:{proxy.port}/v1/ws"
    return str(await page.evaluate(START_CLIENT, [url, token, opts]))


async def log(page: Page, kind: str) -> list[list[Any]]:
    entries: list[list[Any]] = await page.evaluate("window.log")
    return [e for e in entries if e[0] == kind]


async def eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_resend_with_the_same_cid_after_a_lost_answer(
    browser: Browser, server: ServerProcess, proxy: Proxy
) -> None:
    """The send reaches the server but its answer is lost: the client finds the
    connection dead (no pongs), reconnects, resends the same cid and gets the original
    result (`dup`); the conversation holds the message once."""
    server.token("resend-b", "py")
    tab = await page_via(browser, proxy)
    await start_client(
        tab.page, proxy, server.token("resend-a", "chromium"), heartbeatMs=300, deadAfterMs=1500
    )
    proxy.mute_replies()
    await tab.page.evaluate(
        "window.p = window.c.send({to: 'resend-b', text: 'exactly once', cid: 'js-cid-1'})"
    )

    def stored() -> list[dict[str, Any]]:
        return server.history("d:resend-a|resend-b")

    async def landed() -> bool:
        return len(stored()) == 1

    await eventually(landed, 10, "the send to be stored while its answer is lost")
    sent = await tab.page.evaluate("window.p")
    assert sent["dup"] is True and sent["seq"] == 1 and sent["cid"] == "js-cid-1"
    assert len(await log(tab.page, "connected")) >= 2
    echoes = [e for e in await log(tab.page, "message") if e[4] == "js-cid-1"]
    assert len(echoes) == 1, echoes
    assert [m["cid"] for m in stored()] == ["js-cid-1"]
    assert await tab.page.evaluate("window.c.unackedSends") == 0
    tab.assert_no_errors()


async def test_gap_sync_and_the_pong_watermark(
    browser: Browser, server: ServerProcess, proxy: Proxy
) -> None:
    """A lost push (seq 2) leaves a gap when seq 3 arrives: the client holds 3 back,
    syncs after the grace period and delivers 1, 2, 3 in order, once each. A lost last
    push (nothing behind it) is found by the watermark of the next pong."""
    tab = await page_via(browser, proxy, lossy=True)
    await start_client(tab.page, proxy, server.token("gap-a", "chromium"), heartbeatMs=400)
    await tab.page.evaluate("() => { window.dropPush = (m) => m.seq === 2 || m.seq === 4; }")
    conv = "d:gap-a|gap-b"
    async with Client(f"ws://127.0.0.1:{server.port}/v1/ws", server.token("gap-b", "py")) as b:
        for i in range(1, 4):
            await b.send(to="gap-a", text=f"gap {i}")

        async def three() -> bool:
            return len(await log(tab.page, "message")) >= 3

        await eventually(three, 10, "seqs 1-3")
        await b.send(to="gap-a", text="gap 4")

        async def four() -> bool:
            return len(await log(tab.page, "message")) >= 4

        await eventually(four, 10, "seq 4 through the pong watermark")
    got = [(e[2], e[3], e[6]) for e in await log(tab.page, "message")]
    assert got == [(conv, i, f"gap {i}") for i in range(1, 5)], got
    assert await tab.page.evaluate("window.droppedPushes") == [2, 4]
    assert await tab.page.evaluate("window.c.syncAnswers") >= 3  # connect, gap, watermark
    assert await tab.page.evaluate(f"window.c.held.get('{conv}')") == 4
    tab.assert_no_errors()


async def test_a_resync_hint_makes_the_client_sync(
    browser: Browser, server: ServerProcess, proxy: Proxy
) -> None:
    """A lost last push is not found by a pong for a long while (heartbeat one minute);
    a `resync` frame (what a node sends after a bus outage or a peer node's death) makes
    the client sync at once and deliver it, once."""
    tab = await page_via(browser, proxy, lossy=True)
    await start_client(tab.page, proxy, server.token("hint-a", "chromium"), heartbeatMs=60_000)
    await tab.page.evaluate("() => { window.dropPush = (m) => m.seq === 2; }")
    async with Client(f"ws://127.0.0.1:{server.port}/v1/ws", server.token("hint-b", "py")) as b:
        await b.send(to="hint-a", text="one")
        await b.send(to="hint-a", text="two")

        async def dropped() -> bool:
            return bool(await tab.page.evaluate("window.droppedPushes.length"))

        await eventually(dropped, 10, "the second push dropped")
        await asyncio.sleep(0.5)
        assert [e[6] for e in await log(tab.page, "message")] == ["one"]
        await tab.page.evaluate("() => window.injectFrame({t: 'resync'})")

        async def both() -> bool:
            return len(await log(tab.page, "message")) >= 2

        await eventually(both, 5, "the lost push by the resync hint")
    await asyncio.sleep(0.3)
    assert [e[6] for e in await log(tab.page, "message")] == ["one", "two"]
    tab.assert_no_errors()


async def test_reconnect_with_backoff_and_sync(
    browser: Browser, server: ServerProcess, tmp_path: Path
) -> None:
    """The network goes away for two seconds: the client retries with growing delays,
    comes back by itself, and syncs what was sent meanwhile, in order, once."""
    proxy = await Proxy("127.0.0.1", server.port).start()
    try:
        tab = await page_via(browser, proxy)
        await start_client(tab.page, proxy, server.token("back-a", "chromium"))
        port = proxy.port
        await proxy.stop()  # nothing listens: every attempt is refused
        url = f"ws://127.0.0.1:{server.port}/v1/ws"
        async with Client(url, server.token("back-b", "py")) as b:
            for i in range(5):
                await b.send(to="back-a", text=f"meanwhile {i}")
        await asyncio.sleep(2.0)
        proxy = await Proxy("127.0.0.1", server.port).start(port)

        async def five() -> bool:
            return len(await log(tab.page, "message")) >= 5

        await eventually(five, 15, "the messages sent while away")
        texts = [e[6] for e in await log(tab.page, "message")]
        assert texts == [f"meanwhile {i}" for i in range(5)]
        drops = [e[1] for e in await log(tab.page, "disconnected")]
        gaps = [b - a for a, b in itertools.pairwise(drops)]
        assert len(drops) >= 4, drops  # several refused attempts, not a busy loop ...
        assert len(drops) < 40, drops
        assert max(gaps) > 2 * min(gaps), gaps  # ... with growing delays
        assert len(await log(tab.page, "connected")) == 2
        tab.assert_no_errors()
    finally:
        await proxy.stop()


async def test_browser_origin_check(browser: Browser, server: ServerProcess) -> None:
    """A page may open the WebSocket of its own origin; the same server under another
    name (`127.0.0.1` for a page of `localhost`) is another origin, refused by the
    server's Origin check (the browser sees the upgrade fail)."""
    tab = await new_tab(browser, f"http://localhost:{server.port}/")
    await tab.page.goto(tab.base + "app/icon.svg")
    probe = """
    (url) => new Promise((resolve) => {
      const ws = new WebSocket(url, "tidings.v1.json");
      ws.onmessage = (ev) => { ws.close(); resolve(JSON.parse(ev.data).t); };
      ws.onclose = (ev) => resolve("closed " + ev.code);
    })
    """
    same = await tab.page.evaluate(probe, f"ws://localhost:{server.port}/v1/ws")
    assert same == "hello"
    other = await tab.page.evaluate(probe, f"ws://127.0.0.1:{server.port}/v1/ws")
    assert other == "closed 1006"


async def test_a_send_over_the_frame_limit_is_refused_without_reconnecting(
    browser: Browser, server: ServerProcess, proxy: Proxy
) -> None:
    """A send whose frame would exceed the server's max_frame_bytes is refused by the
    SDK (`too_large`) instead of closing the connection (1009) again after every
    reconnect; the connection stays up and the next send goes through."""
    server.token("big-b", "py")
    tab = await page_via(browser, proxy)
    await start_client(tab.page, proxy, server.token("big-a", "chromium"))
    code = await tab.page.evaluate(
        """async () => {
          try {
            await window.c.send({to: "big-b", text: "x".repeat(70000)});
            return "sent";
          } catch (e) { return e.code; }
        }"""
    )
    assert code == "too_large"
    sent = await tab.page.evaluate("() => window.c.send({to: 'big-b', text: 'small'})")
    assert sent["seq"] == 1
    assert len(await log(tab.page, "connected")) == 1
    assert len(await log(tab.page, "disconnected")) == 0
    tab.assert_no_errors()


async def test_close_and_disconnect_settle_every_promise(
    browser: Browser, server: ServerProcess, proxy: Proxy
) -> None:
    """`connect()` settles when `disconnect()` or `close()` comes before it is ready, and a
    send after `close()` is refused at once: no promise is left hanging."""
    tab = await page_via(browser, proxy)
    token = server.token("settle-a", "chromium")
    out = await tab.page.evaluate(
        """async ([url, token]) => {
          const sdk = await import("/sdk/tidings.js");
          const settle = (p) => p.then(() => "resolved", (e) => e.name);
          const a = new sdk.TidingsClient(url, token);
          const first = settle(a.connect());
          a.disconnect();
          const b = new sdk.TidingsClient("ws://127.0.0.1:9/v1/ws", token);
          const second = settle(b.connect());  // nothing listens there: backing off
          await new Promise((r) => setTimeout(r, 200));
          b.close();
          return [await first, await second, await settle(b.send({to: "x", text: "y"}))];
        }""",
        [f"ws://127.0.0.1:{proxy.port}/v1/ws", token],
    )
    assert out == ["ConnectionError", "ConnectionError", "ConnectionError"]
