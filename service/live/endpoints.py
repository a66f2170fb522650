"""The live leaderboard endpoints: `WS /api/v1/leaderboard/ws` and `GET .../stream` (SSE).

Both send the broadcaster's frames: the current snapshot first, then one frame per change,
at most one per tick. Clients need send nothing. Under uvicorn, WebSocket frames are written
by the broadcaster straight to each connection's transport, and the connection's task only
reads; elsewhere (and for SSE) the connection's task sends them (`service.live.subscribers`).
WebSocket close codes:

  1001 going away        the server is shutting down: reconnect (elsewhere)
  1009 message too big   the client sent more than SCORE_LIVE_MAX_MESSAGE_BYTES
  1011 (server ping)     the client did not answer protocol pings: a dead peer
  1013 try again later   a connection limit is reached, or no leaderboard is known yet
  4001 too slow          a send waited longer than SCORE_LIVE_SEND_TIMEOUT_MS

An SSE client is refused with 503 (Retry-After) instead of 1013, and 403 for an Origin not
allowed (a WebSocket handshake gets 403 too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send

from service import streamids
from service.errors import problem
from service.live.broadcast import CLOSED, TRY_AGAIN_LATER, WS_CLIENTS, Broadcaster, Refused
from service.live.frames import Frame
from service.live.subscribers import (
    TOO_SLOW,
    Direct,
    Ending,
    Pumped,
    Subscriber,
    limit_stuck_time,
    wire_of,
)
from service.tasks import cancel_and_wait

SNAPSHOT_WAIT_S = 2.0  # a new client waits at most this long for a first leaderboard
RETRY_AFTER_S = "1"

UNAVAILABLE = Ending(
    TRY_AGAIN_LATER, "the leaderboard is not available yet; retry later", "unavailable"
)
TOO_BIG = Ending(1009, "message too big: clients need send nothing", "too_big")
CLIENT_LEFT = Ending(1000, "", "client_left")
FORBIDDEN_ORIGIN = "this Origin may not open the live leaderboard"

KEEPALIVE: Message = {"type": "http.response.body", "body": b": keepalive\n\n", "more_body": True}
SSE_PREAMBLE: Message = {
    "type": "http.response.body",
    "body": b"retry: 1000\n\n",
    "more_body": True,
}
SSE_END: Message = {"type": "http.response.body", "body": b"", "more_body": False}


def origin_allowed(allowed: frozenset[str], headers: Headers) -> bool:
    """Any origin when no allowlist is set; else a listed origin or the service's own.

    A request without Origin does not come from a browser page; the check protects browser
    users only (any other client can send any Origin), so it is let through.
    """
    origin = headers.get("origin")
    if not allowed or origin is None or "*" in allowed:
        return True
    return origin.rstrip("/").lower() in allowed or urlsplit(origin).netloc == headers.get("host")


def client_address(scope: Scope) -> str:
    """The client's address, as the per-address limit counts it (behind a trusted proxy, the
    address it forwarded: SCORE_TRUSTED_PROXIES)."""
    client = scope.get("client")
    return address_key(str(client[0])) if client else "unknown"


def address_key(host: str) -> str:
    """What the per-address limit counts `host` as: an IPv4 address as it is, an IPv6 one by
    its /64 (one subscriber's network: a host may take any of its 2^64 addresses)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP address (a Unix socket's peer): counted as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


async def pump(
    sub: Pumped, send: Send, pick: Callable[[Frame], Message], send_timeout_s: float
) -> Ending:
    """Send `sub` its frames, and keepalives if it asked for them (SSE), until it must end;
    why it ended."""
    while True:
        await sub.wake.wait()
        sub.wake.clear()
        if sub.ending is not None:
            return sub.ending
        frame = sub.take()
        if frame is not None:
            message = pick(frame)
        elif sub.keepalive:
            message = KEEPALIVE
        else:
            continue
        sub.keepalive = False
        try:
            async with asyncio.timeout(send_timeout_s):
                await send(message)
        except TimeoutError:
            return TOO_SLOW
        except OSError:  # the server's "client disconnected"
            return CLIENT_LEFT


S = TypeVar("S", bound=Subscriber)
Reader = Callable[[], Coroutine[Any, Any, Ending]]  # reads from the client until it leaves


