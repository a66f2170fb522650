"""The end of the soak: let the persister drain, then check the guarantees.

- Postgres equals the clients' ledger: per user, exactly the acknowledged increments plus some
  of the uncertain ones (each 0 or 1 times); every acknowledged Idempotency-Key once in the
  ledger table with its delta, every uncertain one at most once, no other key of ours.
- Each user's score in Postgres is the sum of that user's events.
- Redis equals Postgres, user by user, and `score-service reconcile` exits 0.
- No dead letters (an increment Postgres refused is not in Postgres).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import httpx
import psycopg

from service.dev.servers import ServerError, wait_for

from .ledger import Ledger
from .stack import ROOT, Stack

SHOW = 15  # users listed per kind of failure


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    checked_users: int = 0
    exact_users: int = 0  # users with no uncertain increment: an exact equality was checked
    keys_checked: int = 0
    postgres_total: int = 0


def drain(stack: Stack, timeout: float) -> str | None:
    """Wait until the service is ready and no increment waits in Redis; the failure if not."""
    from .driver import LAST_LAG_ERROR, unpersisted

    last = {"body": ""}

    def ready() -> bool:
        resp = httpx.get(stack.base + "/readyz", timeout=2)
        last["body"] = resp.text
        return resp.status_code == 200

    try:
        wait_for(ready, timeout, "the service to be ready after the faults")
    except Exception as exc:
        return f"not ready {timeout:.0f}s after the faults stopped: {exc}; /readyz: {last['body']}"
    seen: list[int | None] = [None]

    def drained() -> bool:
        seen[0] = unpersisted(stack)
        return seen[0] == 0

    try:
        wait_for(drained, timeout, "the drain")
        return None
    except ServerError:
        left = seen[0]
    return f"the persister did not drain within {timeout:.0f}s after the faults stopped: " + (
        f"{left} increments still waiting in Redis (pending or undelivered)"
        if left is not None
        else f"Redis could not be read ({LAST_LAG_ERROR[0]})"
    )


def _key_of_ours(stored: str) -> str:
    """A key as the client sent it: a namespace the service may prefix is dropped."""
    at = stored.find("soak-")
    return stored[at:] if at >= 0 else stored


def verify(stack: Stack, ledger: Ledger) -> Verdict:
    verdict = Verdict()
    fail = verdict.failures.append
    with psycopg.connect(stack.postgres.url, autocommit=True) as conn:
        scores = {str(u): int(s) for u, s in conn.execute("SELECT user_id, score FROM users")}  # type: ignore[call-overload]
        sums = {
            str(u): int(s)  # type: ignore[call-overload]
            for u, s in conn.execute("SELECT user_id, sum(delta) FROM score_events GROUP BY 1")
        }
        keyed = conn.execute(
            "SELECT idempotency_key, user_id, delta FROM score_events"
            " WHERE idempotency_key IS NOT NULL"
        ).fetchall()
    redis_scores: dict[str, int] = {}
    client = stack.redis_client()
    try:
        for part in stack.schema().all():
            for member, score in client.zscan_iter(part.leaderboard, count=1000):
                redis_scores[member.decode()] = -int(score)
        dead = {p.dead_letters: client.xlen(p.dead_letters) for p in stack.schema().all()}
    finally:
        client.close()

    # Postgres against the ledger, per user
    wrong: list[str] = []
    for user, b in sorted(ledger.bounds.items()):
        verdict.checked_users += 1
        verdict.exact_users += b.low == b.high
        got = scores.get(user)
        if got is None or not b.low <= got <= b.high:
            expected = f"{b.acked}" if b.low == b.high else f"{b.low}..{b.high} (acked {b.acked})"
            wrong.append(f"{user}: Postgres {got}, the ledger says {expected}")
    if wrong:
        fail(
            f"Postgres differs from the clients' ledger for {len(wrong)} users "
            f"(lost if below, doubled if above): " + "; ".join(wrong[:SHOW])
        )
    strangers = sorted(u for u, s in scores.items() if u not in ledger.bounds and s != 0)
    if strangers:
        fail(f"Postgres has scores for users no client knows: {strangers[:SHOW]}")
    verdict.postgres_total = sum(scores.values())

    # each score is the sum of its events
    unsummed = [f"{u}: score {s}, events {sums.get(u, 0)}" for u, s in scores.items()
                if s != sums.get(u, 0)]  # fmt: skip
    if unsummed:
        fail(f"Postgres scores that are not the sum of their events: {unsummed[:SHOW]}")

    # keyed increments, one by one
    rows: dict[str, list[tuple[str, int]]] = {}
    for key, user, delta in keyed:
        rows.setdefault(_key_of_ours(str(key)), []).append((str(user), int(delta)))  # type: ignore[call-overload]
    problems: list[str] = []
    for key, inc in ledger.acked_keys.items():
        verdict.keys_checked += 1
        found = rows.get(key, [])
        if found != [(inc.user, inc.delta)]:
            problems.append(f"acknowledged {key} ({inc.user} {inc.delta:+}): in Postgres {found}")
    for key, inc in ledger.uncertain_keys.items():
        verdict.keys_checked += 1
        found = rows.get(key, [])
        if found not in ([], [(inc.user, inc.delta)]):
            problems.append(f"uncertain {key} ({inc.user} {inc.delta:+}): in Postgres {found}")
    known = ledger.acked_keys.keys() | ledger.uncertain_keys.keys()
    unknown = [k for k in rows if k.startswith("soak-") and k not in known]
    problems += [f"{k} in Postgres {rows[k]}, never sent or refused" for k in unknown]
    if problems:
        fail(f"{len(problems)} keyed increments wrong in Postgres: " + "; ".join(problems[:SHOW]))

    # Redis against Postgres, per user
    drift = [
        f"{u}: Redis {redis_scores.get(u)}, Postgres {s}"
        for u, s in sorted(scores.items())
        if redis_scores.get(u) != s
    ]
    drift += [
        f"{u}: Redis {s}, not in Postgres" for u, s in redis_scores.items() if u not in scores
    ]
    if drift:
        fail(f"Redis differs from Postgres for {len(drift)} users: " + "; ".join(drift[:SHOW]))

    if any(dead.values()):
        fail(f"dead letters (increments Postgres refused): {dead}")

    report = subprocess.run(
        [sys.executable, "-m", "service.cli", "reconcile"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    if report.returncode != 0:
        fail(f"score-service reconcile exited {report.returncode}: {report.stdout[-800:]}"
             f"{report.stderr[-800:]}")  # fmt: skip
    return verdict
