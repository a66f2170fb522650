"""`score-service partitions [set N]`: show the partition layout, and change it safely while
the services run.

The change, step by step (each can be repeated, so an interrupted change is resumed by running
the same command again):

1. Refuse writes: record the change (`changing_from`) in Postgres, then in Redis, and drop the
   ready marker. Within a readiness poll every service answers 503, whatever count it runs
   with; partition-aware commands refuse; no rebuild starts.
2. Fence: after GRACE_S, delete every leaderboard. A process that missed step 1 (stalled past
   the grace) finds no user any more and accepts nothing, so no increment lands in a stream
   after it has been drained.
3. Drain every partition's events stream into Postgres with the persister's own flush, until
   nothing is undelivered or pending: Postgres then holds every acknowledged increment.
4. Delete the keys of the partitions the new layout drops (their streams, now empty, their
   top-N, flags, counters). Their dead-letter streams are kept for an operator. Idempotency-Key
   records are not moved: the rebuild restores each one under its user's new partition from
   the ledger (persister.idempotency), which now holds every keyed increment.
5. Rebuild Redis from Postgres with the new count, then record the layout as done in
   Postgres, then Redis: services running with the new count are ready again; those still
   running with another answer 503 and log why, until restarted with the new count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis
from redis.lock import Lock

from persister.flush import BACKOFF, LOCK_WAIT_S, Persister, failed_again
from persister.layout import read_postgres, read_redis, write_postgres, write_redis
from persister.locks import PersisterBusy
from persister.rebuild import REBUILD_LOCK_TTL_S, REBUILD_WAIT_S, Rebuilt, rebuild
from service.connections import sync_redis
from service.keys import KeySchema, PartitionKeys
from service.layout import CHANGE_COMMAND, Layout, layout_of
from service.persister_lag import PERSISTER_GROUP, Lag, read_lags_sync
from service.settings import ConfigError, Settings

log = logging.getLogger(__name__)

GRACE_S = 2.0
"""Time for running services to notice the change (a readiness poll is 0.5 s) and for requests
already past their readiness check to finish, before the fence."""
DRAIN_TIMEOUT_S = 600.0
MAX_PARTITIONS = 1024
_LOCK_ID = 0x5C0E1A  # one `partitions set` at a time (a session-level advisory lock)

Say = Callable[[str], None]


class ChangeIncomplete(RuntimeError):
    """The change stopped before its end; running the command again resumes it."""


@dataclass(frozen=True, slots=True)
class Changed:
    """What a change did."""

    before: Layout
    after: Layout
    drained: int
    """Increments the change itself committed to Postgres."""
    rebuilt: Rebuilt
    seconds: float


@dataclass(frozen=True, slots=True)
class Shown:
    """The recorded layout and each partition's backlog."""

    postgres: Layout | None
    redis: Layout | None
    lags: list[Lag]


def show(settings: Settings) -> Shown:
    """The layout as both stores record it, and the lag of each of its partitions."""
    client = sync_redis(settings)
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5, autocommit=True) as conn:
            in_postgres = read_postgres(conn)
        in_redis = read_redis(client)
        recorded = in_postgres or in_redis
        count = settings.partitions if recorded is None else _widest(recorded)
        return Shown(in_postgres, in_redis, read_lags_sync(client, KeySchema(count).all()))
    finally:
        client.close()


def render(shown: Shown) -> str:
    """The layout as an operator reads it."""
    pg, rd = shown.postgres, shown.redis
    if pg is None and rd is None:
        head = "partitions: no layout recorded yet (the first serve, worker or migrate records it)"
    elif pg == rd:
        assert pg is not None
        head = f"partitions: {pg.describe()}; recorded in Postgres and Redis"
    else:
        head = (
            f"partitions: Postgres records {pg.describe() if pg else 'nothing'}, Redis "
            f"{rd.describe() if rd else 'nothing'}"
        )
    lines = [head, f"  {'partition':>9}  {'hash tag':<10} {'events waiting':>14} {'pending':>8} "
                   f"{'oldest':>8} {'dead letters':>12}"]  # fmt: skip
    for lag in shown.lags:
        tag = PartitionKeys(lag.partition).tag
        lines.append(
            f"  {lag.partition:>9}  {tag:<10} {lag.unpersisted:>14} {lag.pending:>8} "
            f"{lag.oldest_age_s:>7.1f}s {lag.dead_letters:>12}"
        )
    return "\n".join(lines)


