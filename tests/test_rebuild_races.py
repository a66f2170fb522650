"""The races around rebuild, reconcile and provisioning, each driven step by step against real
Redis and Postgres: a flush that commits while a rebuild waits for the pause, a swap or a
repair whose reply is lost, users provisioned while a rebuild or a reconcile runs, a large
backlog replayed by the swap, and a Redis wiped under traffic."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from fault_proxy import FaultProxy, Mode
from persist_support import pg_scores, redis_totals, submit
from starlette.testclient import TestClient
from support import Servers, make_env

import persister.rebuild
import persister.reconcile
from persister.events import Batch
from persister.flush import Persister
from persister.locks import flush_lock
from persister.rebuild import rebuild, rebuild_if_missing
from persister.reconcile import reconcile, render
from persister.store import Store
from persister.stream import EventStream
from service.app import create_app
from service.dev.servers import wait_for
from service.keys import KeySchema
from service.scripts import Call, Status, Swapped, SwapStep, SyncScripts, load
from service.settings import Settings
from service.users import provision_sync


@pytest.fixture
def persister_(settings: Settings, r: redis.Redis) -> Iterator[Persister]:
    p = Persister(settings)
    yield p
    p.close()


@pytest.fixture
def proxy(servers: Servers) -> Iterator[FaultProxy]:
    """A fault proxy in front of the suite's Redis."""
    p = FaultProxy("127.0.0.1", servers.redis.port).start()
    yield p
    p.stop()


def through(settings: Settings, proxy: FaultProxy) -> Settings:
    return dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{proxy.port}/0")


