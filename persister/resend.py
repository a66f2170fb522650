"""Sending a Redis write again after its reply was lost: only for writes made safe to repeat.

A connection that breaks after the command was sent leaves the caller not knowing whether it
ran. The client never resends a write by itself; the callers here do, because each of their
writes is idempotent by construction (the same values again, or a token the Lua call checks
and records in the same atomic step: lua/swap_leaderboard-5.lua, lua/repair_scores-2.lua).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis
import redis.retry
from redis.backoff import ExponentialBackoff

T = TypeVar("T")

RETRIES = redis.retry.Retry(
    ExponentialBackoff(cap=1.0, base=0.05), 5, (redis.ConnectionError, redis.TimeoutError)
)


def resent(call: Callable[[], T]) -> T:
    """`call()`, made again (with backoff, a few times) when the connection failed: `call`
    must be safe to repeat."""
    return RETRIES.call_with_retry(call, lambda _error: None)
