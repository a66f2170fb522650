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

from persister.flush import BACKOFF, LOCK_WAIT_S, Persister
from persister.layout import read_postgres, read_redis, write_postgres, write_redis
from persister.locks import PersisterBusy
from persister.rebuild import REBUILD_LOCK_TTL_S, REBUILD_WAIT_S, Rebuilt, rebuild
from service.connections import failed_again, sync_redis
from service.keys import PERSISTER_GROUP, PartitionKeys
from service.layout import CHANGE_COMMAND, Layout, layout_of
from service.persister_lag import Lag, read_lags_sync
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
    """The recorded layout, and each partition's place and backlog."""

    postgres: Layout | None
    redis: Layout | None
    parts: list[PartitionKeys]
    lags: list[Lag]
    nodes: list[str]
    """Where each partition's keys live: the primary's address on a Redis Cluster, else ""."""


def show(settings: Settings) -> Shown:
    """The layout as both stores record it, and the lag of each of its partitions."""
    client = sync_redis(settings)
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5, autocommit=True) as conn:
            in_postgres = read_postgres(conn)
        in_redis = read_redis(client)
        recorded = in_postgres or in_redis or layout_of(settings)
        parts = recorded.holding()
        nodes = [_primary(client, keys) for keys in parts]
        return Shown(in_postgres, in_redis, parts, read_lags_sync(client, parts), nodes)
    finally:
        client.close()


def _primary(client: redis.Redis, keys: PartitionKeys) -> str:
    find = getattr(client, "get_node_from_key", None)  # only a cluster client has it
    return "" if find is None else str(find(keys.events).name)


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
    on_cluster = any(shown.nodes)
    lines = [head, f"  {'partition':>9}  {'hash tag':<10} {'slot':>5} {'events waiting':>14} "
                   f"{'pending':>8} {'oldest':>8} {'dead letters':>12}"
                   + ("  primary" if on_cluster else "")]  # fmt: skip
    for keys, lag, node in zip(shown.parts, shown.lags, shown.nodes, strict=True):
        lines.append(
            f"  {keys.index:>9}  {keys.tag:<10} {keys.slot:>5} {lag.unpersisted:>14} "
            f"{lag.pending:>8} {lag.oldest_age_s:>7.1f}s {lag.dead_letters:>12}"
            + (f"  {node}" if on_cluster else "")
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
            changing = _changing(before, in_redis, target)
            holding = _union(changing.holding(), *(r.holding() for r in (before, in_redis) if r))
            drained = _move(client, conn, settings, changing, holding, say, timeout_s)
            say(f"5/5 rebuilding Redis from Postgres with {target} partition(s)")
            rebuilt = rebuild(dataclasses.replace(settings, partitions=target), force=True)
            assert rebuilt is not None  # forced: it always runs
            write_postgres(conn, Layout(target), replace=True)
            write_redis(client, Layout(target), replace=True)
    finally:
        client.close()
    return Changed(before, Layout(target), drained, rebuilt, round(time.monotonic() - began, 3))


def _changing(before: Layout, in_redis: Layout | None, target: int) -> Layout:
    """The layout to record while the data moves to `target` partitions: a change under way
    is finished first, to the count it was started with."""
    for recorded in (before, in_redis):
        if recorded is not None and recorded.changing:
            if recorded.partitions != target:
                raise ConfigError(
                    f"a change to {recorded.partitions} partition(s) is under way: finish it "
                    f"with `{CHANGE_COMMAND} {recorded.partitions}` first"
                )
            return recorded
    return Layout(target, changing_from=before.partitions, changing_from_version=before.version)


def _union(*lists: list[PartitionKeys]) -> list[PartitionKeys]:
    """The partitions of several layouts, each once (by hash tag)."""
    seen: dict[str, PartitionKeys] = {}
    for parts in lists:
        for keys in parts:
            seen.setdefault(keys.tag, keys)
    return list(seen.values())


def _exclusive(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()
    if not (row and row[0]):
        raise ConfigError(f"another `{CHANGE_COMMAND}` is running: wait for it to finish")


def _move(
    client: redis.Redis,
    conn: psycopg.Connection[tuple[object, ...]],
    settings: Settings,
    changing: Layout,
    holding: list[PartitionKeys],
    say: Say,
    timeout_s: float,
) -> int:
    """Steps 1 to 4 on the partitions `holding` data, holding the rebuild lock (no rebuild
    starts meanwhile); the increments drained."""
    lock: Lock = client.lock(
        changing.schema().rebuild_lock, timeout=REBUILD_LOCK_TTL_S, sleep=0.1, thread_local=False
    )
    if not lock.acquire(blocking_timeout=REBUILD_WAIT_S):
        raise PersisterBusy(f"a rebuild still runs after {REBUILD_WAIT_S:.0f}s")
    try:
        write_postgres(conn, changing, replace=True)
        write_redis(client, changing, replace=True)
        client.delete(*(k.ready for k in holding))
        say(
            f"1/5 writes refused: the services answer 503 until the change is done "
            f"(waiting {GRACE_S:.0f}s for them to notice)"
        )
        time.sleep(GRACE_S)
        client.delete(*(k.leaderboard for k in holding))
        say(f"2/5 the leaderboards of all {len(holding)} partition(s) are fenced off")
        drained = _drain(settings, holding, lambda: _renew(lock), say, timeout_s)
        say(f"3/5 every events stream is drained into Postgres ({drained} increments committed)")
        dropped = _drop(client, holding, changing.schema().all())
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
    settings: Settings,
    holding: list[PartitionKeys],
    renew: Callable[[], object],
    say: Say,
    timeout_s: float,
) -> int:
    """Flush every partition until none holds an increment Postgres has not committed."""
    persister = Persister(
        settings, consumer=f"partitions-set:{socket.gethostname()}:{os.getpid()}", parts=holding
    )
    deadline = time.monotonic() + timeout_s
    drained, failures = 0, 0
    try:
        while True:
            for position in range(len(holding)):
                done = persister.drain(position, wait_s=LOCK_WAIT_S)
                drained += done.events if done else 0
                renew()
            waiting = sum(lag.unpersisted for lag in read_lags_sync(persister.redis, holding))
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
        for keys in holding:
            with contextlib.suppress(redis.RedisError):
                persister.redis.xgroup_delconsumer(keys.events, PERSISTER_GROUP, persister.consumer)
        persister.close()


def _drop(client: redis.Redis, holding: list[PartitionKeys], keep: list[PartitionKeys]) -> str:
    """Delete the keys of the partitions the new layout does not `keep` (their streams are
    drained); which, by hash tag."""
    kept = {k.tag for k in keep}
    dropped = [k for k in holding if k.tag not in kept]
    for keys in dropped:
        if client.xlen(keys.events):
            raise ChangeIncomplete(f"partition {keys.index}'s events stream is not empty")
        client.delete(
            keys.events, keys.top, keys.flush_flag, keys.persist_stats, keys.persist_failures,
            keys.rebuilt_leaderboard, keys.leaderboard,
        )  # fmt: skip
    return ", ".join(k.tag for k in dropped)
