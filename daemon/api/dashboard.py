"""The swarm dashboard: ``GET /`` is a page (HTML, one script, one style sheet, all in ``static/`` of this package: no
build step, no CDN, works offline) that polls ``/v1/dashboard`` and draws each model's blocks x servers map.

Serving the page needs nothing but these files, so it comes with the torch-free routes; the data it polls is one of
the lazily loaded endpoints (``dashboard_data.py``: it probes servers through the router). Over TCP (``--http``)
the page is behind the same guard as the API: the login URL's cookie lets the browser load it and its polls
(same-origin requests carry it). Its Content-Security-Policy allows only its own script, style and requests.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Final

from aiohttp import web

from petal.protocol.errors import PetalError

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
ASSETS: Final = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
"""The files ``/static/NAME`` serves (nothing else is looked up on disk)."""
HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


def _file_response(name: str, content_type: str) -> web.Response:
    try:
        body = _read(name)
    except OSError:
        raise PetalError(
            "not_found", f"the dashboard file {name} is missing from {STATIC_DIR}: reinstall petal"
        ) from None
    return web.Response(body=body, headers={**HEADERS, "Content-Type": f"{content_type}; charset=utf-8"})


async def get_page(request: web.Request) -> web.Response:
    return _file_response("index.html", "text/html")


async def get_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise PetalError("not_found", f"no dashboard file {name[:80]!r}; the page is at /")
    return _file_response(name, content_type)


def add_dashboard_routes(app: web.Application) -> None:
    app.router.add_get("/", get_page)
    app.router.add_get("/static/{name}", get_asset)
