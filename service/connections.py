"""Redis and Postgres clients with the timeouts the hot path needs.

The hot path fails closed and fast: a Redis that is down or hung costs a request at most
about a second (then 503 with Retry-After), never a hang.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.settings import ConfigError, Settings

SOCKET_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 0.25
SAFE_EVICTION_POLICY = "noeviction"


def _redis_options() -> dict[str, Any]:
    # One immediate retry on a broken connection: after a Redis restart, the first use of a
    # pooled connection fails and a fresh one succeeds. Timeouts are not retried.
    return {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "retry": Retry(NoBackoff(), 1),
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }


def async_redis(settings: Settings, **overrides: Any) -> aioredis.Redis:
    """An asyncio client with bounded timeouts."""
    return aioredis.Redis.from_url(settings.redis_url, **(_redis_options() | overrides))


def sync_redis(settings: Settings, **overrides: Any) -> redis.Redis:
    """A blocking client with bounded timeouts (CLI, persister)."""
    options = _redis_options() | {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
    return redis.Redis.from_url(settings.redis_url, **(options | overrides))


def eviction_problem(info: dict[str, Any]) -> str | None:
    """Why a Redis with this `INFO memory` could lose our keys, or None if it cannot."""
    policy = info.get("maxmemory_policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy != SAFE_EVICTION_POLICY:
        return (
            f"Redis maxmemory-policy is {policy!r}: it could evict leaderboard, rate-limit or "
            f"idempotency keys. Set 'maxmemory-policy {SAFE_EVICTION_POLICY}' (see redis.conf)"
        )
    return None


def check_redis_sync(client: redis.Redis) -> None:
    """Refuse a Redis that could evict our keys (ConfigError)."""
    problem = eviction_problem(client.info("memory"))
    if problem:
        raise ConfigError(problem)
