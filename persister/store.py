"""The Postgres side of the persister: apply a batch of events exactly once.

One statement per batch: insert the events into the ledger (`score_events`, event id unique;
with the Idempotency-Key and the resulting total of a keyed increment) with ON CONFLICT DO
NOTHING, and add to `users.score` only the deltas of the rows actually inserted. Applying a
batch twice, or batches out of order, changes nothing more. An event of a user Postgres does
not have is refused, and the others of its batch committed without it.

A keyed event whose key the ledger already holds for that user, from less than the key's
lifetime (SCORE_IDEMPOTENCY_TTL) earlier, is the same increment sent again: a failover lost the
first attempt from Redis after the persister had read it, and the client's retry made a new
event there. It is not inserted. A key used again after its lifetime is a new increment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg

from persister import faults
from persister.events import Event

log = logging.getLogger(__name__)

STATEMENT_TIMEOUT_MS = 5000
"""A hung Postgres (a lock held too long, an overloaded server) costs a batch this long, then
the batch is retried with backoff. Shorter than the flush lock's time to live."""
CONNECT_TIMEOUT_S = 3

TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError)
"""Postgres down, hung, restarting, or a deadlock: retry the batch later."""


class UnknownUser(Exception):
    """An event of a user that Postgres's users table does not have. (The ledger has no
    foreign key, see schema.py: the statement counts the users it could update instead.)"""


REFUSED = (psycopg.IntegrityError, psycopg.DataError, UnknownUser)
"""Postgres refuses an event itself (a score out of range), or its user is unknown: isolate
it."""

APPLY = """
WITH batch AS (
    SELECT * FROM unnest(%b::text[], %b::uuid[], %b::text[], %b::bigint[], %b::text[],
                         %b::bigint[])
        AS b(stream_id, event_id, user_id, delta, idempotency_key, total)
), inserted AS (
    INSERT INTO score_events (event_id, user_id, delta, stream_id, idempotency_key, total)
    SELECT event_id, user_id, delta, stream_id, idempotency_key, total FROM batch AS b
    WHERE b.idempotency_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM score_events AS e
        WHERE e.user_id = b.user_id AND e.idempotency_key = b.idempotency_key
          AND e.event_id <> b.event_id
          AND split_part(e.stream_id, '-', 1)::bigint
              > split_part(b.stream_id, '-', 1)::bigint - %b::bigint
    )
    ORDER BY user_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING user_id, delta
), totals AS (
    SELECT user_id, sum(delta) AS delta FROM inserted GROUP BY user_id ORDER BY user_id
), updated AS (
    UPDATE users AS u SET score = u.score + t.delta, updated_at = now()
    FROM totals AS t WHERE u.user_id = t.user_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted),
       (SELECT count(*) FROM totals) - (SELECT count(*) FROM updated)  -- users not in users
"""
"""The parameters are the batch's columns, in the order of Event's fields. They are sent in
binary (%b): psycopg writes a text-format array in Python, character by character, which cost
more than the statement itself; the ids are cast to uuid by Postgres. Rows go in user order:
the updates then walk the users' index in order, and two transactions lock users in the same
order. The second column counts the batch's users that users does not have (the ledger has no
foreign key: schema.py): more than none, and `_apply` raises UnknownUser."""

Conn = psycopg.Connection[tuple[object, ...]]


def _apply(conn: Conn, events: Sequence[Event], key_ttl_ms: int) -> int:
    columns: list[object] = [list(column) for column in zip(*events, strict=True)]
    row = conn.execute(APPLY, [*columns, key_ttl_ms]).fetchone()
    assert row is not None
    inserted: int = int(row[0])  # type: ignore[call-overload]
    unknown: int = int(row[1])  # type: ignore[call-overload]
    if unknown:  # raised inside the caller's transaction: the batch's inserts roll back
        who = f"user {events[0].user_id!r} is" if len(events) == 1 else f"{unknown} users are"
        raise UnknownUser(f"{who} not in Postgres's users table")
    return inserted


class Store:
    """A Postgres connection, opened on first use and again after it breaks."""

    def __init__(self, database_url: str, idempotency_ttl_s: int = 86_400) -> None:
        self._url = database_url
        self._key_ttl_ms = idempotency_ttl_s * 1000
        self._conn: Conn | None = None

    def connection(self) -> Conn:
        """The open connection (autocommit: each batch is an explicit transaction)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="score-persister",
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            )
        return self._conn

    def close(self) -> None:
        """Close the connection (the next use opens another)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def apply(self, events: Sequence[Event]) -> tuple[int, list[tuple[Event, Exception]]]:
        """Apply `events` in one transaction: (events new to the ledger, events refused).

        When Postgres refuses the batch because of some of its events, the batch is applied
        again one event at a time (a savepoint each), so the others are committed and only
        the refused ones come back. Raises TRANSIENT errors: nothing was committed then.
        """
        conn = self.connection()
        try:
            with conn.transaction():
                inserted = _apply(conn, events, self._key_ttl_ms)
                faults.point("before-commit")
            return inserted, []
        except REFUSED as exc:
            log.warning("Postgres refused a batch of %d events (%s); isolating", len(events), exc)
        return self._apply_each(conn, events)

    def _apply_each(
        self, conn: Conn, events: Sequence[Event]
    ) -> tuple[int, list[tuple[Event, Exception]]]:
        inserted = 0
        refused: list[tuple[Event, Exception]] = []
        with conn.transaction():
            for event in events:
                try:
                    with conn.transaction():  # a savepoint
                        inserted += _apply(conn, [event], self._key_ttl_ms)
                except REFUSED as exc:
                    refused.append((event, exc))
            faults.point("before-commit")
        return inserted, refused
