"""The resources one service process owns, opened and closed by the app's lifespan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from service.auth import Authenticator
from service.keys import KeySchema
from service.scripts import Scripts
from service.settings import Settings

FlushRequester = Callable[[int], None]
"""Asks the persister to flush a partition (fire and forget; never blocks the caller)."""


@dataclass(slots=True)
class Context:
    settings: Settings
    schema: KeySchema
    redis: aioredis.Redis
    """Never re-sends a command: what writes goes through it (and `scripts`)."""
    reads: aioredis.Redis
    """For reads only: a read is sent again once after a broken connection (a Redis that
    restarted leaves dead connections in the pool), which the other client never does."""
    scripts: Scripts
    auth: Authenticator
    pg: AsyncConnectionPool
    request_flush: FlushRequester | None = None
    ready: bool = False
    not_ready_reason: str = "starting"
    draining: bool = False  # SIGTERM: shutting down (service.live.going_away); /readyz answers 503
