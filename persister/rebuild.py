"""Rebuilding Redis's leaderboards from Postgres: `score-service rebuild`, and a service that
finds a Redis without its leaderboards (new, or wiped) before it reports ready.

Each partition's leaderboard is built into a key of its own (same hash tag), then swapped in
by lua/swap_leaderboard-5.lua. Totals are Postgres's scores plus the increments Redis
accepted that Postgres has not committed yet, so no acknowledged increment is lost. The
Idempotency-Key records of the last SCORE_IDEMPOTENCY_TTL are restored too
(persister.idempotency), before the swap: once the users are known again, a retry of a request
made before a wipe is a replay, never a second increment.

The steps, in this order, and the race each order answers:
1. Pause the persister (every flush lock held), and only then open the Postgres snapshot: a
   flush that was committing when we asked has committed and acknowledged before we read, so
   its increments are in the snapshot; none commits after it (Postgres and the stream's
   delivery state hold still), so each increment is counted once.
2. Before the snapshot, mark each partition "rebuild in progress" (token, and the stream's
   last id `upto`). From then on, provisioning adds new users to the rebuilt leaderboard too
   (lua/provision_users-3.lua). A user is thus either in the snapshot (provisioned before) or
   added by its provisioning (after): none is missing after the swap, none loses an increment.
3. Read the increments not yet committed up to `upto`, restore the Idempotency-Key records,
   fill the rebuilt leaderboards from the snapshot.
4. The hot path kept running: replay the increments accepted after `upto` onto the rebuilt
   leaderboard, SWAP_CHUNK stream entries per Lua call (Redis is never blocked for long, the
   live leaderboard keeps serving), then, caught up, swap it in and set the partition's ready
   marker in the same atomic step. Each call records its progress atomically with its writes,
   and the swap leaves the token in the ready marker: a call whose reply was lost is sent
   again, and continues or answers "swapped"; it never replays twice, and never deletes the
   live leaderboard. (On a wiped Redis the hot path answers NOT_READY, a 503, until the swap.)
Concurrent service processes: one rebuild at a time (a Redis lock); the others wait, then find
every ready marker set and do nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis

from persister.idempotency import restore_records
from persister.locks import PersisterBusy, paused
from persister.resend import resent
from persister.unpersisted import Unpersisted, last_entry_id, read_unpersisted
from service.connections import sync_redis
from service.keys import KeySchema, PartitionKeys
from service.progress import Progress, no_progress
from service.scripts import Swapped, SyncScripts, publish_top, swap_leaderboard
from service.settings import Settings

log = logging.getLogger(__name__)

REBUILD_LOCK_TTL_S = 60.0
REBUILD_WAIT_S = 30.0
"""How long a process waits for another's rebuild before it gives up (and tries again later)."""
CHUNK = 10_000
SWAP_CHUNK = 2_000
"""Stream entries replayed per swap_leaderboard call: about 10 ms of Redis's time (measured:
500,000 entries took 2.7-3.2 s in all; one call per 2,000, mean 13 ms, on a loaded 2-core box)."""

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What a rebuild did."""

    users: int
    unpersisted: int
    """Increments waiting in Redis, added to Postgres's scores."""
    replayed: int
    """Increments accepted during the build, replayed onto the new leaderboards."""
    swap_calls: int
    """swap_leaderboard calls, each replaying at most SWAP_CHUNK stream entries."""
    records: int
    """Idempotency-Key records restored (those Redis did not hold)."""
    seconds: float


def rebuild_if_missing(settings: Settings) -> None:
    """The service's hook: rebuild unless Redis already holds the leaderboards."""
    done = rebuild(settings, force=False)
    if done is not None:
        log.info("rebuilt Redis from Postgres: %s", done)


def rebuild(settings: Settings, *, force: bool, progress: Progress = no_progress) -> Rebuilt | None:
    """Rebuild every partition's leaderboard and top-N from Postgres, then set the ready
    marker. Unless `force`, do nothing (None) when the marker is already set. `progress`
    hears of the users filled and the increments replayed, chunk by chunk."""
    client = sync_redis(settings)
    schema = KeySchema(settings.partitions)
    lock = client.lock(schema.rebuild_lock, timeout=REBUILD_LOCK_TTL_S, sleep=0.1)
    try:
        if not lock.acquire(blocking_timeout=REBUILD_WAIT_S):
            raise PersisterBusy(f"another rebuild still runs after {REBUILD_WAIT_S:.0f}s")
        try:
            if not force and is_ready(client, schema):
                return None
            return _rebuild(client, settings, lock.reacquire, progress)
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()
    finally:
        client.close()