class _Endpoint:
    def __init__(self, live: Broadcaster) -> None:
        self.live = live
        settings = live.settings
        self.allowed = frozenset(o.rstrip("/").lower() for o in settings.live_allowed_origins)
        self.send_timeout_s = settings.live_send_timeout_s

    async def subscribe(self, sub: S) -> S:
        """`sub`, admitted, with a leaderboard to send first; Refused if there is none in time."""
        self.live.admit(sub)
        if await self.live.wait_for_state(SNAPSHOT_WAIT_S):
            return sub
        self.live.release(sub)
        raise Refused(UNAVAILABLE)

    async def follow(
        self, sub: Pumped, read: Reader, send: Send, pick: Callable[[Frame], Message]
    ) -> Ending:
        """Pump frames to `sub` while `read` reads from its client; why it ended."""

        async def watch() -> None:
            sub.end(await read())

        watcher = asyncio.create_task(watch())
        try:
            return self.counted(await pump(sub, send, pick, self.send_timeout_s))
        finally:
            await cancel_and_wait(watcher)

    @staticmethod
    def counted(ending: Ending) -> Ending:
        """`ending`, counted in the metrics if the server ended the connection."""
        if ending is not CLIENT_LEFT:
            CLOSED.labels(ending.label).inc()
        return ending

    async def last_words(self, send: Send, message: Message) -> None:
        """Send a closing message if the client takes it in time (a stuck one may not)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(self.send_timeout_s):
                await send(message)


class LiveSocket(_Endpoint):
    """`WS /api/v1/leaderboard/ws`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if not origin_allowed(self.allowed, Headers(scope=scope)):
            CLOSED.labels("origin").inc()
            await send({"type": "websocket.close", "code": 1008})  # before accept: a 403
            return
        address = client_address(scope)
        wire = wire_of(receive)
        sub = Pumped(address) if wire is None else Direct(address, wire, self.send_timeout_s)
        # which path clients take: "asgi" under uvicorn means the fast path was lost
        WS_CLIENTS.labels("asgi" if wire is None else "direct").inc()
        try:
            await self.subscribe(sub)
        except Refused as refused:
            # Accepted, then closed: a browser sees the close code of an open socket, never
            # a refused handshake's status.
            CLOSED.labels(refused.ending.label).inc()
            await send({"type": "websocket.accept"})
            await send(_close(refused.ending))
            return
        try:
            await send({"type": "websocket.accept"})
            read = partial(read_socket, receive, self.live.settings.live_max_message_bytes)
            if isinstance(sub, Direct):
                limit_stuck_time(sub.wire, self.stuck_limit_s())
                ending = self.counted(await sub.follow(read))
            else:
                ending = await self.follow(sub, read, send, _ws_message)
            if ending is not CLIENT_LEFT:
                await self.last_words(send, _close(ending))
        finally:
            self.live.release(sub)

    def stuck_limit_s(self) -> float:
        # Twice what the server itself waits on a client (a send: the send timeout; a pong:
        # the ping interval, which is also the pong deadline): by then the server has given
        # up on it anyway, and the kernel only clears away what the server's close could not.
        settings = self.live.settings
        return 2 * max(settings.live_send_timeout_s, settings.live_ping_interval_s)


def _close(ending: Ending) -> Message:
    return {"type": "websocket.close", "code": ending.code, "reason": ending.reason}


def _ws_message(frame: Frame) -> Message:
    return frame.ws


def _sse_message(frame: Frame) -> Message:
    return frame.sse


async def read_socket(receive: Receive, limit: int) -> Ending:
    """Read what the client sends (nothing is expected) until it leaves or sends too much."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return CLIENT_LEFT
        data = message.get("bytes") or (message.get("text") or "").encode()
        if len(data) > limit:
            return TOO_BIG


class LiveStream(_Endpoint):
    """`GET /api/v1/leaderboard/stream`: Server-Sent Events, the event id is the version."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        if not origin_allowed(self.allowed, headers):
            CLOSED.labels("origin").inc()
            await problem(403, FORBIDDEN_ORIGIN)(scope, receive, send)
            return
        after = streamids.parse(headers.get("last-event-id", "").strip())
        try:
            sub = await self.subscribe(Pumped(client_address(scope), after, heartbeat=True))
        except Refused as refused:
            CLOSED.labels(refused.ending.label).inc()
            retry = {"Retry-After": RETRY_AFTER_S}
            await problem(503, refused.ending.reason, retry)(scope, receive, send)
            return
        try:
            start = {"type": "http.response.start", "status": 200, "headers": self.head(headers)}
            await send(start)
            if scope["method"] == "HEAD":
                await send(SSE_END)
                return
            await send(SSE_PREAMBLE)
            ending = await self.follow(sub, partial(read_request, receive), send, _sse_message)
            if ending is not CLIENT_LEFT:
                await self.last_words(send, SSE_END)  # EventSource reconnects after `retry`
        finally:
            self.live.release(sub)

    def head(self, headers: Headers) -> list[tuple[bytes, bytes]]:
        # Cross-origin pages may read the stream (EventSource obeys CORS): any origin without
        # an allowlist, else the (already checked) requesting one.
        origin = headers.get("origin")
        allow = "*" if not self.allowed or origin is None else origin
        return [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache, no-transform"),
            (b"x-accel-buffering", b"no"),  # proxies must not buffer the stream
            (b"access-control-allow-origin", allow.encode("latin-1")),
            (b"vary", b"origin"),
        ]


async def read_request(receive: Receive) -> Ending:
    """Wait until the SSE client goes away."""
    while (await receive())["type"] != "http.disconnect":
        pass
    return CLIENT_LEFT


async def upgrade_required(request: Request) -> Response:
    """A plain GET of the WebSocket endpoint: say how to use it."""
    detail = (
        "this is a WebSocket endpoint: connect with a WebSocket client (ws:// or wss://), "
        "or read the same frames from GET /api/v1/leaderboard/stream (Server-Sent Events)"
    )
    return problem(426, detail, {"Upgrade": "websocket"})


def live_routes(live: Broadcaster) -> list[BaseRoute]:
    """The WebSocket and SSE endpoints, fed by `live`."""
    return [
        WebSocketRoute("/api/v1/leaderboard/ws", LiveSocket(live)),
        Route("/api/v1/leaderboard/ws", upgrade_required, methods=["GET"]),
        Route("/api/v1/leaderboard/stream", LiveStream(live), methods=["GET"]),
    ]
