"""`score-service reconcile [--repair]`: does every user's score in Redis equal Postgres's?

Redis's total for a user must equal Postgres's score plus the user's increments not yet
committed (see persister.unpersisted). The persister is paused before the Postgres snapshot is
opened (so no flush commits between the two), and stays paused while reconcile reads; the hot
path is not, so each chunk of users is read in one MULTI with the stream's last id, and only
the increments up to that id are counted for them. A member of a leaderboard that the snapshot
does not know is looked up again outside it: a user provisioned since is not drift (its
score is not checked by this run).

It also checks the ledger: each user's score equals the sum of that user's events, those
pruned from the ledger counted by their carried-forward total (`score_events_pruned`,
persister.prune).
`--repair` makes Redis agree with Postgres, by increments (ZINCRBY), which commute with the
hot path's own updates; each chunk of corrections is one Lua call that records a token with
them (lua/repair_scores-2.lua), so a call sent again after a lost reply changes nothing.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import psycopg
import redis

from persister.locks import Pause, paused
from persister.resend import resent
from persister.unpersisted import Unpersisted, last_entry_id, read_unpersisted
from service.connections import sync_redis
from service.keys import KeySchema
from service.progress import Progress, no_progress, rate
from service.scripts import SyncScripts, publish_top, repair_scores
from service.settings import Settings

CHUNK = 1000
SHOWN = 10
REPAIR_MARK_TTL_S = 24 * 3600
"""A repaired chunk's token is kept this long: far longer than any resend of it."""

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Drift:
    """A user whose Redis total is not Postgres's score plus its pending increments."""

    user_id: str
    partition: int
    redis: int | None
    """None: the user is missing from Redis."""
    postgres: int | None
    """None: Postgres does not know the user."""
    pending: int

    @property
    def expected(self) -> int:
        return (self.postgres or 0) + self.pending

    @property
    def difference(self) -> int:
        return (self.redis or 0) - self.expected


@dataclass
class Report:
    partitions: int
    users: int = 0
    unpersisted: int = 0
    drift: list[Drift] = field(default_factory=list)
    ledger: list[tuple[str, int, int]] = field(default_factory=list)
    """Users whose score is not the sum of their events: (user, score, sum of events, those
    pruned included)."""
    repaired: int = 0
    provisioned_since: int = 0
    """Members Postgres has, but not in the snapshot: provisioned while reconcile ran."""
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.drift and not self.ledger


def reconcile(settings: Settings, *, repair: bool, progress: Progress = no_progress) -> Report:
    """Compare every user's score in Redis with Postgres; with `repair`, fix Redis.
    `progress` hears of the users checked, chunk by chunk."""
    began = time.monotonic()
    client = sync_redis(settings)
    schema = KeySchema(settings.partitions)
    report = Report(settings.partitions)
    try:
        with (
            paused(client, schema) as pause,
            psycopg.connect(settings.database_url, connect_timeout=5) as conn,
            psycopg.connect(settings.database_url, connect_timeout=5, autocommit=True) as now,
        ):
            # one snapshot for the ledger and the scores, opened only once paused: a flush
            # that was committing has committed and acknowledged, and no other will
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute("SELECT 1")
            waiting = {
                k.index: read_unpersisted(client, conn, k, pause.renew) for k in schema.all()
            }
            report.unpersisted = sum(w.count for w in waiting.values())
            members = sum(int(client.zcard(k.leaderboard)) for k in schema.all())
            progress.expect("users checked", members)
            in_redis: set[str] = set()
            for keys in schema.all():
                _check_members(
                    client,
                    conn,
                    now,
                    waiting[keys.index],
                    in_redis=in_redis,
                    report=report,
                    pause=pause,
                    progress=progress,
                )
            _check_missing(
                client,
                conn,
                schema,
                waiting,
                in_redis=in_redis,
                report=report,
                pause=pause,
                progress=progress,
            )
            report.ledger = _ledger_mismatches(conn)
            if repair and report.drift:
                report.repaired = _repair(client, schema, report.drift, settings.top_n)
    finally:
        client.close()
    report.seconds = round(time.monotonic() - began, 3)
    return report


def _zscan(client: redis.Redis, key: str) -> Iterator[list[str]]:
    cursor = 0
    while True:
        cursor, pairs = client.zscan(key, cursor, count=CHUNK)
        yield [cast(bytes, member).decode() for member, _ in pairs]
        if cursor == 0:
            return


def _postgres_scores(conn: Conn, user_ids: list[str]) -> dict[str, int]:
    rows = conn.execute(
        "SELECT user_id, score FROM users WHERE user_id = ANY(%s)", (user_ids,)
    ).fetchall()
    return {str(u): int(s) for u, s in rows}  # type: ignore[call-overload]


def _check_members(
    client: redis.Redis,
    conn: Conn,
    now: Conn,
    waiting: Unpersisted,
    *,
    in_redis: set[str],
    report: Report,
    pause: Pause,
    progress: Progress,
) -> None:
    """Every member of the partition's leaderboard against Postgres."""
    keys = waiting.keys
    for scanned in _zscan(client, keys.leaderboard):
        members = [m for m in scanned if m not in in_redis]  # ZSCAN may repeat a member
        if not members:
            continue
        # the members' totals and the stream's end, at one instant
        pipe = client.pipeline(transaction=True)
        pipe.zmscore(keys.leaderboard, members)
        pipe.xrevrange(keys.events, "+", "-", 1)
        scores, last = pipe.execute()
        waiting.advance(client, last_entry_id(last), pause.renew)
        postgres = _postgres_scores(conn, members)
        unknown = [
            m for m, s in zip(members, scores, strict=True) if s is not None and m not in postgres
        ]
        # outside the snapshot: provisioned since it was taken (Postgres first, then Redis)
        since = set(_postgres_scores(now, unknown)) if unknown else set()
        report.provisioned_since += len(since)
        for user_id, stored in zip(members, scores, strict=True):
            if stored is None or user_id in since:  # removed since the scan; new since the snapshot
                continue
            in_redis.add(user_id)
            report.users += 1
            found = Drift(
                user_id,
                keys.index,
                -int(stored),
                postgres.get(user_id),
                waiting.deltas.get(user_id, 0),
            )
            if found.postgres is None or found.difference:
                report.drift.append(found)
            progress("users checked", 1)
        pause.renew()


