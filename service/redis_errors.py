"""Redis unavailable -> 503 with Retry-After: fail closed and fast, never hang."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.exceptions

from service.context import Context
from service.errors import ApiError

RETRY_AFTER_S = 1

# Redis answers, but cannot take writes right now: out of memory (noeviction), a replica,
# a cluster failing over. Each passes; none is the client's fault.
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
)


def _unavailable(detail: str) -> ApiError:
    return ApiError(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


@asynccontextmanager
async def redis_unavailable() -> AsyncIterator[None]:
    """Turn Redis outages inside the block into ApiError(503) with Retry-After."""
    try:
        yield
    except redis.exceptions.BusyLoadingError:
        raise _unavailable("Redis is loading its data; retry shortly") from None
    except _UNAVAILABLE as exc:
        raise _unavailable(
            f"the score store is unavailable ({type(exc).__name__}); retry shortly"
        ) from None
    except redis.exceptions.ResponseError as exc:
        # MISCONF: Redis refuses writes because it cannot persist them (disk full, AOF error)
        if not str(exc).startswith("MISCONF"):
            raise
        raise _unavailable(
            "the score store cannot persist writes right now; retry shortly"
        ) from None


def refuse_until_ready(ctx: Context) -> None:
    """503 while Redis is not known to hold the leaderboards (starting, being rebuilt from
    Postgres): an existing user must never be told 404 because Redis is still empty."""
    if not ctx.ready:
        raise ApiError(
            503,
            f"the service is not ready ({ctx.not_ready_reason or 'starting'}); retry shortly",
            {"Retry-After": str(RETRY_AFTER_S)},
        )
