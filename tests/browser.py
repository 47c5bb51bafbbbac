"""Playwright driving Debian's Chromium (headless) against a real `tidings serve`.

Each browser context is one person's browser; each tab in it is its own device (the app
keeps its device id in sessionStorage). A `Tab` collects the page's console errors and
uncaught exceptions so that every test can also assert that the app raised none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

CHROMIUM = os.environ.get("TIDINGS_CHROMIUM", "/usr/bin/chromium")
# Chromium as root in a container, with nothing reaching out to the internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}

expect.set_options(timeout=15_000)


class Tab:
    def __init__(self, page: Page, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        # A refused WebSocket while the server is down is the browser's own log line,
        # not an app error.
        if msg.type == "error" and "WebSocket" not in msg.text:
            self.errors.append(msg.text)

    async def sign_up(self, user: str, password: str | None = None) -> Tab:
        await self.page.goto(self.base)
        await self.page.click("#tab-signup")
        await self.page.fill("#auth-user", user)
        await self.page.fill("#auth-name", user.title())
        await self.page.fill("#auth-password", password or f"pw-{user}-2026")
        await self.page.click("#auth-submit")
        await expect(self.page.locator("#me-name")).to_have_text(user)
        return self

    async def sign_in(self, user: str, password: str | None = None) -> Tab:
        await self.page.goto(self.base)
        await self.page.fill("#auth-user", user)
        await self.page.fill("#auth-password", password or f"pw-{user}-2026")
        await self.page.click("#auth-submit")
        await expect(self.page.locator("#me-name")).to_have_text(user)
        return self

    def conv(self, title: str) -> Any:
        """The conversation list item titled ``title``."""
        return self.page.locator("#conv-list .conv").filter(
            has=self.page.locator(".conv-title", has_text=title)
        )

    def msg(self, text: str) -> Any:
        return self.page.locator("#message-list .msg").filter(has_text=text)

    async def open_conv(self, title: str) -> None:
        await self.conv(title).click()
        await expect(self.page.locator("#chat-title")).to_have_text(title)

    async def chat_with(self, user: str) -> None:
        await self.page.fill("#new-chat-user", user)
        await self.page.click("#new-chat button")
        await expect(self.page.locator("#chat-title")).to_have_text(user)

    async def send(self, text: str) -> None:
        await self.page.fill("#text", text)
        await self.page.press("#text", "Enter")

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def assert_no_errors(self) -> None:
        assert not self.errors, self.errors


async def new_tab(browser: Browser, base: str, viewport: dict[str, int] | None = None) -> Tab:
    """A tab in a fresh browser context (another person's browser, or another device)."""
    context = await browser.new_context(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
    return Tab(await context.new_page(), base)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright (which downloads no browser)."""
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        print(f"Chromium {b.version} at {CHROMIUM}")
        try:
            yield b
        finally:
            await b.close()
