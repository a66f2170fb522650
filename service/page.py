"""The live leaderboard page (`GET /`), its iframe-friendly twin (`GET /embed`) and its script.

No build step and no external assets: `static/leaderboard.js` defines the
`<score-leaderboard>` element that both pages use, and that other sites can embed with one
script tag.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from service.settings import Settings

STATIC = Path(__file__).resolve().parent / "static"

# Everything comes from this service; styles are inline (the element's shadow DOM).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors {ancestors}"
)


def _page(path: str, name: str, ancestors: str) -> Route:
    body = (STATIC / name).read_bytes()
    headers = {
        "Content-Security-Policy": _CSP.format(ancestors=ancestors),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

    async def serve(request: Request) -> Response:
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    return Route(path, serve, methods=["GET"])


def page_routes(settings: Settings) -> list[BaseRoute]:
    """`/` (framed only by this site), `/embed` (framed by any site, or by the Origin
    allowlist when one is set) and `/static/*`."""
    origins = settings.live_allowed_origins
    embedders = "*" if not origins or "*" in origins else " ".join(("'self'", *origins))
    return [
        _page("/", "index.html", "'self'"),
        _page("/embed", "embed.html", embedders),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
