"""Request ids and the optional access log, as one pure-ASGI middleware.

Every HTTP request gets an id: the client's `X-Request-ID` when it is sane (1-128 printable
ASCII characters, no space), else a new random one. It is returned in the response's
`X-Request-ID` and put on every log record written while the request is served (a
contextvar, read by service.logs.RequestIdFilter). With SCORE_ACCESS_LOG=1, one line per
request (method, path, status, duration, request id) goes to the `score_service.access`
logger.

Pure ASGI, not Starlette's BaseHTTPMiddleware: a request pays one wrapped `send` and a scan
of its headers, no extra task or body copy. POST /api/v1/score does the same without the
middleware (service.front), with `request_id_of` and `log_access`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import REQUEST_ID

HEADER = b"x-request-id"
_SANE = re.compile(r"[\x21-\x7e]{1,128}")
access = logging.getLogger("score_service.access")
# A new id: this process's random prefix and a counter, 24 hex digits, unique across
# processes and hosts without a system call per request (os.urandom costs one).
_PREFIX = os.urandom(6).hex()
_numbers = itertools.count()


def new_id() -> str:
    """A fresh request id (24 hex digits)."""
    return f"{_PREFIX}{next(_numbers):012x}"


def request_id_of(scope: Scope) -> str:
    """The request's id: its sane `X-Request-ID`, else a new one."""
    for name, value in scope["headers"]:
        if name == HEADER:
            return sane_or_new(value.decode("latin-1"))
    return new_id()


def sane_or_new(given: str | None) -> str:
    """`given` (a request's X-Request-ID) if it is a sane id, else a new one."""
    return given if given is not None and _SANE.fullmatch(given) else new_id()


def log_access(scope: Scope, status: int, started: float) -> None:
    """The access log's line for a request answered `status`, begun at `started`
    (time.perf_counter)."""
    duration_ms = (time.perf_counter() - started) * 1000
    access.info(
        '"%s %s" %d %.1fms',
        scope["method"], scope["path"], status, duration_ms,
        extra={"method": scope["method"], "path": scope["path"], "status": status,
               "duration_ms": round(duration_ms, 3)},
    )  # fmt: skip


class RequestId:
    """Give each HTTP request an id (see the module); log it when `access_log`."""

    def __init__(self, app: ASGIApp, *, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        header = (HEADER, request_id.encode("ascii"))
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = REQUEST_ID.set(request_id)
        started = time.perf_counter() if self.access_log else 0.0
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                log_access(scope, status, started)
            REQUEST_ID.reset(token)
