"""The persister against real Redis and Postgres, in-process: exactly-once apply, reclaiming,
dead letters, group commit, trimming, the lag metrics and the flush requests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from persist_support import keyed_rows, ledger, pg_scores, redis_totals, submit
from rq import Queue
from starlette.testclient import TestClient
from support import Servers, make_env

from persister.events import Event, Malformed, parse, parse_all
from persister.flush import MAX_FAILURES, Drained, Persister
from persister.jobs import QUEUE, FlushRequester
from persister.locks import flush_lock
from persister.reconcile import reconcile, render
from persister.store import Store
from service.dev.servers import free_port, wait_for
from service.keys import PERSISTER_GROUP, KeySchema
from service.persister_lag import read_lags_sync
from service.settings import Settings


@pytest.fixture
def persister(settings: Settings, r: redis.Redis) -> Iterator[Persister]:
    p = Persister(settings)
    yield p
    p.close()


def test_drain_persists_every_accepted_increment_once_and_trims(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    users = add_users(count=5)
    for i in range(200):
        submit(settings, r, users[i % 5], i + 1)
    events = KeySchema(1).all()[0].events
    assert r.xlen(events) == 200

    done = persister.drain(0)

    assert done is not None and done.events == 200 and done.new == 200
    assert pg_scores(pg, users) == redis_totals(settings, r, users)
    assert len(ledger(pg, users)) == 200
    assert r.xlen(events) == 0  # trimmed: Postgres has every entry
    (lag,) = read_lags_sync(r, KeySchema(1).all())
    assert (lag.unpersisted, lag.persisted, lag.dead_letters) == (0, 200, 0)


def test_the_lag_trusts_the_stream_over_the_groups_stale_counter(
    settings: Settings, r: redis.Redis, add_users, persister: Persister
) -> None:
    # Redis's `lag` comes from counters that replication and AOF replay carry with XGROUP SETID
    # ENTRIESREAD; a soak saw one 15,000 too high after restarts, and the drain never ended.
    users = add_users(count=2)
    for i in range(30):
        submit(settings, r, users[i % 2], 1)
    keys = KeySchema(1).all()[0]
    done = persister.drain(0)
    assert done is not None and done.events == 30
    for i in range(4):  # some events left undelivered, so the estimate is checked both ways
        submit(settings, r, users[0], 1)
    # Redis 7 keeps the counter (6.2, the embedded one, has none: the stream is all there is)
    counted = int(r.info("server")["redis_version"].split(".")[0]) >= 7

    def stale(last: str) -> None:
        if counted:
            r.execute_command(
                "XGROUP", "SETID", keys.events, PERSISTER_GROUP, last, "ENTRIESREAD", 0
            )
            assert r.xinfo_groups(keys.events)[0]["lag"] > 0

    stale(r.xinfo_groups(keys.events)[0]["last-delivered-id"])
    if counted:
        assert r.xinfo_groups(keys.events)[0]["lag"] == 34  # the stale counter
    (lag,) = read_lags_sync(r, [keys])
    assert (lag.pending, lag.undelivered) == (0, 4)  # at most what the stream holds

    assert persister.drain(0) is not None
    stale("$")
    (lag,) = read_lags_sync(r, [keys])
    assert (lag.unpersisted, lag.oldest_age_s) == (0, 0.0)  # nothing after the last delivered


def test_a_keyed_entry_carries_its_key_and_total_and_a_broken_one_is_malformed() -> None:
    e = str(uuid.uuid4())
    plain = parse((b"1-0", {b"e": e.encode(), b"u": b"ann", b"d": b"5"}))
    assert (plain.idempotency_key, plain.total) == (None, None)
    keyed = parse((b"1-1", {b"e": e.encode(), b"u": b"ann", b"d": b"5", b"k": b"o-1", b"t": b"9"}))
    assert (keyed.idempotency_key, keyed.total) == ("o-1", 9)
    assert keyed.fields() == {b"e": e.encode(), b"u": b"ann", b"d": b"5", b"k": b"o-1", b"t": b"9"}
    for extra in (
        {b"k": b"o-1"},  # no total
        {b"t": b"9"},  # a total without a key
        {b"k": b"", b"t": b"9"},
        {b"k": b"o-1", b"t": b"-1"},
        {b"k": b"o-1", b"t": b"x"},
    ):
        with pytest.raises(Malformed):
            parse((b"1-2", {b"e": e.encode(), b"u": b"ann", b"d": b"5", **extra}))


def test_the_same_batch_applied_twice_changes_nothing(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, servers: Servers
) -> None:
    users = add_users(count=3)
    batch = [Event(f"{i}-0", str(uuid.uuid4()), users[i % 3], (i + 1) * 10) for i in range(30)]
    store = Store(servers.postgres.url)
    try:
        assert store.apply(batch) == (30, [])
        after_once = (pg_scores(pg, users), ledger(pg, users))

        assert store.apply(batch) == (0, [])  # replayed as it is
        assert store.apply(list(reversed(batch[:20]))) == (0, [])  # reordered, partly
        assert store.apply(batch[10:] + batch[:10]) == (0, [])

        assert (pg_scores(pg, users), ledger(pg, users)) == after_once
        assert sum(after_once[0].values()) == sum(e.delta for e in batch)
    finally:
        store.close()


def test_a_keyed_increment_sent_again_within_its_keys_lifetime_is_counted_once(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, servers: Servers
) -> None:
    # A failover lost the first attempt from Redis after the persister had read it: the
    # client's retry, with the same key, is a new event (new id, new stream id) there.
    (alice, bob) = add_users(count=2)
    ttl_ms = 60_000
    store = Store(servers.postgres.url, ttl_ms // 1000)

    def keyed(stream_ms: int, user: str, key: str, delta: int) -> Event:
        return Event(f"{stream_ms}-0", str(uuid.uuid4()), user, delta, key, delta)

    try:
        assert store.apply([keyed(1_000, alice, "k1", 5)]) == (1, [])
        retry = keyed(1_000 + ttl_ms - 1, alice, "k1", 5)
        assert store.apply([retry]) == (0, [])  # the same increment: not counted again
        assert store.apply([keyed(1_000 + ttl_ms + 1, alice, "k1", 7)]) == (1, [])  # reused
        assert store.apply([keyed(2_000, bob, "k1", 3)]) == (1, [])  # another user's key
        assert store.apply([Event("3000-0", str(uuid.uuid4()), alice, 2)]) == (1, [])  # no key
        assert pg_scores(pg, [alice, bob]) == {alice: 5 + 7 + 2, bob: 3}
    finally:
        store.close()


def test_a_replayed_stream_entry_is_counted_once(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    (alice,) = add_users(count=1)
    submit(settings, r, alice, 5)
    events = KeySchema(1).all()[0].events
    (entry,) = r.xrange(events)
    r.xadd(events, entry[1])  # the same event again, under a new stream id (a failover replay)
    persister.drain(0)
    r.xadd(events, entry[1])  # and once more, after it was committed
    persister.drain(0)

    assert pg_scores(pg, [alice]) == {alice: 5}
    assert len(ledger(pg, [alice])) == 1
    assert r.xlen(events) == 0


def test_entries_left_pending_by_a_dead_consumer_are_reclaimed(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    users = add_users(count=2)
    for i in range(10):
        submit(settings, r, users[i % 2], 1)
    events = KeySchema(1).all()[0].events
    persister.stream(0).ensure_group()
    r.xreadgroup(PERSISTER_GROUP, "dead-worker", {events: ">"}, count=6)  # then it dies

    # The dead consumer's entries are reclaimed once idle (XAUTOCLAIM); the others are new.
    def drained() -> bool:
        persister.drain(0)
        return r.xpending(events, PERSISTER_GROUP)["pending"] == 0 and r.xlen(events) == 0

    wait_for(drained, 10, "the dead consumer's entries to be reclaimed")
    assert pg_scores(pg, users) == {users[0]: 5, users[1]: 5}
    assert len(ledger(pg, users)) == 10


def test_entries_committed_but_not_acknowledged_are_not_applied_twice(
    settings: Settings,
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    persister: Persister,
    servers: Servers,
) -> None:
    users = add_users(count=2)
    for i in range(8):
        submit(settings, r, users[i % 2], 3)
    events = KeySchema(1).all()[0].events
    persister.stream(0).ensure_group()
    # A worker reads and commits a batch, then dies before XACK.
    (_, entries), *_ = r.xreadgroup(PERSISTER_GROUP, "dead-worker", {events: ">"})
    store = Store(servers.postgres.url)
    try:
        assert store.apply(parse_all(entries)[0]) == (8, [])
    finally:
        store.close()
    for user in users:
        submit(settings, r, user, 100)

    def drained() -> bool:
        persister.drain(0)
        return r.xlen(events) == 0

    wait_for(drained, 10, "the committed entries to be reclaimed and acknowledged")
    assert pg_scores(pg, users) == redis_totals(settings, r, users) == {u: 112 for u in users}
    assert len(ledger(pg, users)) == 10


def test_events_postgres_refuses_are_dead_lettered_without_blocking_the_others(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    users = add_users(count=2)
    keys = KeySchema(1).all()[0]
    submit(settings, r, users[0], 7)
    unknown = {"e": str(uuid.uuid4()), "u": "nobody", "d": "5", "k": "order-9", "t": "5"}
    r.xadd(keys.events, unknown)  # a user Postgres does not know
    r.xadd(keys.events, {"e": "not-a-uuid", "u": users[1], "d": "1"})  # malformed
    submit(settings, r, users[1], 9)

    first = persister.drain(0)

    assert first is not None and first.dead == 1  # the malformed one, at once
    assert pg_scores(pg, users) == {users[0]: 7, users[1]: 9}  # the others are not held back
    assert r.xpending(keys.events, PERSISTER_GROUP)["pending"] == 1  # "nobody" waits

    def dead_lettered() -> bool:
        persister.drain(0)
        return r.xlen(keys.dead_letters) == 2

    wait_for(dead_lettered, 20, f"the refused event to fail {MAX_FAILURES} times")
    dead = {fields[b"u"]: fields for _, fields in r.xrange(keys.dead_letters)}
    assert set(dead) == {b"nobody", users[1].encode()}
    assert dead[b"nobody"][b"reason"].startswith(b"UnknownUser: user 'nobody' is not in")
    assert (dead[b"nobody"][b"k"], dead[b"nobody"][b"t"]) == (b"order-9", b"5")  # kept whole
    assert dead[users[1].encode()][b"reason"].startswith(b"malformed")
    assert read_lags_sync(r, [keys])[0].dead_letters == 2
    assert r.xlen(keys.events) == 0 and not r.exists(keys.persist_failures)
    assert pg_scores(pg, users) == {users[0]: 7, users[1]: 9}


def test_postgres_unavailable_keeps_the_events_in_redis(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, servers: Servers
) -> None:
    users = add_users(count=2)
    for user in users:
        submit(settings, r, user, 4)
    keys = KeySchema(1).all()[0]
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/score_service"
    down = Persister(Settings.from_env(make_env(servers, DATABASE_URL=nowhere)))
    try:
        done = down.drain(0, budget_s=0.5)
    finally:
        down.close()

    assert done is not None and done.waiting_for_postgres and done.events == 0
    assert r.xlen(keys.events) == 2 and r.xpending(keys.events, PERSISTER_GROUP)["pending"] == 2
    assert ledger(pg, users) == {}

    back = Persister(settings)
    try:
        wait_for(lambda: bool(back.drain(0)) and r.xlen(keys.events) == 0, 10, "the drain")
    finally:
        back.close()
    assert pg_scores(pg, users) == {u: 4 for u in users}


def test_a_flush_is_requested_once_per_flush_cycle(
    settings: Settings, r: redis.Redis, add_users, persister: Persister
) -> None:
    (alice,) = add_users(count=1)
    assert submit(settings, r, alice, 1).flush  # the first event asks for a flush
    assert not submit(settings, r, alice, 1).flush  # the next ones pile up for it
    assert not submit(settings, r, alice, 1).flush
    persister.drain(0)  # a flush clears the flag as it starts
    assert submit(settings, r, alice, 1).flush


def test_flush_requests_become_rq_jobs(settings: Settings, r: redis.Redis) -> None:
    request = FlushRequester(settings)
    queue = Queue(QUEUE, connection=r)
    request(0)
    wait_for(lambda: queue.count == 1, 10, "the flush job")
    (job,) = queue.get_jobs()
    assert (job.func_name, job.args) == ("persister.jobs.flush", (0,))


def test_metrics_show_the_lag_and_the_throughput(
    settings: Settings,
    r: redis.Redis,
    add_users,
    client: TestClient,
    persister: Persister,
) -> None:
    (alice,) = add_users(count=1)
    for _ in range(3):
        submit(settings, r, alice, 2)

    def metric(name: str) -> float:
        text = client.get("/metrics").text
        line = next(x for x in text.splitlines() if x.startswith(name + '{partition="0"}'))
        return float(line.split()[-1])

    assert metric("score_persister_unpersisted_events") == 3
    assert metric("score_persister_lag_seconds") >= 0
    persister.drain(0)
    assert metric("score_persister_unpersisted_events") == 0
    assert metric("score_persister_lag_seconds") == 0
    assert metric("score_persister_events_persisted_total") == 3


def test_consumers_of_dead_workers_are_forgotten_once_idle_and_empty(
    settings: Settings, r: redis.Redis, add_users, persister: Persister
) -> None:
    (alice,) = add_users(count=1)
    submit(settings, r, alice, 1)
    events = KeySchema(1).all()[0].events
    stream = persister.stream(0)
    stream.ensure_group()
    r.xreadgroup(PERSISTER_GROUP, "dead-holding", {events: ">"})  # holds an entry
    r.xgroup_createconsumer(events, PERSISTER_GROUP, "dead-empty")  # holds nothing
    r.xgroup_createconsumer(events, PERSISTER_GROUP, persister.consumer)
    assert len(r.xinfo_consumers(events, PERSISTER_GROUP)) == 3

    stream.forget_idle_consumers(0)

    names = {c["name"].decode() for c in r.xinfo_consumers(events, PERSISTER_GROUP)}
    assert names == {"dead-holding", persister.consumer}


@pytest.mark.parametrize("drained_between", [True, False])
def test_a_key_used_again_after_its_record_expired_counts_in_postgres_too(
    settings: Settings,
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    token,
    client: TestClient,
    persister: Persister,
    drained_between: bool,
) -> None:
    """An Idempotency-Key is remembered for SCORE_IDEMPOTENCY_TTL: a request made with it after
    that is a new increment, in Postgres as in Redis (whether or not the first was persisted)."""
    (alice,) = add_users(count=1)
    headers = {"Authorization": f"Bearer {token(alice)}", "Idempotency-Key": "order-1"}
    body = {"user_id": alice, "score_increase": 5}
    assert client.post("/api/v1/score", json=body, headers=headers).json()["new_score"] == 5
    if drained_between:
        persister.drain(0)
        # as if it were a SCORE_IDEMPOTENCY_TTL old: within it, Postgres takes the key sent
        # again for the same increment (a retry after a failover), and counts it once
        ttl_ms = settings.idempotency_ttl_s * 1000
        pg.execute(
            "UPDATE score_events SET stream_id ="
            " (split_part(stream_id, '-', 1)::bigint - %s)::text || '-0' WHERE user_id = %s",
            (ttl_ms, alice),
        )
    record = KeySchema(1).for_user(alice).idempotency(alice, "order-1")
    # SCORE_IDEMPOTENCY_TTL is 60 s at least: rather than wait, let Redis expire it now
    assert r.pexpire(record, 1)
    wait_for(lambda: not r.exists(record), 5, "the record to expire")

    again = client.post("/api/v1/score", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["new_score"] == 10
    assert "idempotent-replayed" not in again.headers
    replay = client.post("/api/v1/score", json=body, headers=headers)  # remembered again
    assert replay.json()["new_score"] == 10 and replay.headers["idempotent-replayed"] == "true"
    persister.drain(0)

    assert pg_scores(pg, [alice]) == redis_totals(settings, r, [alice]) == {alice: 10}
    assert keyed_rows(pg, [alice]) == [(alice, "order-1", 5, 5), (alice, "order-1", 5, 10)]
    report = reconcile(settings, repair=False)
    assert report.clean, render(report)


def test_a_flush_that_lost_its_lock_after_commit_does_not_acknowledge(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection, add_users, persister: Persister
) -> None:
    """A flush whose lock expired while it committed (a rebuild or reconcile may have paused
    the partition meanwhile, reading stream and Postgres in one snapshot) must leave its batch
    pending: acknowledging it could take the events out of the stream between the pauser's
    two reads. The next flush finds them in the ledger and adds nothing."""
    users = add_users(count=2)
    for i in range(4):
        submit(settings, r, users[i % 2], 5)
    stream = persister.stream(0)
    stream.ensure_group()
    batch = stream.read(100)
    lock = flush_lock(r, KeySchema(1).all()[0])
    assert lock.acquire(blocking=False)
    r.set(lock.name, "another-owner")  # it expired, and someone else holds the partition now

    assert not persister._persist(stream, batch, lock=lock, deadline=1e12, done=Drained(0))

    assert pg_scores(pg, users) == {u: 10 for u in users}  # committed...
    events = KeySchema(1).all()[0].events
    assert r.xpending(events, PERSISTER_GROUP)["pending"] == 4  # ...but not acknowledged
    r.delete(lock.name)  # the other owner is done

    def drained() -> bool:
        persister.drain(0)
        return r.xlen(events) == 0

    wait_for(drained, 10, "the pending batch to be reclaimed and acknowledged")
    assert pg_scores(pg, users) == redis_totals(settings, r, users) == {u: 10 for u in users}
    assert len(ledger(pg, users)) == 4
