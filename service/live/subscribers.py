"""How the broadcaster feeds one live client. Two ways behind one interface (`offer`, `end`):

- `Direct` (WebSockets under uvicorn): the broadcaster writes the frame's ready-made bytes
  (`Frame.wire`) straight to the connection's transport, for every client in one loop. No task
  wakes up, no timer starts and nothing is re-framed per client and frame; the connection's
  own task only reads what the client sends (nothing, normally), so there is no second task.
- `Pumped` (SSE, and WebSockets where the transport cannot be reached, e.g. the test client):
  the connection's task sends each frame itself through the ASGI `send`; the broadcaster only
  hands it the newest frame and wakes it.

Either way a client holds at most the newest frame it has not been sent (never a queue), and
a client that cannot take a frame for longer than the send timeout ends as too slow (4001).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple, Protocol, cast

from service.live.frames import Frame
from service.streamids import Order


class Ending(NamedTuple):
    """Why the server ends a connection: a WebSocket close code, a reason, a metric label."""

    code: int
    reason: str
    label: str


TOO_SLOW = Ending(4001, "too slow: the client did not keep up", "slow")


class Subscriber:
    """One client: the newest frame it has not been sent, and whether it must end."""

    __slots__ = ("address", "ending", "pending", "sent")

    def __init__(self, address: str) -> None:
        self.address = address
        self.pending: Frame | None = None
        self.sent: Frame | None = None
        self.ending: Ending | None = None

    def offer(self, frame: Frame, now: float) -> bool:
        """Make `frame` the next to send, replacing any older one not sent yet. True while the
        client is behind: the frame waits, and the broadcaster offers again next tick."""
        raise NotImplementedError

    def end(self, ending: Ending) -> None:
        """Make the connection end (the first reason given wins)."""
        raise NotImplementedError

    def ping(self) -> None:
        """Ask for a keepalive, if this client wants the broadcaster's (SSE)."""


class Pumped(Subscriber):
    """A client whose own task sends its frames (see `service.live.endpoints.pump`)."""

    __slots__ = ("after", "heartbeat", "keepalive", "wake")

    def __init__(self, address: str, after: Order | None = None, heartbeat: bool = False) -> None:
        super().__init__(address)
        self.after = after  # send no frame at or below this version (SSE Last-Event-ID)
        self.heartbeat = heartbeat  # wants keepalives from the broadcaster (SSE)
        self.keepalive = False
        self.wake = asyncio.Event()

    def offer(self, frame: Frame, now: float) -> bool:
        if frame is not self.sent:
            self.pending = frame
            self.wake.set()
        return False  # the client's own task waits for it (with the send timeout)

    def ping(self) -> None:
        if self.heartbeat and self.pending is None:
            self.keepalive = True
            self.wake.set()

    def end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
            self.wake.set()

    def take(self) -> Frame | None:
        """The frame to send now, if any (consumes it)."""
        frame, self.pending = self.pending, None
        if frame is None or (self.after is not None and frame.order <= self.after):
            return None
        self.after, self.sent = None, frame
        return frame


class Wire(Protocol):
    """What `Direct` uses of a connection's transport (asyncio's and uvloop's have it all)."""

    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


WIRE_METHODS = ("write", "get_write_buffer_size", "is_closing", "get_extra_info")


def wire_of(receive: Callable[[], Awaitable[object]]) -> Wire | None:
    """The connection's transport, when the server lets us reach it; else None.

    uvicorn's `receive` is a method of its per-connection protocol object, which holds the
    transport (Starlette passes `receive` through as it is; it wraps `send`). Elsewhere, e.g.
    in the test client or behind a middleware that wraps `receive`, frames go through the
    ASGI `send` instead: one task and one send per client and frame, slower, as correct.
    """
    wire = getattr(getattr(receive, "__self__", None), "transport", None)
    if wire is None or not all(callable(getattr(wire, name, None)) for name in WIRE_METHODS):
        return None
    return cast(Wire, wire)


def limit_stuck_time(wire: Wire, seconds: float) -> None:
    """Let the kernel drop the connection once data waits longer than `seconds` for the peer
    (TCP_USER_TIMEOUT: unacknowledged, or unsent because the peer's window stays shut).

    The server gives up on a client that stops reading (4001, or a ping timeout), but closing
    a socket waits for its unsent bytes to leave, and TCP keeps probing a peer that is alive
    yet never reads forever: without this, such a connection and its buffers would stay.
    """
    sock = wire.get_extra_info("socket")
    option = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
    if sock is not None and option is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))


class Direct(Subscriber):
    """A WebSocket client whose frames the broadcaster writes straight to its transport."""

    __slots__ = ("behind_since", "interrupt", "send_timeout_s", "streaming", "wire")

    def __init__(self, address: str, wire: Wire, send_timeout_s: float) -> None:
        super().__init__(address)
        self.wire = wire
        self.send_timeout_s = send_timeout_s
        self.streaming = False  # frames may be written (the handshake is answered)
        self.interrupt: asyncio.Timeout | None = None  # ends the connection task's read
        self.behind_since: float | None = None  # since when a frame waits for the client

    async def follow(self, read: Callable[[], Coroutine[Any, Any, Ending]]) -> Ending:
        """Let the broadcaster write frames while `read()` reads from the client (in the
        caller's task: the connection's one task); why the connection ended. Call it once the
        handshake is answered.

        `end()` must stop the read from outside, e.g. when this client is too slow: the read
        runs under a timeout without a deadline, which `end()` expires.
        """
        try:
            async with asyncio.timeout(None) as self.interrupt:
                self.streaming = True
                if self.ending is not None:  # ended while the handshake was answered
                    self.interrupt.reschedule(0)
                elif self.pending is not None:
                    self._write(self.pending)  # the snapshot, or anything newer
                ending = await read()
                if self.ending is None:
                    self.ending = ending
        except TimeoutError:
            pass  # interrupted by end(): self.ending says why
        finally:
            self.interrupt = None
        assert self.ending is not None
        return self.ending

    def offer(self, frame: Frame, now: float) -> bool:
        if self.ending is not None or frame is self.sent:
            return False
        self.pending = frame
        if not self.streaming or self.wire.is_closing():
            return False  # not answered yet (follow() writes it), or gone (its task will see)
        if self.wire.get_write_buffer_size():
            # Bytes of an earlier frame still wait in our buffer (the kernel's is full): the
            # client has not taken it yet. Hold this one back, newest only, rather than queue.
            if self.behind_since is None:
                self.behind_since = now
            elif now - self.behind_since >= self.send_timeout_s:
                self.end(TOO_SLOW)
                return False
            return True
        self._write(frame)
        return False

    def _write(self, frame: Frame) -> None:
        self.pending, self.sent, self.behind_since = None, frame, None
        self.wire.write(frame.wire)

    def end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
            if self.interrupt is not None:
                self.interrupt.reschedule(0)  # a deadline in the past: expires at once
