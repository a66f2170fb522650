"""Rebuilding Redis's leaderboards from Postgres: `score-service rebuild`, and a service that
finds a Redis without its leaderboards (new, or wiped) before it reports ready.

Each partition's leaderboard is built into a key of its own (same hash tag), then swapped in
atomically by lua/swap_leaderboard-3.lua. Totals are Postgres's scores plus the increments
Redis accepted that Postgres has not committed yet, so no acknowledged increment is lost. The
Idempotency-Key records of the last SCORE_IDEMPOTENCY_TTL are restored too
(persister.idempotency), before the swap: once the users are known again, a retry of a request
made before a wipe is a replay, never a second increment.

Races, and what answers them:
- The persister is paused (every flush lock held) while the build reads, so Postgres and the
  stream's delivery state hold still and no increment is counted twice or not at all.
- The hot path keeps running: increments accepted during the build are replayed onto the new
  leaderboard by the swap script, in the same atomic step as the RENAME. (On a wiped Redis
  there are none: every user is unknown until the swap, so the hot path answers 404.)
- Concurrent service processes: one rebuild at a time (a Redis lock); the others wait, then
  find the ready marker set and do nothing.
- A user provisioned during the build may have been added to the old leaderboard only: users
  created since the rebuild began are added afterwards (ZADD NX keeps anyone already there).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
import redis

from persister.idempotency import restore_records
from persister.locks import PersisterBusy, paused
from persister.unpersisted import Unpersisted, read_unpersisted
from service.connections import sync_redis
from service.keys import KeySchema
from service.scripts import SyncScripts
from service.settings import Settings

log = logging.getLogger(__name__)

REBUILD_LOCK_TTL_S = 60.0
REBUILD_WAIT_S = 30.0
"""How long a process waits for another's rebuild before it gives up (and tries again later)."""
CHUNK = 10_000

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What a rebuild did."""

    users: int
    unpersisted: int
    """Increments waiting in Redis, added to Postgres's scores."""
    replayed: int
    """Increments accepted during the build, replayed onto the new leaderboards."""
    records: int
    """Idempotency-Key records restored (those Redis did not hold)."""
    seconds: float


def rebuild_if_missing(settings: Settings) -> None:
    """The service's hook: rebuild unless Redis already holds the leaderboards."""
    done = rebuild(settings, force=False)
    if done is not None:
        log.info("rebuilt Redis from Postgres: %s", done)


def rebuild(settings: Settings, *, force: bool) -> Rebuilt | None:
    """Rebuild every partition's leaderboard and top-N from Postgres, then set the ready
    marker. Unless `force`, do nothing (None) when the marker is already set."""
    client = sync_redis(settings)
    schema = KeySchema(settings.partitions)
    lock = client.lock(schema.rebuild_lock, timeout=REBUILD_LOCK_TTL_S, sleep=0.1)
    try:
        if not lock.acquire(blocking_timeout=REBUILD_WAIT_S):
            raise PersisterBusy(f"another rebuild still runs after {REBUILD_WAIT_S:.0f}s")
        try:
            if not force and client.exists(schema.ready_marker):
                return None
            with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
                # one snapshot for the ledger check and the scores: a batch whose commit
                # lands while we read is in both or in neither (see Persister._persist)
                conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                done = _rebuild(client, conn, settings, lock.reacquire)
            client.set(schema.ready_marker, "1")
            return done
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()
    finally:
        client.close()


def _rebuild(
    client: redis.Redis, conn: Conn, settings: Settings, renew: Callable[[], None]
) -> Rebuilt:
    began = time.monotonic()
    schema = KeySchema(settings.partitions)
    started = _now(conn)
    scripts = SyncScripts(client)
    with paused(client, schema) as pause:

        def keep_alive() -> None:  # raises LockNotOwnedError if the pause was lost
            pause.renew()
            renew()

        waiting = {k.index: read_unpersisted(client, conn, k, keep_alive) for k in schema.all()}
        keyed = itertools.chain.from_iterable(w.keyed for w in waiting.values())
        records = restore_records(
            client, conn, schema, settings.idempotency_ttl_s, keyed, keep_alive
        )
        for keys in schema.all():
            client.delete(keys.rebuilt_leaderboard)
        users = _fill(client, conn, schema, waiting, keep_alive)
        keep_alive()
        replayed = sum(
            scripts.swap_leaderboard(keys, waiting[keys.index].last_id) for keys in schema.all()
        )
    conn.commit()  # end the snapshot: users created since `started` must be seen
    _add_new_users(client, conn, schema, started)
    for keys in schema.all():
        scripts.publish_top(keys, settings.top_n)
    unpersisted = sum(w.count for w in waiting.values())
    return Rebuilt(users, unpersisted, replayed, records, round(time.monotonic() - began, 3))


def _now(conn: Conn) -> datetime:
    row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[return-value]


def _fill(
    client: redis.Redis,
    conn: Conn,
    schema: KeySchema,
    waiting: dict[int, Unpersisted],
    keep_alive: Callable[[], None],
) -> int:
    """Fill the rebuilt leaderboards from Postgres, chunk by chunk; the number of users."""
    count = 0
    with conn.cursor(name="rebuild_users") as cursor:  # server side: memory stays flat
        cursor.execute("SELECT user_id, score FROM users")
        while rows := cursor.fetchmany(CHUNK):
            members: dict[int, dict[str, int]] = defaultdict(dict)
            for user_id, score in rows:
                index = schema.for_user(str(user_id)).index
                total = int(score) + waiting[index].deltas.get(str(user_id), 0)  # type: ignore[call-overload]
                members[index][str(user_id)] = -total  # stored negated: best first
            pipe = client.pipeline(transaction=False)
            for index, mapping in members.items():
                pipe.zadd(schema.all()[index].rebuilt_leaderboard, mapping)
            pipe.execute()
            count += len(rows)
            keep_alive()
    return count


def _add_new_users(client: redis.Redis, conn: Conn, schema: KeySchema, started: datetime) -> None:
    # A minute of margin: created_at is its transaction's start, which may precede `started`
    # while the row became visible only after the build read the users.
    rows = conn.execute(
        "SELECT user_id, score FROM users WHERE created_at >= %s - interval '1 minute'", (started,)
    ).fetchall()
    for user_id, score in rows:
        keys = schema.for_user(str(user_id))
        client.zadd(keys.leaderboard, {str(user_id): -int(score)}, nx=True)  # type: ignore[call-overload]