def _check_missing(
    client: redis.Redis,
    conn: Conn,
    schema: KeySchema,
    waiting: dict[int, Unpersisted],
    *,
    in_redis: set[str],
    report: Report,
    pause: Pause,
    progress: Progress,
) -> None:
    """Users Postgres knows and no leaderboard holds."""
    after = ""
    while True:
        rows = conn.execute(
            "SELECT user_id, score FROM users WHERE user_id > %s ORDER BY user_id LIMIT %s",
            (after, CHUNK * 10),
        ).fetchall()
        if not rows:
            return
        after = str(rows[-1][0])
        absent = [(str(u), int(s)) for u, s in rows if str(u) not in in_redis]  # type: ignore[call-overload]
        for user_id, score in absent:
            keys = schema.for_user(user_id)
            if client.zscore(keys.leaderboard, user_id) is not None:
                continue  # provisioned after the scan passed
            report.users += 1
            pending = waiting[keys.index].deltas.get(user_id, 0)
            report.drift.append(Drift(user_id, keys.index, None, score, pending))
            progress("users checked", 1)
        pause.renew()


def _ledger_mismatches(conn: Conn) -> list[tuple[str, int, int]]:
    rows = conn.execute(
        """
        SELECT u.user_id, u.score, coalesce(e.total, 0) + coalesce(p.total, 0)
        FROM users AS u
        LEFT JOIN (SELECT user_id, sum(delta) AS total FROM score_events GROUP BY user_id) AS e
            USING (user_id)
        LEFT JOIN score_events_pruned AS p USING (user_id)
        WHERE u.score <> coalesce(e.total, 0) + coalesce(p.total, 0)
        ORDER BY abs(u.score - coalesce(e.total, 0) - coalesce(p.total, 0)) DESC, u.user_id
        """
    ).fetchall()
    return [(str(u), int(s), int(t)) for u, s, t in rows]  # type: ignore[call-overload]


def _repair(client: redis.Redis, schema: KeySchema, drift: list[Drift], top_n: int) -> int:
    """Apply the corrections, a chunk per Lua call, each at most once (resent on a lost
    reply); the number of users corrected."""
    scripts = SyncScripts(client)
    corrections: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for d in drift:
        corrections[d.partition].append(_correction(d))
    for index, todo in sorted(corrections.items()):
        keys = schema.all()[index]
        for i in range(0, len(todo), CHUNK):
            call = repair_scores(keys, uuid.uuid4().hex, REPAIR_MARK_TTL_S, todo[i : i + CHUNK])
            # None when a lost reply's call had applied it: the same outcome
            resent(functools.partial(scripts.run, call))
        scripts.run(publish_top(keys, top_n))
    return len(drift)


def _correction(d: Drift) -> tuple[str, str, int]:
    """(op, user_id, value) for lua/repair_scores-2.lua, in the ZSET's terms (-total)."""
    if d.postgres is None:
        return ("rem", d.user_id, 0)
    if d.redis is None:
        return ("add", d.user_id, -d.expected)
    # stored negated: adding the difference takes the total down by it
    return ("incr", d.user_id, d.difference)


def render(report: Report) -> str:
    """The report an operator reads."""
    lines = [
        f"reconcile: checked {report.users} users in {report.partitions} partition(s) "
        f"in {report.seconds:.1f}s ({rate(report.users, report.seconds)}); "
        f"{report.unpersisted} increments not yet in Postgres "
        "counted as pending"
    ]
    if not report.drift:
        lines.append("drift: none (Redis = Postgres + pending increments, for every user)")
    else:
        lines.append(f"drift: {len(report.drift)} user(s); the largest differences:")
        lines.append(
            f"  {'user_id':<32} {'redis':>16} {'postgres':>16} {'pending':>10} {'difference':>12}"
        )
        worst = sorted(report.drift, key=lambda d: (-abs(d.difference), d.user_id))
        for d in worst[:SHOWN]:
            shown_redis = "missing" if d.redis is None else str(d.redis)
            shown_pg = "unknown" if d.postgres is None else str(d.postgres)
            lines.append(
                f"  {d.user_id:<32} {shown_redis:>16} {shown_pg:>16} {d.pending:>10} "
                f"{d.difference:>+12}"
            )
        if len(worst) > SHOWN:
            lines.append(f"  ... and {len(worst) - SHOWN} more")
    if not report.ledger:
        lines.append("ledger: every score equals the sum of its user's events")
    else:
        lines.append(
            f"ledger: {len(report.ledger)} user(s) whose score is not the sum of their events:"
        )
        for user_id, score, total in report.ledger[:SHOWN]:
            lines.append(f"  {user_id:<32} score {score}, events sum to {total}")
    if report.provisioned_since:
        lines.append(
            f"{report.provisioned_since} user(s) provisioned while reconcile ran: not checked"
        )
    if report.repaired:
        lines.append(f"repaired: Redis now agrees with Postgres for {report.repaired} user(s)")
    return "\n".join(lines)
