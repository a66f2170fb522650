"""Draining on SIGTERM: taken out of the load balancer, then no accepted request is lost.

Left alone, uvicorn stops listening the moment SIGTERM arrives, while a load balancer still
sends new connections our way (they are refused), closes WebSockets with 1012 and keeps SSE
streams open until its graceful timeout cancels them. The hook below runs first:

1. At once: `ctx.draining`. /readyz answers 503, so the load balancer takes this instance
   out; every response says `Connection: close`, so no client keeps a connection to us.
2. For SCORE_SHUTDOWN_GRACE_S (SIGTERM only; Ctrl-C has no load balancer to wait for):
   requests are served as usual, while the load balancer notices.
3. Stop listening: new connections are refused (a client knows it was not served). Live
   clients get 1001 "going away" (SSE streams end; clients reconnect elsewhere), and the
   connections accepted just before have their requests arrive.
4. The signal goes on to uvicorn's own handler: idle connections are closed, requests in
   flight finish (within its graceful timeout), then the app's lifespan ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import Context
from service.live.broadcast import GOING_AWAY, Broadcaster

log = logging.getLogger(__name__)

GOING_AWAY_WAIT_S = 2.0  # how long live clients get to be told before the server's shutdown
SETTLE_S = 0.5
"""After the listener closes: how long a connection accepted just before has for its request
to arrive (uvicorn's shutdown closes a connection that has not sent one yet)."""


def hook_shutdown_signals(ctx: Context, live: Broadcaster) -> Callable[[], None]:
    """Install the SIGTERM/SIGINT hook (the drain above); returns the function that removes
    it again."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals belong to whoever runs us in a thread (tests' TestClient)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in signals}
    pending: set[asyncio.Task[None]] = set()

    def pass_on(sig: int, frame: FrameType | None) -> None:
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    async def drain(sig: int, frame: FrameType | None) -> None:
        grace_s = ctx.settings.shutdown_grace_s if sig == signal.SIGTERM else 0
        log.info("%s: draining (not ready; %ss before the listener closes)", sig_name(sig), grace_s)
        try:
            await asyncio.sleep(grace_s)  # the load balancer sees /readyz 503 meanwhile
            stop_listening(previous[sig])
            await asyncio.gather(
                live.go_away(GOING_AWAY, GOING_AWAY_WAIT_S), asyncio.sleep(SETTLE_S)
            )
        finally:
            pass_on(sig, frame)

    def begin(sig: int, frame: FrameType | None) -> None:
        task = loop.create_task(drain(sig, frame))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if ctx.draining:
            # Ctrl-C again: the server decides (uvicorn: stop now, ^C ^C: force exit). A
            # SIGTERM again (the supervisor passing on the one the whole group got) changes
            # nothing: the drain goes on.
            if sig == signal.SIGINT:
                pass_on(sig, frame)
            return
        ctx.draining = True
        loop.call_soon_threadsafe(begin, sig, frame)

    for sig in signals:
        signal.signal(sig, on_signal)

    def unhook() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return unhook


def sig_name(sig: int) -> str:
    return signal.Signals(sig).name


def stop_listening(handler: object) -> None:
    """Close the listening sockets of the uvicorn server whose signal handler is `handler`
    (its `handle_exit`), if it is one: new connections are refused from now on. (uvicorn's
    own shutdown closes them again, harmlessly.)"""
    server = getattr(handler, "__self__", None)
    for listener in getattr(server, "servers", None) or ():
        with contextlib.suppress(Exception):
            listener.close()


CLOSE = (b"connection", b"close")


def draining(scope: Scope) -> bool:
    """Whether the app of this request is draining (every response says Connection: close)."""
    ctx: Context | None = getattr(scope["app"].state, "ctx", None) if "app" in scope else None
    return ctx is not None and ctx.draining


class CloseWhileDraining:
    """ASGI middleware: while the process drains, every HTTP response says
    `Connection: close`, so that no client goes on sending requests on a connection to us."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not draining(scope):
            await self.app(scope, receive, send)  # `receive` as it is: see subscribers.wire_of
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"connection"]
                message = {**message, "headers": [*headers, CLOSE]}
            await send(message)

        await self.app(scope, receive, closing)
