"""CORS for the HTTP API: a browser game on another origin may call it (post scores with a
bearer token, read the leaderboard) when that origin is in SCORE_CORS_ORIGINS, the same list
the live endpoints check a WebSocket's or an EventSource's Origin against."""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from service.settings import Settings

ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "X-Request-ID",
    "Last-Event-ID",
)
EXPOSE_HEADERS = (
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "Idempotent-Replayed",
    "X-Request-ID",
)
PREFLIGHT_MAX_AGE_S = 3600  # browsers cap it (Chromium: 2 hours)


def cors_middleware(settings: Settings) -> list[Middleware]:
    """The CORS middleware for the configured origins; none at all when no origin is set,
    so that a deployment without cross-origin callers pays nothing for it per request."""
    origins = [o.rstrip("/").lower() for o in settings.live_allowed_origins]
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=["*"] if "*" in origins else origins,
            allow_methods=["GET", "POST"],
            allow_headers=list(ALLOW_HEADERS),
            expose_headers=list(EXPOSE_HEADERS),
            # a bearer token is a header the page sets, not a browser credential (cookies)
            allow_credentials=False,
            max_age=PREFLIGHT_MAX_AGE_S,
        )
    ]
