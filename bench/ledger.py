"""Correctness after the run: a fast wrong answer is a failure.

Every acknowledged increment (a 2xx from the service, or a direct OK from the script) is
counted. A request that wrk abandoned in flight (at the end of a run, or on a timeout) may
have been applied without being acknowledged, so Redis's total must lie between the
acknowledged sum and that sum plus the number of such requests. Postgres, once the persister
has drained the stream, must equal Redis user by user, and its ledger must add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis

from service.keys import KeySchema

CHUNK = 100_000


@dataclass
class Ledger:
    acknowledged: int = 0
    unacknowledged: int = 0  # requests that may or may not have been applied

    def add(self, ok: int, in_doubt: int) -> None:
        self.acknowledged += ok
        self.unacknowledged += in_doubt


def redis_totals(client: redis.Redis) -> dict[str, int]:
    """user_id -> total, from every partition's leaderboard ZSET (scores are negated)."""
    totals: dict[str, int] = {}
    key = KeySchema(1).all()[0].leaderboard
    start = 0
    while True:
        chunk = client.zrange(key, start, start + CHUNK - 1, withscores=True)
        totals.update((member.decode(), -int(score)) for member, score in chunk)
        if len(chunk) < CHUNK:
            return totals
        start += CHUNK


def check_redis(client: redis.Redis, ledger: Ledger) -> dict[str, object]:
    """Redis's total against the acknowledged increments."""
    total = sum(redis_totals(client).values())
    low, high = ledger.acknowledged, ledger.acknowledged + ledger.unacknowledged
    return {
        "redis_total": total,
        "acknowledged": ledger.acknowledged,
        "in_doubt": ledger.unacknowledged,
        "ok": low <= total <= high,
    }


def check_postgres(client: redis.Redis, database_url: str) -> dict[str, object]:
    """Postgres equals Redis user by user, and each total is the sum of its events."""
    in_redis = redis_totals(client)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT user_id, score FROM users").fetchall()
        row = conn.execute("SELECT count(*), coalesce(sum(delta), 0) FROM score_events").fetchone()
    in_pg = {str(u): int(s) for u, s in rows}  # type: ignore[call-overload]
    events, events_sum = (int(row[0]), int(row[1])) if row else (0, 0)  # type: ignore[call-overload]
    differing = [u for u in in_redis.keys() | in_pg.keys() if in_redis.get(u) != in_pg.get(u)]
    pg_total = sum(in_pg.values())
    return {
        "postgres_total": pg_total,
        "redis_total": sum(in_redis.values()),
        "events": events,
        "events_sum": events_sum,
        "users_differing": len(differing),
        "example": differing[:5],
        "ok": not differing and events_sum == pg_total,
    }
