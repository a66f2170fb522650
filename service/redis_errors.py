"""Redis unavailable -> 503 with Retry-After: fail closed and fast, never hang."""

from __future__ import annotations

import logging
import re

import redis.exceptions

from service.batching import NotReplicated
from service.context import Context
from service.errors import ApiError

RETRY_AFTER_S = 1

log = logging.getLogger(__name__)

# Error replies of a Redis that answers but cannot serve right now, by their code: busy with
# a long script, loading its data, a replica after a failover, a cluster without a master,
# out of memory (noeviction), unable to persist. None is the client's fault.
_WHY = {
    "BUSY": "is busy running a script",
    "LOADING": "is loading its data",
    "READONLY": "is a read-only replica (a failover?)",
    "MASTERDOWN": "has lost its master",
    "TRYAGAIN": "is moving keys",
    "CLUSTERDOWN": "is a cluster that is down",
    "OOM": "is out of memory",
    "MISCONF": "cannot persist writes",
    "NOREPLICAS": "has not enough replicas",
}


_CODE = re.compile(r"\b(" + "|".join(_WHY) + r")\b")


def _code(exc: redis.exceptions.RedisError) -> str:
    """The error reply's code: redis-py keeps it aside for the errors it has a class for, and
    wraps a pipeline's errors in a sentence ("Command # 1 (...) caused error: ('BUSY ...')"),
    and Redis 6.2 a script's in its own ("ERR Error running script ...: -READONLY ...")."""
    if exc.status_code in _WHY:
        return exc.status_code
    found = _CODE.search(str(exc))
    return found.group(1) if found else exc.status_code or ""


def is_outage(exc: redis.exceptions.RedisError) -> bool:
    """Unreachable, hung, or one of the states in `_WHY`: an outage that passes by itself
    (or with a failover), which a process waits out rather than exit on."""
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return True
    return _code(exc) in _WHY


def _unavailable(detail: str) -> ApiError:
    return ApiError(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


REDIS_ERRORS = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException)
"""What a call to Redis can raise: `except REDIS_ERRORS as exc: raise answer(exc) from None`
(the hot path's form of `redis_unavailable`)."""


class redis_unavailable:  # lower case: used as `async with redis_unavailable():`
    """Turn every Redis error inside the block into ApiError(503) with Retry-After (see
    `answer`)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, REDIS_ERRORS):
            raise answer(exc) from None


def answer(
    exc: redis.exceptions.RedisError | redis.exceptions.RedisClusterException,
) -> ApiError:
    """The 503 (with Retry-After) that a Redis error on a client's request is answered with.

    What reaches Redis has been validated: no Redis error is the client's fault. An outage
    (unreachable, hung, or one of the states in `_WHY`) is expected; any other error reply
    is logged as the bug it would be, and still answered 503, never 500.
    """
    if isinstance(exc, NotReplicated):
        return _unavailable(
            f"the increment reached the score store but was not {exc} (SCORE_REDIS_MIN_REPLICAS):"
            " a failover could lose it; retry with the same Idempotency-Key, which counts it once"
        )
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return _unavailable("the score store is loading its data; retry shortly")
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return _unavailable(f"the score store is unavailable ({type(exc).__name__}); retry shortly")
    if isinstance(exc, redis.exceptions.RedisClusterException):
        # not a RedisError: a slot that no node covers
        return _unavailable(f"the score store {_WHY['CLUSTERDOWN']}; retry shortly")
    why = _WHY.get(_code(exc))
    if why is None:
        log.error("unexpected Redis error, answered 503", exc_info=exc)
        why = "refused the call"
    return _unavailable(f"the score store {why}; retry shortly")


def refuse_until_ready(ctx: Context) -> None:
    """503 while Redis is not known to hold the leaderboards (starting, being rebuilt from
    Postgres): an existing user must never be told 404 because Redis is still empty."""
    if not ctx.ready:
        raise ApiError(
            503,
            f"the service is not ready ({ctx.not_ready_reason or 'starting'}); retry shortly",
            {"Retry-After": str(RETRY_AFTER_S)},
        )


def not_ready() -> ApiError:
    """503 for a NOT_READY reply: the partition's ready marker is gone (Redis lost its data)
    and the service is rebuilding it; an existing user must not be told 404 meanwhile."""
    return ApiError(
        503,
        "the service is not ready (rebuilding Redis from Postgres); retry shortly",
        {"Retry-After": str(RETRY_AFTER_S)},
    )
