"""The Postgres schema, as numbered migrations applied once each (`score-service migrate`).

`users.score` is the source of truth for a user's total; `score_events` is the append-only
ledger that makes applying an event idempotent (its service-made id is the primary key), and
lets reconcile check that every total is the sum of its events (those `ledger prune` deleted
counted by the per-user totals it carried forward, `score_events_pruned`). An increment made with an
Idempotency-Key also records the key and the total it produced: a rebuild of Redis restores
the idempotency records of the last SCORE_IDEMPOTENCY_TTL from them.
"""

from __future__ import annotations

import psycopg

MIGRATIONS: list[str] = [
    # 1: users and the event ledger
    """
    CREATE TABLE users (
        user_id    text PRIMARY KEY,
        score      bigint NOT NULL DEFAULT 0
                   CHECK (score BETWEEN 0 AND 9007199254740991),
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE score_events (
        event_id    uuid PRIMARY KEY,
        user_id     text NOT NULL REFERENCES users (user_id),
        delta       bigint NOT NULL CHECK (delta <> 0),
        stream_id   text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX score_events_user_id ON score_events (user_id);
    """,
    # 2: the Idempotency-Key of an increment and the total it produced (NULL without a key).
    # Adding nullable columns rewrites nothing; NOT VALID checks new rows only (the old ones
    # are all NULL, which passes). The partial index holds only keyed rows, by time: the
    # rebuild reads the recent ones.
    """
    ALTER TABLE score_events
        ADD COLUMN idempotency_key text,
        ADD COLUMN total bigint;
    ALTER TABLE score_events
        ADD CONSTRAINT score_events_key_and_total
        CHECK ((idempotency_key IS NULL) = (total IS NULL)) NOT VALID;
    CREATE INDEX score_events_recent_keys ON score_events (recorded_at)
        WHERE idempotency_key IS NOT NULL;
    """,
    # ---- the partition layout (persister.layout): its own statement -------------------------
    # One row: the partition count users are hashed with, the key scheme's version, and while
    # `score-service partitions set` runs, the count whose partitions may still hold data.
    # IF NOT EXISTS: correct whatever number this migration ends up with.
    """
    CREATE TABLE IF NOT EXISTS score_layout (
        id            boolean PRIMARY KEY DEFAULT true CHECK (id),
        version       int NOT NULL,
        partitions    int NOT NULL CHECK (partitions BETWEEN 1 AND 1024),
        changing_from int CHECK (changing_from BETWEEN 1 AND 1024),
        updated_at    timestamptz NOT NULL DEFAULT now()
    );
    """,
    # ---- end of the partition layout ---------------------------------------------------------
    # ---- the ledger's retention (persister.prune): its own statement -------------------------
    # Per user, the sum and count of the events `score-service ledger prune` deleted from
    # score_events, updated in the same transaction as each delete: a score stays the sum of
    # its events plus this (reconcile checks it). A table of its own, not a column of users:
    # the persister updates users on every batch, and a prune must never wait for it or make
    # it wait.
    """
    CREATE TABLE IF NOT EXISTS score_events_pruned (
        user_id    text PRIMARY KEY REFERENCES users (user_id),
        total      bigint NOT NULL,
        events     bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # ---- end of the ledger's retention -------------------------------------------------------
    # The key scheme of the layout a change moves away from (service.keys.KEY_SCHEME: hash tags
    # placed by slot since 2); NULL for changes recorded before it was kept, all of scheme 1.
    """
    ALTER TABLE score_layout ADD COLUMN IF NOT EXISTS changing_from_version int;
    """,
    # A keyed increment sent again after a failover lost its first attempt from Redis (the
    # first had reached Postgres already) is the same event under a new id: the persister
    # looks its key up (persister.store) and counts it once.
    """
    CREATE INDEX IF NOT EXISTS score_events_user_keys ON score_events (user_id, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # The ledger's foreign key to users, and its index on user_id. The key's check took a
    # share lock on the user's row for every event: a third of Postgres's time per event
    # (`python -m bench --only persister`: 11 -> 7 us, drain 70k -> 98k events/s). The
    # persister, the ledger's only writer, checks the same in its statement: a batch with an
    # event of a user Postgres does not know rolls back, and that event is refused alone
    # (persister.store). Users are never deleted. The index served no query (reconcile and
    # prune read the whole ledger, the keyed-retry check has the index above) and cost every
    # event an insert into a B-tree in random order.
    """
    ALTER TABLE score_events DROP CONSTRAINT IF EXISTS score_events_user_id_fkey;
    DROP INDEX IF EXISTS score_events_user_id;
    """,
]

# Serialises concurrent `migrate` runs (several replicas starting at once).
_LOCK_ID = 0x5C0E5E


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> list[int]:
    """Apply the migrations not yet applied; return their numbers. Idempotent."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        current = int(row[0]) if row else 0  # type: ignore[call-overload]
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version > current:
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
    return applied
