"""Going away on SIGTERM: live clients are told before the server stops.

Left alone, uvicorn's shutdown closes WebSockets with 1012 and keeps SSE streams open until
its graceful timeout cancels them. The hook below runs first: every live client gets 1001
"going away" (SSE streams end, and EventSource reconnects elsewhere), then the signal goes on
to the handler it replaced (the server's own shutdown).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from service.broadcast import GOING_AWAY, Broadcaster

GOING_AWAY_WAIT_S = 2.0  # how long clients get to be told before the server's shutdown


def hook_shutdown_signals(live: Broadcaster) -> Callable[[], None]:
    """Install the SIGTERM/SIGINT hook; returns the function that removes it again."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals belong to whoever runs us in a thread (tests' TestClient)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in signals}
    pending: set[asyncio.Task[None]] = set()
    signalled: list[int] = []

    def pass_on(sig: int, frame: FrameType | None) -> None:
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    async def going_away(sig: int, frame: FrameType | None) -> None:
        try:
            await live.go_away(GOING_AWAY, GOING_AWAY_WAIT_S)
        finally:
            pass_on(sig, frame)

    def begin(sig: int, frame: FrameType | None) -> None:
        task = loop.create_task(going_away(sig, frame))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if signalled:  # a second signal: the server decides (uvicorn: force exit on ^C ^C)
            pass_on(sig, frame)
            return
        signalled.append(sig)
        loop.call_soon_threadsafe(begin, sig, frame)

    for sig in signals:
        signal.signal(sig, on_signal)

    def unhook() -> None:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return unhook
