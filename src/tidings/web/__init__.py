"""The browser side served by `tidings serve`: the JavaScript SDK at ``/sdk/`` and the
chat app at ``/`` (plain ES modules, no build step, nothing fetched from elsewhere)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).parent
ROOTS = {"/sdk/": HERE / "sdk", "/app/": HERE / "static"}
# Strict, local-only: the app loads nothing from other origins and runs no inline script.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; media-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # Revalidate every time: a server upgrade must not leave an old app in a cache.
    "Cache-Control": "no-cache",
}


def _load(root: Path) -> dict[str, tuple[bytes, str]]:
    """Every servable file under ``root`` by its name, read once: only these names exist,
    so no request path can reach anything else."""
    return {
        p.name: (p.read_bytes(), TYPES[p.suffix])
        for p in sorted(root.iterdir())
        if p.is_file() and p.suffix in TYPES
    }


def _serve(files: dict[str, tuple[bytes, str]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        found = files.get(request.match_info.get("name", ""))
        if found is None:
            raise web.HTTPNotFound(text="not found")
        body, ctype = found
        return web.Response(body=body, content_type=ctype, charset="utf-8", headers=HEADERS)

    return handler


def install(app: web.Application) -> None:
    for prefix, root in ROOTS.items():
        files = _load(root)
        app.router.add_get(prefix + "{name}", _serve(files))
        if prefix == "/app/":
            app.router.add_get("/", _serve({"": files["index.html"]}))
            # What a browser asks for on pages without an icon link (the SDK's users).
            app.router.add_get("/favicon.ico", _serve({"": files["icon.svg"]}))
