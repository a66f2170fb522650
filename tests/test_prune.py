"""`score-service ledger prune`: the ledger's retention keeps exactly-once, rebuild and
reconcile, against real servers."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from persist_support import cli, pg_scores, redis_totals, submit
from support import Servers, make_env

from persister.events import Event, parse_all
from persister.flush import Persister
from persister.layout import ensure
from persister.prune import MIN_AGE_S, PruneRefused, prune
from persister.rebuild import rebuild
from persister.reconcile import reconcile, render
from persister.store import Store
from service.dev.servers import wait_for
from service.keys import PERSISTER_GROUP, KeySchema
from service.scripts import Status
from service.settings import Settings

Conn = psycopg.Connection[tuple[object, ...]]
DAY = dt.timedelta(days=1)


@pytest.fixture
def persister(settings: Settings, r: redis.Redis) -> Iterator[Persister]:
    p = Persister(settings)
    yield p
    p.close()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def add_history(pg: Conn, users: list[str], per_user: int, days_ago: float = 10) -> None:
    """`per_user` increments of 1..per_user for each user, accepted and committed `days_ago`
    (as the persister would have written them then), and the users' scores with them."""
    when = now() - dt.timedelta(days=days_ago)
    ms = int(when.timestamp() * 1000)
    pg.execute(
        """
        INSERT INTO score_events (event_id, user_id, delta, stream_id, recorded_at)
        SELECT gen_random_uuid(), u, d, %s::text || '-' || (row_number() OVER ()), %s
        FROM unnest(%s::text[]) AS u, generate_series(1, %s) AS d
        """,
        (str(ms), when, users, per_user),
    )
    pg.execute(
        "UPDATE users SET score = score + %s WHERE user_id = ANY(%s)",
        (per_user * (per_user + 1) // 2, users),
    )


def ledger_rows(pg: Conn) -> int:
    row = pg.execute("SELECT count(*) FROM score_events").fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def carried(pg: Conn) -> dict[str, tuple[int, int]]:
    rows = pg.execute("SELECT user_id, total, events FROM score_events_pruned").fetchall()
    return {str(u): (int(t), int(n)) for u, t, n in rows}  # type: ignore[call-overload]


def leaderboard(r: redis.Redis) -> dict[bytes, float]:
    return dict(r.zrange(KeySchema(1).all()[0].leaderboard, 0, -1, withscores=True))


def test_after_a_prune_reconcile_is_clean_and_a_rebuild_gives_the_same_scores(
    settings: Settings, r: redis.Redis, pg: Conn, add_users, persister: Persister
) -> None:
    users = add_users(count=3)
    add_history(pg, users, per_user=50)
    rebuild(settings, force=True)  # Redis learns the history
    for i, user in enumerate(users):
        submit(settings, r, user, 7 + i)  # recent: kept
        submit(settings, r, user, 100, key=f"k-{user}")  # recent and keyed: kept
    persister.drain(0)
    scores = pg_scores(pg, users)
    assert ledger_rows(pg) == 3 * 50 + 6

    done = prune(settings, now() - 5 * DAY)

    assert done.events == 3 * 50 and ledger_rows(pg) == 6
    assert carried(pg) == {u: (50 * 51 // 2, 50) for u in users}
    assert pg_scores(pg, users) == scores  # a prune changes no score
    report = reconcile(settings, repair=False)
    assert report.clean and not report.ledger, render(report)
    before = leaderboard(r)
    r.flushall()
    rebuild(settings, force=False)
    assert leaderboard(r) == before
    assert redis_totals(settings, r, users) == scores
    # the Idempotency-Key records within the window came back from the rows kept
    replay = submit(settings, r, users[0], 100, key=f"k-{users[0]}")
    assert replay.status is Status.REPLAY and replay.total == scores[users[0]]
    assert prune(settings, now() - 5 * DAY).events == 0  # again: nothing more to do


def test_prune_refuses_a_date_inside_a_day_or_the_idempotency_window(
    servers: Servers, r: redis.Redis, pg: Conn, add_users, snapshot
) -> None:
    users = add_users(count=2)
    add_history(pg, users, per_user=5, days_ago=2.5)
    env = make_env(servers)
    ensure(Settings.from_env(env))  # the layout is recorded by the first command otherwise
    before = snapshot()

    out = cli(env, "ledger", "prune", "--before", (now() - dt.timedelta(hours=1)).isoformat())
    assert out.returncode == 2 and "24 hours" in out.stderr, out.stderr

    three_days = make_env(servers, SCORE_IDEMPOTENCY_TTL=str(3 * 24 * 3600))
    with pytest.raises(PruneRefused, match="SCORE_IDEMPOTENCY_TTL"):
        prune(Settings.from_env(three_days), now() - 2 * DAY)
    out = cli(three_days, "ledger", "prune", "--before", (now() - 2 * DAY).isoformat())
    assert out.returncode == 2 and "refusing to prune" in out.stderr, out.stderr
    assert snapshot() == before

    out = cli(env, "ledger", "prune", "--before", (now() - 2 * DAY).isoformat())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ledger: pruned 10 events recorded before"), out.stdout
    assert ledger_rows(pg) == 0 and MIN_AGE_S == 24 * 3600


def test_prune_refuses_a_date_newer_than_an_event_a_stream_still_holds(
    settings: Settings, r: redis.Redis, pg: Conn, add_users, persister: Persister, servers
) -> None:
    """A worker killed between COMMIT and XACK leaves its entry pending: it will be delivered
    again, and only its ledger row keeps it from being added twice."""
    (user,) = add_users(count=1)
    events = KeySchema(1).all()[0].events
    old_ms = int((now() - 3 * DAY).timestamp() * 1000)
    fields = Event("", str(uuid.uuid4()), user, 40).fields()
    r.xgroup_create(events, PERSISTER_GROUP, id="0", mkstream=True)
    r.xadd(events, fields, id=f"{old_ms}-0")  # type: ignore[arg-type]
    (_, entries), *_ = r.xreadgroup(PERSISTER_GROUP, "killed-after-commit", {events: ">"})
    store = Store(servers.postgres.url)
    try:
        store.apply(parse_all(entries)[0])
    finally:
        store.close()
    pg.execute("UPDATE score_events SET recorded_at = now() - interval '3 days'")  # stuck since
    r.zincrby(KeySchema(1).all()[0].leaderboard, -40, user)  # the hot path had added it

    with pytest.raises(PruneRefused, match="events stream still holds"):
        prune(settings, now() - 2 * DAY)
    assert ledger_rows(pg) == 1

    def drained() -> bool:  # the dead consumer's entry is reclaimed once idle long enough
        persister.drain(0)
        return r.xlen(events) == 0

    wait_for(drained, 10, "the pending entry to be persisted again")
    assert pg_scores(pg, [user]) == {user: 40}  # once: its row was still there
    assert prune(settings, now() - 2 * DAY).events == 1  # persisted and gone from Redis: allowed
    report = reconcile(settings, repair=False)
    assert report.clean, render(report)


def test_prune_while_the_persister_drains_loses_or_doubles_nothing(
    settings: Settings, r: redis.Redis, pg: Conn, add_users, persister: Persister
) -> None:
    users = add_users(count=40)
    add_history(pg, users, per_user=300)  # 12,000 old rows
    rebuild(settings, force=True)
    stop = threading.Event()
    sent: dict[str, int] = dict.fromkeys(users, 0)

    def traffic() -> None:
        client = redis.Redis.from_url(settings.redis_url)
        try:
            i = 0
            while not stop.is_set():
                user = users[i % len(users)]
                submit(settings, client, user, 1)
                sent[user] += 1
                i += 1
        finally:
            client.close()

    def draining() -> None:  # a thread of its own: increments keep coming while it drains
        while not stop.is_set():
            persister.drain(0, budget_s=0.5)

    threads = [threading.Thread(target=traffic), threading.Thread(target=draining)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: sum(sent.values()) > 200, 10, "traffic")
        began = sum(sent.values())
        done = prune(settings, now() - 5 * DAY, batch_pages=2)  # many short transactions
        assert done.events == 40 * 300
        assert sum(sent.values()) > began  # increments arrived, and were drained, meanwhile
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    persister.drain(0)
    expected = {u: 300 * 301 // 2 + sent[u] for u in users}
    assert pg_scores(pg, users) == expected
    assert redis_totals(settings, r, users) == expected
    assert ledger_rows(pg) == sum(sent.values())
    report = reconcile(settings, repair=False)
    assert report.clean, render(report)