def observe_entry(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> threading.Event:
    """An event set when `module.name` (a context manager) is entered, just before it runs."""
    entered = threading.Event()
    real = getattr(module, name)

    @contextlib.contextmanager
    def observed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        entered.set()
        with real(*args, **kwargs) as value:
            yield value

    monkeypatch.setattr(module, name, observed)
    return entered


def after(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, hook: Callable[[], None]
) -> None:
    """Run `hook` once `module.name` has returned (a step of a rebuild or reconcile)."""
    real = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value = real(*args, **kwargs)
        hook()
        return value

    monkeypatch.setattr(module, name, wrapped)


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = target()
        except Exception as exc:  # reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def flush_in_progress(r: redis.Redis) -> tuple[Any, EventStream, Batch]:
    """A flush of partition 0 that has taken its lock and read its batch, not yet committed."""
    keys = KeySchema(1).all()[0]
    lock = flush_lock(r, keys)
    assert lock.acquire(blocking=False)
    stream = EventStream(r, keys, "flusher")
    batch = stream.read(100)
    assert batch.events
    return lock, stream, batch


def finish_flush(url: str, lock: Any, stream: EventStream, batch: Batch) -> None:
    """Commit the batch, acknowledge it, let go of the lock: what a flush does next."""
    store = Store(url)
    try:
        store.apply(batch.events)
    finally:
        store.close()
    stream.ack(batch.stream_ids(), [])
    lock.release()


# -- item 1: the snapshot is taken only once the persister is paused ---------------------------


def test_a_flush_that_commits_while_a_rebuild_waits_for_the_pause_is_counted_once(
    settings: Settings,
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    servers: Servers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (alice,) = add_users(count=1)
    submit(settings, r, alice, 100)
    lock, stream, batch = flush_in_progress(r)
    pausing = observe_entry(monkeypatch, persister.rebuild, "paused")

    thread, out = in_thread(lambda: rebuild(settings, force=True))
    assert pausing.wait(10), out
    # the rebuild now waits for the flush lock: the flush commits and acknowledges meanwhile
    finish_flush(servers.postgres.url, lock, stream, batch)
    thread.join(30)

    assert "error" not in out, out
    assert pg_scores(pg, [alice]) == {alice: 100}
    assert redis_totals(settings, r, [alice]) == {alice: 100}  # was 0: in neither snapshot


def test_a_flush_that_commits_while_reconcile_waits_for_the_pause_is_no_drift(
    settings: Settings,
    r: redis.Redis,
    add_users,
    servers: Servers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (alice,) = add_users(count=1)
    submit(settings, r, alice, 100)
    lock, stream, batch = flush_in_progress(r)
    pausing = observe_entry(monkeypatch, persister.reconcile, "paused")

    thread, out = in_thread(lambda: reconcile(settings, repair=False))
    assert pausing.wait(10), out
    finish_flush(servers.postgres.url, lock, stream, batch)
    thread.join(30)

    report = out["value"]
    assert isinstance(report, persister.reconcile.Report)
    assert report.clean, render(report)


# -- item 2: a swap or a repair whose reply is lost is sent again, and changes nothing more -----


def test_every_swap_call_whose_reply_is_lost_is_sent_again_and_replays_nothing_twice(
    settings: Settings,
    r: redis.Redis,
    add_users,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = add_users(count=3)
    for i, user in enumerate(users):
        submit(settings, r, user, 10 * (i + 1))

    def accepted_during_the_build() -> None:
        for i in range(7):
            submit(settings, r, users[i % 3], 1)

    after(monkeypatch, persister.rebuild, "_fill", accepted_during_the_build)
    monkeypatch.setattr(persister.rebuild, "SWAP_CHUNK", 2)  # several calls: 4 entries + swap
    r.script_load(load("swap_leaderboard").body)  # every lost reply is the swap's, not NOSCRIPT
    real = SyncScripts.run
    steps: list[SwapStep] = []

    def reply_lost_once(self: SyncScripts, call: Call[Any]) -> Any:
        if call.script != "swap_leaderboard":
            return real(self, call)
        if proxy.dropped_replies < len(steps) + 1:  # the first attempt of each call
            proxy.set(Mode.DROP_ONE_REPLY)
        step = real(self, call)
        steps.append(step)
        return step

    monkeypatch.setattr(SyncScripts, "run", reply_lost_once)

    done = rebuild(through(settings, proxy), force=True)

    # every call's first reply was lost, the last one's after it had swapped (whoever resent
    # it, redis-py or the rebuild, found the progress moved, or the swap made)
    assert done is not None and proxy.dropped_replies == len(steps) >= 2
    assert steps[-1].swapped is not Swapped.NOT_YET
    assert redis_totals(settings, r, users) == {users[0]: 13, users[1]: 22, users[2]: 32}
    assert r.exists(*KeySchema(1).ready_markers) == 1


def test_a_repair_whose_reply_is_lost_is_applied_once(
    settings: Settings,
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    persister_: Persister,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = add_users(count=3)
    for user in users:
        submit(settings, r, user, 10)
    persister_.drain(0)
    keys = KeySchema(1).all()[0]
    r.zincrby(keys.leaderboard, -7, users[0])  # Redis says 7 more than it should
    r.zincrby(keys.leaderboard, 5, users[1])  # and 5 less
    r.script_load(load("repair_scores").body)  # the lost reply is the repair's, not NOSCRIPT
    real = persister.reconcile._repair

    def reply_lost(*args: Any) -> int:
        proxy.set(Mode.DROP_ONE_REPLY)  # the first write of the repair: its corrections
        return real(*args)

    monkeypatch.setattr(persister.reconcile, "_repair", reply_lost)

    report = reconcile(through(settings, proxy), repair=True)

    assert proxy.dropped_replies == 1 and report.repaired == 2
    assert redis_totals(settings, r, users) == pg_scores(pg, users) == dict.fromkeys(users, 10)


# -- items 3 and 4: users provisioned while a rebuild or a reconcile runs ------------------------


def test_users_provisioned_during_a_rebuild_keep_every_increment_and_are_never_404(
    settings: Settings,
    r: redis.Redis,
    pg: psycopg.Connection,
    add_users,
    servers: Servers,
    token,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (old,) = add_users(count=1)
    submit(settings, r, old, 1)
    schema = KeySchema(1)
    results: list[Status] = []

    def provision_and_play() -> None:
        # after the snapshot, before the swap: one user by the CLI's path, one by the API
        with psycopg.connect(servers.postgres.url) as conn:
            provision_sync(conn, r, schema, settings.top_n, ["cli-user"])
        admin = {"Authorization": f"Bearer {token('ops', admin=True)}"}
        created = client.post("/api/v1/admin/users", json={"user_ids": ["api-user"]}, headers=admin)
        assert created.status_code == 200, created.text
        for user in ["cli-user", "api-user", old] * 3:
            results.append(submit(settings, r, user, 5).status)

    with TestClient(create_app(settings)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "the app")
        after(monkeypatch, persister.rebuild, "_fill", provision_and_play)
        done = rebuild(settings, force=True)
        assert done is not None

        assert results == [Status.OK] * 9  # never UNKNOWN_USER once provisioned
        assert redis_totals(settings, r, ["cli-user", "api-user", old]) == {
            "cli-user": 15, "api-user": 15, old: 16,
        }  # fmt: skip
        assert client.get("/api/v1/users/api-user").json()["score"] == 15
    report = reconcile(settings, repair=False)
    assert report.clean, render(report)


def test_reconcile_neither_reports_nor_removes_users_provisioned_after_its_snapshot(
    settings: Settings,
    r: redis.Redis,
    add_users,
    servers: Servers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = add_users(count=3)
    submit(settings, r, users[0], 4)  # waiting in the stream: read in the snapshot

    def provision() -> None:
        with psycopg.connect(servers.postgres.url) as conn:
            provision_sync(conn, r, KeySchema(1), settings.top_n, ["late"])

    after(monkeypatch, persister.reconcile, "read_unpersisted", provision)  # snapshot taken

    report = reconcile(settings, repair=True)

    assert report.clean and report.repaired == 0, render(report)
    assert report.provisioned_since == 1 and report.users == 3
    assert redis_totals(settings, r, [*users, "late"]) == {
        users[0]: 4, users[1]: 0, users[2]: 0, "late": 0,
    }  # fmt: skip


# -- item 6: the swap replays a large backlog in bounded calls ------------------------------------


def test_a_large_backlog_is_replayed_in_bounded_calls_and_exactly_while_writers_post(
    settings: Settings,
    r: redis.Redis,
    add_users,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = add_users(count=10)
    written: Counter[str] = Counter()  # by the writer thread
    backlogged: Counter[str] = Counter()
    refused: list[Status] = []
    stop = threading.Event()

    def writer() -> None:
        client = redis.Redis.from_url(settings.redis_url)
        try:
            i = 0
            while not stop.is_set():
                user = users[i % len(users)]
                status = submit(settings, client, user, 1).status
                if status is Status.OK:
                    written[user] += 1
                else:
                    refused.append(status)
                i += 1
        finally:
            client.close()

    def backlog() -> None:
        for i in range(300):  # accepted while the leaderboard was built
            assert submit(settings, r, users[i % len(users)], 2).status is Status.OK
            backlogged[users[i % len(users)]] += 2

    chunk = 16
    after(monkeypatch, persister.rebuild, "_fill", backlog)
    monkeypatch.setattr(persister.rebuild, "SWAP_CHUNK", chunk)
    real = SyncScripts.run
    steps: list[SwapStep] = []

    def recorded(self: SyncScripts, call: Call[Any]) -> Any:
        if call.script != "swap_leaderboard":
            return real(self, call)
        steps.append(real(self, call))
        return steps[-1]

    monkeypatch.setattr(SyncScripts, "run", recorded)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: sum(written.values()) > 50, 10, "the writer")
        during = sum(written.values())
        done = rebuild(settings, force=True)
        wait_for(lambda: sum(written.values()) > during + 50, 10, "the writer after the swap")
    finally:
        stop.set()
        thread.join()

    assert done is not None and done.swap_calls == len(steps) >= 300 // chunk
    assert all(step.scanned <= chunk for step in steps)
    assert [s.swapped for s in steps].count(Swapped.NOW) == 1
    assert not refused
    assert redis_totals(settings, r, users) == dict(written + backlogged)


# -- item 11: a wiped Redis answers 503, never 404 -------------------------------------------------


def test_after_a_flushall_an_existing_user_gets_only_200_or_503_until_rebuilt(
    settings: Settings, r: redis.Redis, add_users, token
) -> None:
    (alice,) = add_users(count=1)
    body = {"user_id": alice, "score_increase": 1}
    headers = {"Authorization": f"Bearer {token(alice)}"}
    statuses: Counter[int] = Counter()
    reads: Counter[int] = Counter()
    stop = threading.Event()

    with TestClient(create_app(settings, rebuild=rebuild_if_missing)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "the app")

        def player() -> None:
            while not stop.is_set():
                statuses[client.post("/api/v1/score", json=body, headers=headers).status_code] += 1

        thread = threading.Thread(target=player)
        thread.start()
        try:
            wait_for(lambda: statuses[200] > 5, 10, "accepted increments")
            r.flushall()  # Redis loses everything while the service runs
            # at once, before the service's readiness poll can notice
            statuses[client.post("/api/v1/score", json=body, headers=headers).status_code] += 1
            reads[client.get(f"/api/v1/users/{alice}").status_code] += 1
            wait_for(lambda: statuses[503] > 0, 10, "a 503")
            wait_for(lambda: r.exists(*KeySchema(1).ready_markers) == 1, 30, "the rebuild")
            before = statuses[200]
            wait_for(lambda: statuses[200] > before + 5, 10, "accepted increments again")
        finally:
            stop.set()
            thread.join()
        reads[client.get(f"/api/v1/users/{alice}").status_code] += 1

    assert set(statuses) == {200, 503}, statuses
    assert set(reads) == {503, 200}, reads


def test_a_user_provisioned_while_redis_is_rebuilt_gets_503_then_its_score_never_404(
    settings: Settings, r: redis.Redis, add_users, token
) -> None:
    add_users(count=2)
    gate = threading.Event()

    def gated_rebuild(s: Settings) -> None:
        gate.wait(30)
        rebuild_if_missing(s)

    admin = {"Authorization": f"Bearer {token('ops', admin=True)}"}
    body = {"user_id": "newbie", "score_increase": 7}
    player = {"Authorization": f"Bearer {token('newbie')}"}
    with TestClient(create_app(settings, rebuild=gated_rebuild)) as client:
        r.flushall()  # a wiped Redis: the rebuild waits at the gate
        wait_for(lambda: client.get("/readyz").status_code == 503, 10, "the wipe to be seen")
        # the admin API refuses while not ready (it cannot tell a rebuild from a layout
        # change); the CLI's path provisions into the rebuild
        created = client.post("/api/v1/admin/users", json={"user_ids": ["newbie"]}, headers=admin)
        assert created.status_code == 503
        add_users("newbie")
        assert client.post("/api/v1/score", json=body, headers=player).status_code == 503
        assert client.get("/api/v1/users/newbie").status_code == 503
        gate.set()
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, "the rebuild")
        assert client.post("/api/v1/score", json=body, headers=player).json()["new_score"] == 7
        assert client.get("/api/v1/users/newbie").json()["score"] == 7


def test_admin_adjustments_after_a_flushall_get_503_not_unknown_user(
    settings: Settings, r: redis.Redis, add_users, token
) -> None:
    (alice,) = add_users(count=1)
    admin = {"Authorization": f"Bearer {token('ops', admin=True)}"}
    item = {"user_id": alice, "delta": 5, "idempotency_key": "fix-1"}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "the app")
        r.flushall()  # before the readiness poll notices: the Lua call itself says NOT_READY
        resp = client.post("/api/v1/admin/scores", json={"adjustments": [item]}, headers=admin)
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"


# -- all of it at once: the test that would have found them -------------------------------------


def test_rebuilds_and_repairs_amid_traffic_draining_and_provisioning_lose_and_double_nothing(
    servers: Servers, r: redis.Redis, pg: psycopg.Connection
) -> None:
    settings = Settings.from_env(make_env(servers, SCORE_PARTITIONS="2"))
    schema = KeySchema(2)
    r.mset(dict.fromkeys(schema.ready_markers, "1"))
    users = [f"u-{i}" for i in range(40)]
    with psycopg.connect(servers.postgres.url) as conn:
        provision_sync(conn, r, schema, settings.top_n, users)
    provisioned: list[str] = []  # appended once its provisioning call has returned
    ledgers: list[Counter[str]] = []
    problems: list[str] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        acked: Counter[str] = Counter()
        ledgers.append(acked)
        rng = random.Random(seed)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            while not stop.is_set():
                user = rng.choice(users + provisioned[-20:])
                delta = rng.randint(1, 9)
                status = submit(settings, client, user, delta).status
                if status is Status.OK:
                    acked[user] += delta
                else:
                    problems.append(f"{user}: {status.name}")
        finally:
            client.close()

    def provisioner() -> None:
        client = redis.Redis.from_url(settings.redis_url)
        try:
            with psycopg.connect(servers.postgres.url) as conn:
                for i in itertools.count():
                    if stop.is_set():
                        return
                    provision_sync(conn, client, schema, settings.top_n, [f"new-{i}"])
                    provisioned.append(f"new-{i}")
        finally:
            client.close()

    def drainer() -> None:
        p = Persister(settings)
        try:
            while not stop.is_set():
                for partition in range(2):
                    p.drain(partition, budget_s=0.2, wait_s=0.2)
        finally:
            p.close()

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(2)]
    threads += [threading.Thread(target=provisioner), threading.Thread(target=drainer)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(3):
            wait_for(lambda n=round_: len(provisioned) > 10 * (n + 1), 30, "provisioning")
            assert rebuild(settings, force=True) is not None
            during = reconcile(settings, repair=True)  # nothing to repair, nobody removed
            assert during.clean and not during.repaired, render(during)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    p = Persister(settings)
    try:
        for partition in range(2):
            p.drain(partition)
    finally:
        p.close()
    everyone = users + provisioned
    expected = dict.fromkeys(everyone, 0) | dict(sum(ledgers, Counter()))
    assert not problems, problems[:10]
    assert pg_scores(pg, everyone) == expected
    assert redis_totals(settings, r, everyone) == expected
    report = reconcile(settings, repair=False)
    assert report.clean, render(report)
