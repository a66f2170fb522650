"""A stack's correctness after its runs: Redis against the client's ledger, then Postgres
against Redis once the persister has drained every partition (the checks: bench/ledger.py).

After a primary was killed with SCORE_REDIS_MIN_REPLICAS=0, increments it had acknowledged
but not yet replicated may be gone (asynchronous replication, as the README's "Deploying"
says): they are counted as lost, and only an increment invented or counted twice fails."""

from __future__ import annotations

from typing import Any

from bench.ledger import Ledger, UserLedger, check_postgres, check_redis, check_users
from bench.persister_bench import wait_drained
from bench.stack import Stack


def correctness(
    stack: Stack, ledger: Ledger, *, may_lose: bool = False, users: UserLedger | None = None
) -> dict[str, Any]:
    """Redis against `ledger`; Postgres against Redis once drained; and, for a keyed client's
    `users`, each of them in both stores against its own ledger."""
    client = stack.client()
    try:
        out: dict[str, Any] = {
            "redis": check_redis(client, ledger, stack.schema, may_lose=may_lose)
        }
        if stack.worker is None:
            out["postgres"] = {"skipped": "no persister (issue 3) yet"}
            return out
        if not wait_drained(stack):
            out["postgres"] = {"ok": False, "error": "the persister did not drain in time"}
            return out
        at_most = ledger.acknowledged + ledger.unacknowledged if may_lose else None
        out["postgres"] = check_postgres(client, stack.database_url, stack.schema, at_most=at_most)
        if users is not None:
            out["users"] = check_users(
                client, stack.database_url, stack.schema, users, may_lose=may_lose
            )
        return out
    finally:
        client.close()
