"""Restoring the Idempotency-Key records a Redis lost, from Postgres's ledger (a rebuild).

The hot path remembers a request made with an Idempotency-Key for SCORE_IDEMPOTENCY_TTL from
the moment it accepts it: a record "<delta>:<total>:<rank>" under `PartitionKeys.idempotency(
user, key)`. The events stream entry carries the key (in its stored form: an operator's is
prefixed, `service.keys.stored_idempotency_key`) and the total, and the persister keeps them in
the ledger, so after a wipe a retry of a request made before it still returns the first total
and adds nothing, and an operator's record goes back to the operators' namespace. A rebuild
sets the record again for each keyed increment accepted within the TTL, in the ledger or still
waiting in the stream, with the time it has left:

- The first response's rank is kept in neither the stream nor the ledger: a restored record
  is "<delta>:<total>", and its replay answers without a rank rather than with today's, which
  the first response never gave.

- The time left counts from the acceptance, read from the stream id's milliseconds: Redis's
  clock, the one the hot path's EX runs on. (`recorded_at` is the commit, later when the
  persister lagged; it only narrows the ledger's scan, with a margin for the two clocks.)
- SET NX: a record Redis holds is the hot path's own, never older than the ledger's; a forced
  rebuild of a live Redis leaves it alone.
- Newest first: a key used again after its record expired has two rows, and both may be in
  time (the TTL was raised since); the newer is the record Redis had, and NX keeps it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import psycopg
import redis

from persister.events import Event
from service import streamids
from service.keys import KeySchema

CHUNK = 10_000
CLOCK_MARGIN_S = 300
"""Rows committed this much before the window are read too (Postgres's and Redis's clocks may
disagree); their exact time left, from the stream id, drops the expired ones."""

RECENT = """
SELECT user_id, idempotency_key, delta, total, stream_id FROM score_events
WHERE idempotency_key IS NOT NULL AND recorded_at >= now() - make_interval(secs => %s)
ORDER BY split_part(stream_id, '-', 1)::bigint DESC, split_part(stream_id, '-', 2)::bigint DESC
"""
"""Keyed increments committed within the window (the partial index score_events_recent_keys),
newest acceptance first."""

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Record:
    """What the hot path remembered for one (user, Idempotency-Key)."""

    user_id: str
    key: str
    delta: int
    total: int
    accepted_ms: int
    """When Redis accepted the increment (its stream id's milliseconds)."""
    accepted_seq: int
    """Its stream id's sequence: the order of two increments accepted in one millisecond."""

    @property
    def value(self) -> str:
        """The record's value as lua/submit_score-6.lua writes it, without the rank (which
        the ledger does not know): a replay of it answers with no rank."""
        return f"{self.delta}:{self.total}"


def restore_records(
    client: redis.Redis,
    conn: Conn,
    schema: KeySchema,
    ttl_s: int,
    unpersisted: Iterable[Event],
    keep_alive: Callable[[], None],
) -> int:
    """Set the record of every keyed increment accepted within the last `ttl_s` seconds (in the
    ledger, or among `unpersisted`) that Redis does not hold, expiring when the hot path's
    would have; the number set. `keep_alive` is called between chunks."""
    waiting = sorted(map(_of_event, unpersisted), key=_accepted, reverse=True)
    ttl_ms = ttl_s * 1000
    restored = 0
    with conn.cursor(name="rebuild_idempotency") as cursor:  # server side: memory stays flat
        cursor.itersize = CHUNK
        cursor.execute(RECENT, (ttl_s + CLOCK_MARGIN_S,))
        ledger = (_of_row(row) for row in cursor)
        records = heapq.merge(ledger, waiting, key=_accepted, reverse=True)
        for chunk in _chunks(records):
            now_ms = _redis_ms(client)
            live = [r for r in chunk if r.accepted_ms + ttl_ms > now_ms]
            pipe = client.pipeline(transaction=False)
            for r in live:
                key = schema.for_user(r.user_id).idempotency(r.user_id, r.key)
                # never longer than a new record's TTL, should Redis's clock have gone back
                left_ms = min(ttl_ms, r.accepted_ms + ttl_ms - now_ms)
                pipe.set(key, r.value, px=left_ms, nx=True)
            restored += sum(1 for done in pipe.execute() if done)
            keep_alive()
            if len(live) < len(chunk):
                break  # newest first: every record after this one has expired too
    return restored


def _of_event(event: Event) -> Record:
    assert event.idempotency_key is not None and event.total is not None
    return Record(
        event.user_id,
        event.idempotency_key,
        event.delta,
        event.total,
        *streamids.order(event.stream_id),
    )


def _of_row(row: tuple[object, ...]) -> Record:
    user_id, key, delta, total, stream_id = row
    return Record(
        str(user_id),
        str(key),
        int(delta),  # type: ignore[call-overload]
        int(total),  # type: ignore[call-overload]
        *streamids.order(str(stream_id)),
    )


def _accepted(record: Record) -> tuple[int, int]:
    return record.accepted_ms, record.accepted_seq


def _chunks(records: Iterator[Record]) -> Iterator[list[Record]]:
    while chunk := list(itertools.islice(records, CHUNK)):
        yield chunk


def _redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
