"""Correctness after the run: a fast wrong answer is a failure.

Every acknowledged increment (a 2xx from the service, or a direct OK from the script) is
counted. A request that wrk abandoned in flight (at the end of a run, or on a timeout) may
have been applied without being acknowledged, so Redis's total must lie between the
acknowledged sum and that sum plus the number of such requests. Postgres, once the persister
has drained the stream, must equal Redis user by user, and its ledger must add up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import psycopg
import redis

from service.keys import KeySchema

CHUNK = 100_000
ONE = KeySchema(1)


@dataclass
class Ledger:
    acknowledged: int = 0
    unacknowledged: int = 0  # requests that may or may not have been applied

    def add(self, ok: int, in_doubt: int) -> None:
        self.acknowledged += ok
        self.unacknowledged += in_doubt


def leaderboard_totals(client: redis.Redis, key: str) -> dict[str, int]:
    """user_id -> total, from one leaderboard ZSET (scores are negated)."""
    totals: dict[str, int] = {}
    start = 0
    while True:
        chunk = client.zrange(key, start, start + CHUNK - 1, withscores=True)
        totals.update((member.decode(), -int(score)) for member, score in chunk)
        if len(chunk) < CHUNK:
            return totals
        start += CHUNK


def redis_totals(client: redis.Redis, schema: KeySchema = ONE) -> dict[str, int]:
    """user_id -> total, from every partition's leaderboard."""
    totals: dict[str, int] = {}
    for partition in schema.all():
        totals.update(leaderboard_totals(client, partition.leaderboard))
    return totals


def check_redis(
    client: redis.Redis, ledger: Ledger, schema: KeySchema = ONE, *, may_lose: bool = False
) -> dict[str, object]:
    """Redis's total against the acknowledged increments. `may_lose`: after a failover
    without WAIT, acknowledged increments may be gone (counted as lost), never invented."""
    total = sum(redis_totals(client, schema).values())
    low, high = ledger.acknowledged, ledger.acknowledged + ledger.unacknowledged
    out: dict[str, object] = {
        "redis_total": total,
        "acknowledged": ledger.acknowledged,
        "in_doubt": ledger.unacknowledged,
        "ok": total <= high and (may_lose or low <= total),
    }
    if may_lose:
        out["lost"] = max(0, low - total)
    return out


def check_postgres(
    client: redis.Redis, database_url: str, schema: KeySchema = ONE, *, at_most: int | None = None
) -> dict[str, object]:
    """Postgres equals Redis user by user, and each total is the sum of its events.

    `at_most`: after a failover without WAIT, the two may differ (Postgres keeps the events
    it committed before the dead primary's unreplicated tail was lost; `reconcile` names those
    users); Postgres must then hold no more than was acknowledged or in doubt."""
    in_redis = redis_totals(client, schema)
    in_pg, events, events_sum = postgres_totals(database_url)
    differing = [u for u in in_redis.keys() | in_pg.keys() if in_redis.get(u) != in_pg.get(u)]
    pg_total = sum(in_pg.values())
    agree = not differing if at_most is None else pg_total <= at_most
    return {
        "postgres_total": pg_total,
        "redis_total": sum(in_redis.values()),
        "events": events,
        "events_sum": events_sum,
        "users_differing": len(differing),
        "example": differing[:5],
        "ok": agree and events_sum == pg_total,
    }


def postgres_totals(database_url: str) -> tuple[dict[str, int], int, int]:
    """user_id -> score; the number of events in the ledger, and the sum of their deltas."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT user_id, score FROM users").fetchall()
        row = conn.execute("SELECT count(*), coalesce(sum(delta), 0) FROM score_events").fetchone()
    in_pg = {str(u): int(s) for u, s in rows}  # type: ignore[call-overload]
    events, events_sum = (int(row[0]), int(row[1])) if row else (0, 0)  # type: ignore[call-overload]
    return in_pg, events, events_sum


@dataclass
class UserLedger:
    """Per user: the increments acknowledged, and those whose answer never came (keyed
    requests given up on: applied once or not at all)."""

    acknowledged: Counter[str] = field(default_factory=Counter)
    in_doubt: Counter[str] = field(default_factory=Counter)


def check_users(
    client: redis.Redis,
    database_url: str,
    schema: KeySchema,
    users: UserLedger,
    *,
    may_lose: bool = False,
) -> dict[str, object]:
    """User by user, Redis and Postgres against a keyed client's ledger: each acknowledged
    increment counted exactly once (`may_lose`: at most once)."""
    names = sorted(users.acknowledged.keys() | users.in_doubt.keys())
    in_pg = postgres_totals(database_url)[0]
    in_redis = {u: -int(client.zscore(schema.for_user(u).leaderboard, u) or 0) for u in names}

    def fits(user: str, got: int) -> bool:
        low = users.acknowledged[user]
        return got <= low + users.in_doubt[user] and (may_lose or low <= got)

    wrong = [u for u in names if not (fits(u, in_redis[u]) and fits(u, in_pg.get(u, 0)))]
    acknowledged = sum(users.acknowledged.values())
    return {
        "users": len(names),
        "acknowledged": acknowledged,
        "in_doubt": sum(users.in_doubt.values()),
        "redis_total": sum(in_redis.values()),
        "postgres_total": sum(in_pg.get(u, 0) for u in names),
        "lost": max(0, acknowledged - sum(in_pg.get(u, 0) for u in names)),
        "users_wrong": len(wrong),
        "example": wrong[:5],
        "ok": not wrong,
    }
