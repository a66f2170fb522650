"""Ending background tasks: cancel, then wait until they have ended."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[object] | asyncio.Task[None]) -> None:
    """Cancel `task` and return once it has ended, its cleanup done. An error it ended with
    is logged, not raised: the caller is done with it. A cancellation of the caller itself
    is never swallowed."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the caller is being cancelled too
    except Exception:
        log.warning("task %s ended with an error", task.get_name(), exc_info=True)