def is_ready(client: redis.Redis, schema: KeySchema) -> bool:
    """Whether Redis holds every partition's leaderboard (every ready marker is set)."""
    return int(client.exists(*schema.ready_markers)) == schema.partitions


def _rebuild(
    client: redis.Redis, settings: Settings, renew: Callable[[], None], progress: Progress
) -> Rebuilt:
    began = time.monotonic()
    schema = KeySchema(settings.partitions)
    token = uuid.uuid4().hex
    scripts = SyncScripts(client)
    swapped: set[int] = set()
    try:
        with (
            paused(client, schema) as pause,
            psycopg.connect(settings.database_url, connect_timeout=5) as conn,
        ):

            def keep_alive() -> None:  # raises LockNotOwnedError if the pause was lost
                pause.renew()
                renew()

            upto = {k.index: _begin(client, k, token) for k in schema.all()}
            # the snapshot only now: paused, and with every partition marked in progress
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute("SELECT 1")
            waiting = {
                k.index: read_unpersisted(client, conn, k, keep_alive, up_to=upto[k.index])
                for k in schema.all()
            }
            keyed = itertools.chain.from_iterable(w.keyed for w in waiting.values())
            records = restore_records(
                client, conn, schema, settings.idempotency_ttl_s, keyed, keep_alive
            )
            users = _fill(client, conn, schema, waiting, keep_alive, progress)
            conn.commit()
            replayed = calls = 0
            for keys in schema.all():
                keep_alive()
                n, c = _swap(scripts, keys, token, keep_alive, progress)
                swapped.add(keys.index)
                replayed, calls = replayed + n, calls + c
    finally:
        for keys in schema.all():
            if keys.index not in swapped:
                _abandon(client, keys, token)
    for keys in schema.all():
        scripts.run(publish_top(keys, settings.top_n))
    unpersisted = sum(w.count for w in waiting.values())
    return Rebuilt(users, unpersisted, replayed, calls, records, round(time.monotonic() - began, 3))


def _begin(client: redis.Redis, keys: PartitionKeys, token: str) -> str:
    """Mark a rebuild of the partition in progress from the stream's last id, with an empty
    rebuilt leaderboard; that id."""
    upto = last_entry_id(client.xrevrange(keys.events, "+", "-", 1))

    def begin() -> None:
        pipe = client.pipeline(transaction=True)
        pipe.delete(keys.rebuilt_leaderboard)  # left by a rebuild that failed
        pipe.delete(keys.rebuild_progress)
        pipe.hset(keys.rebuild_progress, mapping={"token": token, "upto": upto})
        pipe.execute()

    # safe to send again: a user provisioned in between is in the snapshot, taken after this
    resent(begin)
    return upto


def _swap(
    scripts: SyncScripts,
    keys: PartitionKeys,
    token: str,
    keep_alive: Callable[[], None],
    progress: Progress,
) -> tuple[int, int]:
    """Catch the partition's rebuilt leaderboard up, chunk by chunk, and swap it in:
    (increments replayed, calls made)."""
    replayed = calls = 0
    while True:
        step = resent(lambda: scripts.run(swap_leaderboard(keys, token, SWAP_CHUNK)))
        replayed, calls = replayed + step.replayed, calls + 1
        progress("increments replayed", step.replayed)
        if step.swapped is not Swapped.NOT_YET:
            return replayed, calls
        keep_alive()


def _abandon(client: redis.Redis, keys: PartitionKeys, token: str) -> None:
    """After a failure: drop the partition's rebuilt leaderboard if it is still ours (so that
    provisioning stops writing into it)."""
    with contextlib.suppress(redis.RedisError):
        if client.hget(keys.rebuild_progress, "token") == token.encode():
            client.delete(keys.rebuild_progress, keys.rebuilt_leaderboard)


def _fill(
    client: redis.Redis,
    conn: Conn,
    schema: KeySchema,
    waiting: dict[int, Unpersisted],
    keep_alive: Callable[[], None],
    progress: Progress,
) -> int:
    """Fill the rebuilt leaderboards from Postgres, chunk by chunk; the number of users."""
    row = conn.execute("SELECT count(*) FROM users").fetchone()  # in the snapshot: exact
    progress.expect("users filled", int(row[0]) if row else 0)  # type: ignore[call-overload]
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
            progress("users filled", len(rows))
            keep_alive()
    return count
