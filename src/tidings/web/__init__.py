"""The browser side served by `tidings serve`: the JavaScript SDK at ``/sdk/`` and the
chat app at ``/`` (plain ES modules, no build step, nothing fetched from elsewhere)."""

from __future__ import annotations

import mimetypes
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
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


def _file(path: Path) -> web.Response:
    ctype = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        # Revalidate every time: a server upgrade must not leave an old app in a cache.
        "Cache-Control": "no-cache",
    }
    return web.Response(body=path.read_bytes(), content_type=ctype, charset="utf-8", headers=headers)


def _serve(root: Path):  # type: ignore[no-untyped-def]
    base = root.resolve()

    async def handler(request: web.Request) -> web.Response:
        rel = request.match_info["name"]
        target = (base / rel).resolve()
        if base not in target.parents or not target.is_file():
            raise web.HTTPNotFound(text="not found")
        return _file(target)

    return handler


def install(app: web.Application) -> None:
    async def index(_: web.Request) -> web.Response:
        return _file(HERE / "static" / "index.html")

    app.router.add_get("/", index)
    for prefix, root in ROOTS.items():
        app.router.add_get(prefix + "{name:.+}", _serve(root))
