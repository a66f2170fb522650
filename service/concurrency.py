"""A limit on the HTTP requests one process handles at once (SCORE_MAX_CONCURRENCY).

Beyond it a request is answered 503 problem+json with Retry-After at once, rather than queued
behind the others: under overload a client learns early that it should retry (elsewhere),
and the requests already in flight keep their latency. Not counted: /healthz and /metrics
(an overloaded process is not a dead one), and live clients (WebSockets, and the SSE stream,
which lasts as long as its viewer), whose own limits are SCORE_LIVE_MAX_CONNECTIONS and
SCORE_LIVE_MAX_PER_CLIENT. (uvicorn's `limit_concurrency` counts open connections, live ones
included: it would refuse viewers below the live limit.)
"""

from __future__ import annotations

from prometheus_client import Counter
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import problem
from service.redis_errors import RETRY_AFTER_S

SHED = Counter("score_http_shed", "HTTP requests refused with 503: SCORE_MAX_CONCURRENCY reached")
UNCOUNTED = frozenset(
    {
        "/api/v1/leaderboard/stream",  # live viewers, limited on their own
        # an overloaded process is alive (a liveness probe must not restart it) and says how
        # it is doing
        "/healthz",
        "/metrics",
    }
)


class Slots:
    """The HTTP requests this process handles now, and how many it may: shared by the
    ConcurrencyLimit middleware and the hot path's own lane (service.front)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def refusal(self) -> Response:
        """The 503 for a request beyond the limit (counted)."""
        SHED.inc()
        return problem(
            503,
            f"this server handles {self.limit} requests at once (SCORE_MAX_CONCURRENCY); "
            "retry shortly",
            {"Retry-After": str(RETRY_AFTER_S)},
        )


class ConcurrencyLimit:
    """ASGI middleware: at most `slots.limit` HTTP requests in this process at once."""

    def __init__(self, app: ASGIApp, slots: Slots) -> None:
        self.app = app
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED:
            await self.app(scope, receive, send)  # `receive` as it is: see subscribers.wire_of
            return
        slots = self.slots
        if slots.active >= slots.limit:
            await slots.refusal()(scope, receive, send)
            return
        slots.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            slots.active -= 1
