"""The application uvicorn serves: the Starlette app, with POST /api/v1/score taken before
its middleware stack.

A player's update is nearly all of the traffic, and as layers of their own, the middleware
(the request id, the drain, the concurrency limit, Starlette's error middleware) took a
seventh of a service worker's time per update (78 -> 66-68 us with them inline, `python -m
bench --only write`). The hot path does their work inline, with the same pieces
(service.request_id, service.concurrency's Slots); the endpoint answers its own errors, 500
included. With SCORE_CORS_ORIGINS set, every request takes the whole stack: CORS headers
(`Vary: Origin` too, even without an Origin header) are Starlette's CORSMiddleware's alone.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from service.concurrency import Slots
from service.live.going_away import CLOSE
from service.logs import REQUEST_ID
from service.request_id import HEADER, log_access, sane_or_new
from service.requests import Head
from service.scores import PATH, ScoreEndpoint


class ScoreApp(Starlette):
    """A Starlette app whose POST /api/v1/score skips the middleware (see the module)."""

    def __init__(
        self, *, score: ScoreEndpoint, slots: Slots, cors: bool, access_log: bool, **app: Any
    ) -> None:
        super().__init__(**app)
        self._score = score
        self._slots = slots
        self._cors = cors
        self._access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or self._cors
        ):
            await super().__call__(scope, receive, send)
            return
        # What RequestId, CloseWhileDraining and ConcurrencyLimit do, here rather than in a
        # method of its own: one coroutine less to run again when Redis answers
        scope["app"] = self
        head = Head.of(scope)  # the request's headers, read once
        request_id = sane_or_new(head.request_id)
        extra = [(HEADER, request_id.encode("ascii"))]
        score = self._score
        if score.ctx is not None and score.ctx.draining:
            extra.append(CLOSE)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter() if self._access_log else 0.0
        status = 0  # no response (as RequestId logs it)
        slots = self._slots
        try:
            if slots.active >= slots.limit:
                status, refusal = 503, slots.refusal()
                refusal.raw_headers += extra
                await refusal(scope, receive, send)
                return
            slots.active += 1
            try:
                status = await score.serve(scope, head, receive, send, extra)
            finally:
                slots.active -= 1
        finally:
            if self._access_log:
                log_access(scope, status, started)
            REQUEST_ID.reset(token)
