"""The web console: GET / and /console serve one page, /console/<file> its scripts and styles.

This package owns the console's files (static/, package data: an editable install and a wheel
both carry them; nothing is fetched from the network and nothing is built) and the headers of
every console response. Routes are made, and the files read into memory, once when the app is
built; the handlers only hand out those bytes, on the gateway's event loop. The page itself
reads only the HTTP API, with the token the user gives it (kept in the tab's sessionStorage),
so the console routes need no token: they hold no data (gateway/auth.py lets PATHS through).

Every response carries a Content-Security-Policy that allows scripts, styles, images and
fetches from this origin only: no inline script or style, no third-party origin, no framing.
The page renders every server value as text (static/console.js). uPlot (static/uPlot.*,
MIT, see static/uPlot.LICENSE) draws the time-series chart.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PAGE = "index.html"
PAGE_PATHS = ("/", "/console")
# The files the page loads, served at /console/<name>, with their media types.
ASSETS = {
    "console.js": "text/javascript; charset=utf-8",  # an ES module; it imports chart.js
    "chart.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
PATHS = frozenset({*PAGE_PATHS, *(f"/console/{name}" for name in ASSETS)})

CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
    "connect-src 'self'", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # an upgraded server's page is seen at the next load
}


def _handler(body: bytes, media_type: str):
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": media_type, **HEADERS})
    return serve


def routes() -> list[web.RouteDef]:
    static = resources.files(__package__).joinpath("static")
    page = _handler(static.joinpath(PAGE).read_bytes(), "text/html; charset=utf-8")
    return [*(web.get(path, page) for path in PAGE_PATHS),
            *(web.get(f"/console/{name}", _handler(static.joinpath(name).read_bytes(), media))
              for name, media in ASSETS.items())]
