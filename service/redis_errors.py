"""Redis unavailable -> 503 with Retry-After: fail closed and fast, never hang."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.exceptions

from service.errors import ApiError

RETRY_AFTER_S = 1


@asynccontextmanager
async def redis_unavailable() -> AsyncIterator[None]:
    """Turn Redis outages inside the block into ApiError(503)."""
    try:
        yield
    except redis.exceptions.BusyLoadingError:
        raise ApiError(
            503, "Redis is loading its data; retry shortly", {"Retry-After": str(RETRY_AFTER_S)}
        ) from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise ApiError(
            503, f"the score store is unavailable ({type(exc).__name__}); retry shortly",
            {"Retry-After": str(RETRY_AFTER_S)},
        ) from None