def change(
    settings: Settings, target: int, *, say: Say, timeout_s: float = DRAIN_TIMEOUT_S
) -> Changed | None:
    """Change the deployment to `target` partitions (see the module's docstring); None when it
    has that layout already. ChangeIncomplete (resumable) when the drain did not finish in
    `timeout_s`; ConfigError when another change runs."""
    if not 1 <= target <= MAX_PARTITIONS:
        raise ConfigError(f"the number of partitions must be between 1 and {MAX_PARTITIONS}")
    began = time.monotonic()
    client = sync_redis(settings)
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5, autocommit=True) as conn:
            _exclusive(conn)
            in_redis = read_redis(client)
            # nothing recorded yet: the data was written with this process's SCORE_PARTITIONS
            before = write_postgres(conn, in_redis or layout_of(settings), replace=False)
            if before == in_redis == Layout(target):
                say(f"the layout already has {target} partition(s): nothing to do")
                return None
            wide = max(target, _widest(before), _widest(in_redis))
            changing = Layout(target, changing_from=wide)
            drained = _move(client, conn, settings, changing, say, timeout_s)
            say(f"5/5 rebuilding Redis from Postgres with {target} partition(s)")
            rebuilt = rebuild(dataclasses.replace(settings, partitions=target), force=True)
            assert rebuilt is not None  # forced: it always runs
            write_postgres(conn, Layout(target), replace=True)
            write_redis(client, Layout(target), replace=True)
    finally:
        client.close()
    return Changed(before, Layout(target), drained, rebuilt, round(time.monotonic() - began, 3))


def _widest(layout: Layout | None) -> int:
    """How many partitions may hold data under `layout`."""
    if layout is None:
        return 0
    return max(layout.partitions, layout.changing_from or 0)


def _exclusive(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()
    if not (row and row[0]):
        raise ConfigError(f"another `{CHANGE_COMMAND}` is running: wait for it to finish")


def _move(
    client: redis.Redis,
    conn: psycopg.Connection[tuple[object, ...]],
    settings: Settings,
    changing: Layout,
    say: Say,
    timeout_s: float,
) -> int:
    """Steps 1 to 4, holding the rebuild lock (no rebuild starts meanwhile); the increments
    drained."""
    wide = KeySchema(_widest(changing))
    lock: Lock = client.lock(
        wide.rebuild_lock, timeout=REBUILD_LOCK_TTL_S, sleep=0.1, thread_local=False
    )
    if not lock.acquire(blocking_timeout=REBUILD_WAIT_S):
        raise PersisterBusy(f"a rebuild still runs after {REBUILD_WAIT_S:.0f}s")
    try:
        write_postgres(conn, changing, replace=True)
        write_redis(client, changing, replace=True)
        client.delete(*wide.ready_markers)
        say(
            f"1/5 writes refused: the services answer 503 until the change is done "
            f"(waiting {GRACE_S:.0f}s for them to notice)"
        )
        time.sleep(GRACE_S)
        client.delete(*(k.leaderboard for k in wide.all()))
        say(f"2/5 the leaderboards of all {len(wide.all())} partition(s) are fenced off")
        drained = _drain(settings, wide, lambda: _renew(lock), say, timeout_s)
        say(f"3/5 every events stream is drained into Postgres ({drained} increments committed)")
        dropped = _drop(client, wide, changing.partitions)
        if dropped:
            say(f"4/5 deleted the keys of partitions {dropped} (dead letters are kept)")
        else:
            say("4/5 no partition is dropped")
        return drained
    finally:
        with contextlib.suppress(redis.exceptions.LockError):
            lock.release()


def _renew(lock: Lock) -> None:
    # Only keeps rebuilds that started before the change from running beside it (a rebuild
    # that starts later sees the change and does nothing): losing it is worth a warning only.
    try:
        lock.reacquire()
    except redis.exceptions.LockError:
        log.warning("the rebuild lock expired during the drain")


def _drain(
    settings: Settings, wide: KeySchema, renew: Callable[[], object], say: Say, timeout_s: float
) -> int:
    """Flush every partition until none holds an increment Postgres has not committed."""
    persister = Persister(
        dataclasses.replace(settings, partitions=wide.partitions),
        consumer=f"partitions-set:{socket.gethostname()}:{os.getpid()}",
    )
    deadline = time.monotonic() + timeout_s
    drained, failures = 0, 0
    try:
        while True:
            for keys in wide.all():
                done = persister.drain(keys.index, wait_s=LOCK_WAIT_S)
                drained += done.events if done else 0
                renew()
            waiting = sum(lag.unpersisted for lag in read_lags_sync(persister.redis, wide.all()))
            if not waiting:
                return drained
            if time.monotonic() > deadline:
                raise ChangeIncomplete(
                    f"{waiting} increments still wait in Redis after {timeout_s:.0f}s "
                    "(is Postgres up, is a worker stuck?)"
                )
            failures = failed_again(failures)
            say(f"   {waiting} increments still wait in Redis (pending or refused); again")
            time.sleep(BACKOFF.compute(failures))
    finally:
        for keys in wide.all():
            with contextlib.suppress(redis.RedisError):
                persister.redis.xgroup_delconsumer(keys.events, PERSISTER_GROUP, persister.consumer)
        persister.close()


def _drop(client: redis.Redis, wide: KeySchema, keep: int) -> str:
    """Delete the keys of partitions `keep` and above (their streams are drained); which."""
    dropped = wide.all()[keep:]
    for keys in dropped:
        if client.xlen(keys.events):
            raise ChangeIncomplete(f"partition {keys.index}'s events stream is not empty")
        client.delete(
            keys.events, keys.top, keys.flush_flag, keys.persist_stats, keys.persist_failures,
            keys.rebuilt_leaderboard, keys.leaderboard,
        )  # fmt: skip
    if not dropped:
        return ""
    return f"{dropped[0].index}-{dropped[-1].index}" if len(dropped) > 1 else str(keep)
