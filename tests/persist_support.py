"""Helpers for the persister's tests: increments accepted by the real Lua hot path, and what
each store holds."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable

import psycopg
import redis

from service import streamids
from service.keys import KeySchema
from service.persister_lag import read_lags_sync
from service.scripts import SubmitResult, SyncScripts, prepare_submit
from service.settings import Settings

Conn = psycopg.Connection[tuple[object, ...]]


def submit(
    settings: Settings,
    client: redis.Redis,
    user_id: str,
    delta: int,
    key: str | None = None,
) -> SubmitResult:
    """One increment through submit_score: as an operator (no rate limit) without a key; with
    a key, as the player (the key in the players' namespace, as a game client sends it)."""
    call = prepare_submit(
        settings,
        KeySchema(settings.partitions),
        user_id,
        delta,
        idempotency_key=key,
        operator=key is None,
    )
    return SyncScripts(client).run(call)


def redis_totals(
    settings: Settings, client: redis.Redis, user_ids: Iterable[str]
) -> dict[str, int]:
    """Each user's total in Redis (users missing from Redis are left out)."""
    schema = KeySchema(settings.partitions)
    totals = {}
    for user_id in user_ids:
        stored = client.zscore(schema.for_user(user_id).leaderboard, user_id)
        if stored is not None:
            totals[user_id] = -int(stored)
    return totals


def pg_scores(conn: Conn, user_ids: Iterable[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT user_id, score FROM users WHERE user_id = ANY(%s)", (list(user_ids),)
    ).fetchall()
    return {str(u): int(s) for u, s in rows}  # type: ignore[call-overload]


def ledger(conn: Conn, user_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """The ledger's rows for these users: event id -> (user, delta)."""
    rows = conn.execute(
        "SELECT event_id::text, user_id, delta FROM score_events WHERE user_id = ANY(%s)",
        (list(user_ids),),
    ).fetchall()
    return {str(e): (str(u), int(d)) for e, u, d in rows}  # type: ignore[call-overload]


KeyedRow = tuple[str, str | None, int, int | None]


def keyed_rows(conn: Conn, user_ids: Iterable[str]) -> list[KeyedRow]:
    """The ledger's rows for these users, (user, Idempotency-Key, delta, total), in the order
    Redis accepted them."""
    rows = conn.execute(
        "SELECT stream_id, user_id, idempotency_key, delta, total FROM score_events"
        " WHERE user_id = ANY(%s)",
        (list(user_ids),),
    ).fetchall()
    rows.sort(key=lambda row: streamids.order(str(row[0])))
    return [(str(u), k, int(d), t) for _, u, k, d, t in rows]  # type: ignore[misc, call-overload]


def unpersisted(settings: Settings, client: redis.Redis) -> int:
    """Events waiting in Redis for the persister, over every partition."""
    return sum(
        lag.unpersisted for lag in read_lags_sync(client, KeySchema(settings.partitions).all())
    )


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`score-service ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
