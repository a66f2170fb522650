"""The persister worker's heartbeat: who is alive, for /readyz and `worker --check`.

Each worker records itself (`host:pid`) in one sorted set with the time of its last beat, on
Redis's clock (every host agrees on it, whatever its own clock says). Readers count the beats
younger than HEARTBEAT_FRESH_S in one round trip (service.persister_lag.live_workers). A
worker that stops cleanly removes itself; one that dies stops beating, and is removed from
the set by the next worker's beat once it is long gone.

RQ keeps a registry of its workers too, but refreshes it only between jobs, with a time to
live of minutes: a flush of 30 s or a dead worker would show up late or not at all.
"""

from __future__ import annotations

import redis

from service.keys import PERSISTER_WORKERS
from service.persister_lag import TIME_AT_KEY

FORGET_AFTER_MS = 3600 * 1000
"""A worker silent this long leaves the set (it only told readers that it was dead)."""


def beat(client: redis.Redis, worker: str) -> None:
    """Record that `worker` is alive now (two round trips: Redis's time, then the beat)."""
    seconds, micros = client.eval(TIME_AT_KEY, 1, PERSISTER_WORKERS)
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    pipe = client.pipeline(transaction=False)
    pipe.zadd(PERSISTER_WORKERS, {worker: now_ms})
    pipe.zremrangebyscore(PERSISTER_WORKERS, "-inf", now_ms - FORGET_AFTER_MS)
    pipe.execute()


def forget(client: redis.Redis, worker: str) -> None:
    """Say that `worker` has stopped (readers count it out at once)."""
    client.zrem(PERSISTER_WORKERS, worker)
