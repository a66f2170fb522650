"""How large the ledger (`score_events`) grows per million updates.

Starts a throwaway Postgres, applies EVENTS increments through the persister's own statement
(persister.store.Store.apply, batches of 20,000) to USERS users, without and with an
Idempotency-Key, and prints `pg_total_relation_size` (the table, its indexes and TOAST) scaled
to a million. Run: `.venv/bin/python -m bench.ledger_size [EVENTS]`.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from persister.events import Event
from persister.schema import migrate
from persister.store import Store
from service.dev.servers import PostgresServer

USERS = 10_000
BATCH = 20_000
MIB = 1024 * 1024


def events(count: int, keyed: bool) -> list[Event]:
    """`count` increments as the hot path writes them: a random event id, a stream id from
    Redis's clock, a delta; with a key, a client's UUID key and the total it produced."""
    now_ms = int(time.time() * 1000)
    made = []
    for i in range(count):
        user = f"u-{i % USERS:012d}"
        key = str(uuid.uuid4()) if keyed else None
        total = random.randrange(1, 10**9) if keyed else None
        made.append(
            Event(f"{now_ms + i // 100}-{i % 100}", str(uuid.uuid4()), user, 100, key, total)
        )
    return made


def measure(url: str, count: int, keyed: bool) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE users, score_events, score_events_pruned")
        conn.execute(
            "INSERT INTO users (user_id) SELECT format('u-%%s', lpad(i::text, 12, '0'))"
            " FROM generate_series(0, %s) AS i",
            (USERS - 1,),
        )
    store = Store(url)
    try:
        made = events(count, keyed)
        for i in range(0, count, BATCH):
            store.apply(made[i : i + BATCH])
    finally:
        store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE score_events")
        row = conn.execute(
            "SELECT pg_total_relation_size('score_events'), pg_relation_size('score_events'),"
            " pg_indexes_size('score_events')"
        ).fetchone()
    assert row is not None
    per_million = 1_000_000 / count
    total, heap, indexes = (int(v) * per_million / MIB for v in row)  # type: ignore[call-overload]
    return {"total": total, "heap": heap, "indexes": indexes}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    directory = Path(tempfile.mkdtemp(prefix="ledger-size-"))
    server = PostgresServer(directory / "postgres", fsync=False).start()
    try:
        with psycopg.connect(server.url) as conn:
            migrate(conn)
        for keyed in (False, True):
            size = measure(server.url, count, keyed)
            print(
                f"{count:,} events {'with' if keyed else 'without'} an Idempotency-Key, per "
                f"million: {size['total']:.0f} MiB (table {size['heap']:.0f}, indexes "
                f"{size['indexes']:.0f})"
            )
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
