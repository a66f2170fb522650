"""`score-service ledger prune --before DATE`: the ledger's retention.

`score_events` grows by one row per accepted increment. Its rows serve three purposes, and a
prune keeps each of them:

- Exactly once. The persister inserts an event ON CONFLICT (event_id) DO NOTHING and adds only
  the deltas it inserted: an event delivered again (pending after a crash, reclaimed, a lagging
  replica promoted) whose row had been pruned would be added a second time. So a row is pruned
  only when its event is older than the oldest entry any partition's events stream still holds
  (pending or not yet delivered: the stream is trimmed below those only), and than DATE, which
  must be at least MIN_AGE_S old: far longer than any replica's lag.
- Rebuild restores the Idempotency-Key records of the last SCORE_IDEMPOTENCY_TTL from the
  ledger (persister.idempotency): DATE must be older than that window and its clock margin.
- Reconcile checks that each score is the sum of its user's events: the deleted rows' sum and
  count are carried forward per user in `score_events_pruned`, in the same transaction as the
  delete, and reconcile adds them.

The table is walked once, by ranges of BATCH_PAGES heap pages (a TID range scan: no index is
needed, and none is added to the persister's insert path): one short transaction per range, a
few thousand rows at most, so the persister is never held up for long. Rows are never updated,
so each is seen once. Safe while the service and the persister run; one prune at a time.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import psycopg
import redis

from persister.idempotency import CLOCK_MARGIN_S
from service import streamids
from service.connections import sync_redis
from service.keys import KeySchema
from service.progress import Progress, no_progress
from service.settings import ConfigError, Settings

MIN_AGE_S = 24 * 3600
"""DATE is at least this old (and older than the idempotency window)."""
BATCH_PAGES = 100
"""Heap pages per transaction: 55 to 81 rows each (measured by bench/ledger_size.py, with and
without Idempotency-Keys), so at most about 8,000 rows."""
_LOCK_ID = 0x5C0E5F
"""One prune at a time (a Postgres advisory lock)."""

PRUNE = """
WITH gone AS (
    DELETE FROM score_events
    WHERE ctid >= %(low)s::tid AND ctid < %(high)s::tid
      AND recorded_at < %(before)s
      AND split_part(stream_id, '-', 1)::bigint < %(before_ms)s
    RETURNING user_id, delta
), per_user AS (
    SELECT user_id, sum(delta) AS total, count(*) AS events FROM gone GROUP BY user_id
), carried AS (
    INSERT INTO score_events_pruned AS p (user_id, total, events)
    SELECT user_id, total, events FROM per_user ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE
        SET total = p.total + excluded.total, events = p.events + excluded.events,
            updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM carried)
"""
"""One range of pages: delete its old rows and carry their sums forward, in one statement.
`before_ms` is DATE on Redis's clock (the stream id's milliseconds, the clock the streams'
oldest entry is read on); `recorded_at` is Postgres's (the clock of the idempotency window)."""

Conn = psycopg.Connection[tuple[object, ...]]


class PruneRefused(ConfigError):
    """DATE is too recent to prune safely (exit code 2)."""


@dataclass(frozen=True, slots=True)
class Pruned:
    """What a prune did."""

    events: int
    users: int
    """Users whose carried-forward total changed (counted once per range)."""
    pages: int
    seconds: float


def newest_allowed(settings: Settings, conn: Conn, client: redis.Redis) -> tuple[dt.datetime, str]:
    """The newest DATE a prune accepts now, and why it is that one."""
    window = max(MIN_AGE_S, settings.idempotency_ttl_s + CLOCK_MARGIN_S)
    row = conn.execute("SELECT now() - make_interval(secs => %s)", (window,)).fetchone()
    assert row is not None
    limit: dt.datetime = row[0]  # type: ignore[assignment]
    why = (
        f"the ledger's rows of the last {window / 3600:g} hours are kept (at least "
        f"{MIN_AGE_S // 3600} hours, and the Idempotency-Key window SCORE_IDEMPOTENCY_TTL plus "
        f"{CLOCK_MARGIN_S}s)"
    )
    oldest = _oldest_held_ms(client, KeySchema(settings.partitions))
    if oldest is not None:
        held = dt.datetime.fromtimestamp(oldest / 1000, dt.UTC)
        if held < limit:
            limit = held
            why = (
                f"an events stream still holds an entry from {held.isoformat()} (not yet "
                "persisted, or not yet acknowledged): its row must stay for exactly-once"
            )
    return limit, why


def _oldest_held_ms(client: redis.Redis, schema: KeySchema) -> int | None:
    """The milliseconds of the oldest entry any partition's events stream holds (None: all
    are empty, so every accepted event has been persisted and trimmed)."""
    pipe = client.pipeline(transaction=False)
    for keys in schema.all():
        pipe.xrange(keys.events, "-", "+", 1)
    firsts = [reply[0][0].decode() for reply in pipe.execute() if reply]
    held = [streamids.millis(first) for first in firsts if first != streamids.ZERO]
    return min(held) if held else None


def prune(
    settings: Settings,
    before: dt.datetime,
    *,
    progress: Progress = no_progress,
    batch_pages: int = BATCH_PAGES,
) -> Pruned:
    """Delete the ledger's rows of events accepted and committed before `before`, carrying
    their sums forward per user; PruneRefused (nothing deleted) when `before` is newer than
    `newest_allowed`."""
    began = time.monotonic()
    if before.tzinfo is None:
        raise PruneRefused("the date needs a time zone (e.g. 2026-01-31T00:00:00Z)")
    client = sync_redis(settings)
    try:
        with psycopg.connect(
            settings.database_url,
            autocommit=True,
            connect_timeout=5,
            application_name="score-ledger-prune",
        ) as conn:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()
            if not (row and row[0]):
                raise PruneRefused("another `ledger prune` is running")
            limit, why = newest_allowed(settings, conn, client)
            if before > limit:
                raise PruneRefused(
                    f"refusing to prune before {before.isoformat()}: the newest date allowed "
                    f"now is {limit.isoformat()}, since {why}"
                )
            return _walk(conn, before, batch_pages, progress, began)
    finally:
        client.close()


def _walk(
    conn: Conn, before: dt.datetime, batch_pages: int, progress: Progress, began: float
) -> Pruned:
    row = conn.execute(
        "SELECT pg_relation_size('score_events') / current_setting('block_size')::bigint"
    ).fetchone()
    pages = int(row[0]) if row else 0  # type: ignore[call-overload]
    # rows added after this are newer than `before`: the walk need not reach their pages
    progress.expect("pages scanned", pages)
    before_ms = int(before.timestamp() * 1000)
    events = users = 0
    for first in range(0, pages, batch_pages):
        args = {
            "low": f"({first},0)",
            "high": f"({first + batch_pages},0)",
            "before": before,
            "before_ms": before_ms,
        }
        with conn.transaction():
            done = conn.execute(PRUNE, args).fetchone()
        gone, carried = (int(n) for n in done) if done else (0, 0)  # type: ignore[call-overload]
        events, users = events + gone, users + carried
        progress("pages scanned", min(batch_pages, pages - first))
        progress("events pruned", gone)
    return Pruned(events, users, pages, round(time.monotonic() - began, 3))
