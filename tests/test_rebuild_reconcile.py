"""Rebuilding Redis from Postgres, and reconciling the two, against real servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest
import redis
from persist_support import cli, keyed_rows, pg_scores, redis_totals, submit
from starlette.testclient import TestClient
from support import Servers

from persister.events import parse_all
from persister.flush import Persister
from persister.rebuild import rebuild, rebuild_if_missing
from persister.reconcile import reconcile, render
from persister.store import Store
from persister.unpersisted import read_unpersisted
from service.app import create_app
from service.dev.servers import wait_for
from service.keys import PERSISTER_GROUP, KeySchema
from service.scripts import Status, Swapped, SwapStep, SyncScripts, swap_leaderboard
from service.settings import Settings


@pytest.fixture
def persister(settings: Settings, r: redis.Redis) -> Iterator[Persister]:
    p = Persister(settings)
    yield p
    p.close()


def leaderboard(r: redis.Redis) -> dict[bytes, float]:
    return dict(r.zrange(KeySchema(1).all()[0].leaderboard, 0, -1, withscores=True))


def mixed_state(
    settings: Settings, r: redis.Redis, users: list[str], persister: Persister, url: str
) -> None:
    """Increments in every state: persisted; committed but not acknowledged (a worker killed
    between COMMIT and XACK); read and not committed; not read yet."""
    events = KeySchema(1).all()[0].events
    for i, user in enumerate(users):
        submit(settings, r, user, 10 + i)
    persister.drain(0)
    for i, user in enumerate(users):
        submit(settings, r, user, 100 + i)
    (_, entries), *_ = r.xreadgroup(PERSISTER_GROUP, "killed-after-commit", {events: ">"})
    store = Store(url)
    try:
        store.apply(parse_all(entries)[0])
    finally:
        store.close()
    for user in users:
        submit(settings, r, user, 1000)
    r.xreadgroup(PERSISTER_GROUP, "killed-before-commit", {events: ">"})
    for user in users:
        submit(settings, r, user, 10_000)


def test_a_wiped_redis_is_rebuilt_from_postgres(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    users = add_users(count=12)
    for i, user in enumerate(users):
        submit(settings, r, user, (i + 1) * 7)
    persister.drain(0)
    before = leaderboard(r)
    r.flushall()

    rebuild_if_missing(settings)

    assert leaderboard(r) == before
    assert r.exists(*KeySchema(1).ready_markers) == 1
    top = r.xrevrange(KeySchema(1).all()[0].top, count=1)[0][1]
    assert len(top) == settings.top_n and top[users[-1].encode()] == str(-12 * 7).encode()
    r.zadd(KeySchema(1).all()[0].leaderboard, {users[0]: -1})
    rebuild_if_missing(settings)  # the marker is set: nothing to do
    assert leaderboard(r)[users[0].encode()] == -1


def test_a_rebuild_keeps_every_increment_not_yet_in_postgres(
    settings: Settings, r: redis.Redis, add_users, persister: Persister, servers: Servers
) -> None:
    users = add_users(count=4)
    mixed_state(settings, r, users, persister, servers.postgres.url)
    before = leaderboard(r)

    done = rebuild(settings, force=True)

    assert done is not None and done.users == 4
    assert done.unpersisted == 8  # read-not-committed and unread; not the committed ones
    assert leaderboard(r) == before


def test_increments_accepted_during_a_rebuild_are_replayed_by_the_swap(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users
) -> None:
    users = add_users(count=2)
    keys = KeySchema(1).all()[0]
    waiting = read_unpersisted(r, pg, keys, keep_alive=lambda: None)
    r.hset(keys.rebuild_progress, mapping={"token": "t1", "upto": waiting.last_id})
    r.zadd(keys.rebuilt_leaderboard, {users[0]: -5, users[1]: 0})  # as built from Postgres
    submit(settings, r, users[0], 3)  # accepted while it was built
    submit(settings, r, users[1], 4)
    r.xadd(keys.events, {"e": "x", "u": "not-in-postgres", "d": "9"})

    step = SyncScripts(r).run(swap_leaderboard(keys, "t1", 10))

    assert step == SwapStep(Swapped.NOW, replayed=2, scanned=3)
    assert leaderboard(r) == {users[0].encode(): -8.0, users[1].encode(): -4.0}
    assert not r.exists(keys.rebuilt_leaderboard, keys.rebuild_progress)
    assert r.get(keys.ready) == b"t1"


def test_after_a_wipe_a_retry_of_a_request_made_before_it_is_a_replay(
    settings: Settings,
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    token,
    client: TestClient,
    persister: Persister,
) -> None:
    (alice,) = add_users(count=1)
    auth = {"Authorization": f"Bearer {token(alice)}"}
    keyed = {**auth, "Idempotency-Key": "order-1"}
    body = {"user_id": alice, "score_increase": 5}
    assert client.post("/api/v1/score", json=body, headers=keyed).json()["new_score"] == 5
    plain = {"user_id": alice, "score_increase": 3}
    assert client.post("/api/v1/score", json=plain, headers=auth).json()["new_score"] == 8
    persister.drain(0)
    r.flushall()
    record = KeySchema(1).for_user(alice).idempotency(alice, "order-1")
    lost = client.post("/api/v1/score", json=body, headers=keyed)
    # not ready until the rebuild: a 503 (the Lua call sees the ready marker missing)
    assert lost.status_code == 503 and not r.exists(record)

    done = rebuild(settings, force=False)

    assert done is not None and done.records == 1
    assert r.get(record) == b"5:5"  # exactly what the hot path wrote
    wait_for(lambda: client.get("/readyz").status_code == 200, 10, "readiness")
    assert 0 < r.pttl(record) <= settings.idempotency_ttl_s * 1000
    retry = client.post("/api/v1/score", json=body, headers=keyed)
    assert retry.status_code == 200 and retry.json()["new_score"] == 5  # the first result
    assert retry.headers["idempotent-replayed"] == "true"
    assert redis_totals(settings, r, [alice]) == {alice: 8}  # nothing added
    assert r.xlen(KeySchema(1).all()[0].events) == 0
    persister.drain(0)
    assert pg_scores(pg, [alice]) == {alice: 8}
    assert keyed_rows(pg, [alice]) == [(alice, "order-1", 5, 5), (alice, None, 3, None)]
    report = reconcile(settings, repair=False)
    assert report.clean, render(report)


def test_a_rebuild_restores_the_records_still_in_time_and_overwrites_none(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    (alice,) = add_users(count=1)
    for i, key in enumerate(["old", "edge", "live", "held"]):
        assert submit(settings, r, alice, i + 1, key).status is Status.OK
    persister.drain(0)
    submit(settings, r, alice, 10, "waiting")  # not persisted yet: it is in the stream only
    seconds, micros = r.time()
    now_ms, ttl_ms = seconds * 1000 + micros // 1000, settings.idempotency_ttl_s * 1000
    # accepted longer ago than the TTL (recorded then too), and 30 s before the TTL ends
    pg.execute(
        "UPDATE score_events SET stream_id = %s, recorded_at = now() - interval '2 days'"
        " WHERE idempotency_key = 'old'",
        (f"{now_ms - 2 * ttl_ms}-0",),
    )
    pg.execute(
        "UPDATE score_events SET stream_id = %s WHERE idempotency_key = 'edge'",
        (f"{now_ms - ttl_ms + 30_000}-0",),
    )
    keys = KeySchema(1).for_user(alice)
    record = {k: keys.idempotency(alice, k) for k in ["old", "edge", "live", "held", "waiting"]}
    r.delete(record["old"], record["edge"], record["live"], record["waiting"])
    r.set(record["held"], "4:999", ex=60)  # Redis holds one: a rebuild must not replace it

    done = rebuild(settings, force=True)

    assert done is not None and done.records == 3
    assert [r.get(record[k]) for k in ["old", "edge", "live", "held", "waiting"]] == [
        None, b"2:3", b"3:6", b"4:999", b"10:20"
    ]  # fmt: skip
    assert 0 < r.pttl(record["edge"]) <= 30_000  # the time it had left, not a new TTL
    assert ttl_ms - 60_000 < r.pttl(record["live"]) <= ttl_ms
    assert ttl_ms - 60_000 < r.pttl(record["waiting"]) <= ttl_ms
    assert 0 < r.pttl(record["held"]) <= 60_000


def test_a_key_used_twice_is_restored_with_its_newest_record(
    settings: Settings, r: redis.Redis, add_users, persister: Persister
) -> None:
    (alice,) = add_users(count=1)
    record = KeySchema(1).for_user(alice).idempotency(alice, "order-1")
    assert submit(settings, r, alice, 5, "order-1").total == 5
    r.delete(record)  # expired early (e.g. a shorter SCORE_IDEMPOTENCY_TTL then): used again
    assert submit(settings, r, alice, 5, "order-1").total == 10
    persister.drain(0)
    r.flushall()

    rebuild_if_missing(settings)

    assert r.get(record) == b"5:10"  # the newest: the record Redis held before the wipe


def test_readyz_answers_503_until_the_rebuild_is_done(
    settings: Settings, r: redis.Redis, add_users, persister: Persister
) -> None:
    (alice,) = add_users(count=1)
    submit(settings, r, alice, 42)
    persister.drain(0)
    r.flushall()
    go = threading.Event()

    def slow_rebuild(s: Settings) -> None:
        go.wait(30)
        rebuild_if_missing(s)

    with TestClient(create_app(settings, rebuild=slow_rebuild)) as client:
        wait_for(lambda: "rebuild" in client.get("/readyz").text, 10, "the rebuild to start")
        assert client.get("/readyz").status_code == 503
        # an existing user is never told 404 while Redis is being rebuilt
        assert client.get(f"/api/v1/users/{alice}").status_code == 503
        go.set()
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "readiness")
        assert client.get(f"/api/v1/users/{alice}").json()["score"] == 42


def test_reconcile_counts_increments_not_yet_persisted(
    settings: Settings, r: redis.Redis, add_users, persister: Persister, servers: Servers
) -> None:
    users = add_users(count=4)
    mixed_state(settings, r, users, persister, servers.postgres.url)

    report = reconcile(settings, repair=False)

    assert report.clean, render(report)
    assert (report.users, report.unpersisted) == (4, 8)


def test_reconcile_reports_drift_and_repairs_redis(
    settings: Settings,
    env: dict[str, str],
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    persister: Persister,
) -> None:
    users = add_users(count=5)
    for i, user in enumerate(users):
        submit(settings, r, user, 10 * (i + 1))
    persister.drain(0)
    keys = KeySchema(1).all()[0]
    r.zincrby(keys.leaderboard, -7, users[0])  # Redis says 7 more than it should
    r.zrem(keys.leaderboard, users[1])  # a user Redis lost
    r.zadd(keys.leaderboard, {"ghost": -3})  # a member Postgres does not know

    found = cli(env, "reconcile")

    assert found.returncode == 1, found.stdout + found.stderr
    assert "drift: 3 user(s)" in found.stdout
    line = next(x for x in found.stdout.splitlines() if users[0] in x)
    assert line.split()[1:] == ["17", "10", "0", "+7"]
    assert "missing" in next(x for x in found.stdout.splitlines() if users[1] in x)
    assert "unknown" in next(x for x in found.stdout.splitlines() if "ghost" in x)

    repaired = cli(env, "reconcile", "--repair")
    assert repaired.returncode == 1 and "repaired: Redis now agrees" in repaired.stdout

    again = cli(env, "reconcile")
    assert again.returncode == 0, again.stdout
    assert "drift: none" in again.stdout
    assert redis_totals(settings, r, [*users, "ghost"]) == pg_scores(pg, users)


def test_reconcile_checks_that_each_score_is_the_sum_of_its_events(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    users = add_users(count=2)
    submit(settings, r, users[0], 5)
    persister.drain(0)
    pg.execute("UPDATE users SET score = score + 1 WHERE user_id = %s", (users[0],))
    r.zincrby(KeySchema(1).all()[0].leaderboard, -1, users[0])  # Redis agrees with the bad row

    report = reconcile(settings, repair=False)

    assert not report.drift and report.ledger == [(users[0], 6, 5)]
    assert not report.clean
    assert f"{users[0]}" in render(report) and "events sum to 5" in render(report)


def test_reconcile_sees_no_drift_while_increments_keep_arriving(
    settings: Settings, r: redis.Redis, add_users, persister: Persister
) -> None:
    users = add_users(count=20)
    events = KeySchema(1).all()[0].events
    stop = threading.Event()
    submitted = [0]

    def traffic() -> None:
        client = redis.Redis.from_url(settings.redis_url)
        try:
            while not stop.is_set():
                submit(settings, client, users[submitted[0] % len(users)], 1)
                submitted[0] += 1
        finally:
            client.close()

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        wait_for(lambda: r.xlen(events) > 100, 10, "traffic")
        reports = []
        for _ in range(2):
            persister.drain(0, budget_s=0.5)  # keeps the backlog, and each reconcile, short
            before = submitted[0]
            reports.append(reconcile(settings, repair=False))
            assert submitted[0] > before  # increments arrived while it ran
    finally:
        stop.set()
        thread.join()
    for report in reports:
        assert report.clean, render(report)
