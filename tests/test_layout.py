"""The partition layout, against real servers: recorded on first start (the first wins), every
partition-aware process refuses another count, and `score-service partitions set N` changes it
while a service runs, losing no acknowledged increment."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from persist_support import cli, pg_scores, redis_totals, submit, unpersisted
from starlette.testclient import TestClient
from support import ROOT, SECRET, Servers, make_env, refused, start_service, stop_process

from persister import layout
from persister.flush import Persister
from persister.repartition import change
from persister.wiring import hooks
from service.app import create_app
from service.auth import mint
from service.dev.servers import free_port, wait_for
from service.keys import KeySchema
from service.layout import Layout, LayoutMismatch, encode
from service.scripts import Status, SyncScripts, prepare_submit
from service.settings import Settings

KEY = KeySchema(1).layout


def recorded(r: redis.Redis, pg: psycopg.Connection) -> tuple[Layout | None, Layout | None]:
    return layout.read_postgres(pg), layout.read_redis(r)


def users(count: int) -> list[str]:
    return [f"u-{uuid.uuid4().hex[:10]}" for _ in range(count)]


# ---- refusing another count -------------------------------------------------------------


def test_every_partition_aware_command_refuses_another_count(
    env: dict[str, str], r: redis.Redis, pg: psycopg.Connection, snapshot
) -> None:
    out = cli(env, "users", "add", "alice")  # the first start records 1 partition
    assert out.returncode == 0, out.stderr
    assert recorded(r, pg) == (Layout(1), Layout(1))
    three = {**env, "SCORE_PARTITIONS": "3"}
    before = snapshot()
    words = ("SCORE_PARTITIONS is 3", "1 partition(s)", "score-service partitions set 3")
    for command in (
        ["users", "add", "bob"],
        ["rebuild"],
        ["reconcile"],
        ["worker"],  # would run until the timeout if it did not refuse
        ["serve", "--port", str(free_port())],
    ):
        refused(cli(three, *command), *words)
    assert snapshot() == before


def test_serve_with_the_recorded_count_starts(env, r, pg, tmp_path: Path) -> None:
    four = {**env, "SCORE_PARTITIONS": "4"}
    svc = start_service(four, tmp_path / "serve.log")  # a new deployment: records 4
    try:
        assert recorded(r, pg) == (Layout(4), Layout(4))
    finally:
        stop_process(svc.process)


def test_the_first_start_wins_when_two_counts_start_at_once(
    servers: Servers, r: redis.Redis, pg: psycopg.Connection
) -> None:
    for _ in range(10):
        pg.execute("TRUNCATE score_layout")
        r.delete(KEY)
        counts = [1, 2, 3, 4]
        barrier = threading.Barrier(len(counts))
        outcome: dict[int, str] = {}

        def start(count: int) -> None:
            settings = Settings.from_env(make_env(servers, SCORE_PARTITIONS=str(count)))
            barrier.wait(10)
            try:
                layout.ensure(settings)
                outcome[count] = "started"
            except LayoutMismatch as exc:
                outcome[count] = str(exc)

        threads = [threading.Thread(target=start, args=(c,)) for c in counts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        winners = [c for c, o in outcome.items() if o == "started"]
        assert len(outcome) == 4 and len(winners) == 1, outcome
        (winner,) = winners
        assert recorded(r, pg) == (Layout(winner), Layout(winner))
        for count, why in outcome.items():
            if count != winner:
                assert f"SCORE_PARTITIONS is {count}" in why and f"{winner} partition" in why


def test_redis_and_postgres_disagreeing_is_refused(settings, r, pg) -> None:
    layout.ensure(settings)
    r.set(KEY, encode(Layout(2)))  # a Redis that is not this deployment's, or half a change
    with pytest.raises(LayoutMismatch, match=r"Redis \(2 partition.*Postgres's \(1 partition"):
        layout.ensure(settings)


def test_a_wiped_redis_gets_the_layout_back_from_postgres(servers, r, pg, add_users) -> None:
    one = Settings.from_env(make_env(servers))
    layout.ensure(one)
    add_users("alice")
    r.flushall()
    three = Settings.from_env(make_env(servers, SCORE_PARTITIONS="3"))
    with TestClient(create_app(three, **hooks(three))) as c:
        # the service's rebuild hook finds Postgres's record first: no rebuild with 3
        wait_for(lambda: r.get(KEY) is not None, 10, "the layout restored in Redis")
        assert layout.read_redis(r) == Layout(1)
        resp = c.get("/api/v1/users/alice")
        assert resp.status_code == 503 and "SCORE_PARTITIONS is 3" in resp.json()["detail"]
        assert not r.exists(*KeySchema(3).ready_markers)
    with TestClient(create_app(one, **hooks(one))) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 20, "the rebuild with 1")
        assert c.get("/api/v1/users/alice").json()["score"] == 0


# ---- changing it ------------------------------------------------------------------------


class Players:
    """Players scoring through one service, with a client-side ledger of every acknowledged
    increment (half of them with an Idempotency-Key)."""

    def __init__(self, settings: Settings, user_ids: list[str]) -> None:
        self.user_ids = user_ids
        self.tokens = {u: mint(settings, u) for u in user_ids}
        self.ledger: dict[str, int] = defaultdict(int)
        self.first: dict[str, tuple[str, dict[str, object]]] = {}
        self.statuses: dict[int, int] = defaultdict(int)

    def post(self, base: str, user: str, delta: int, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        resp = httpx.post(
            base + "/api/v1/score",
            json={"user_id": user, "score_increase": delta},
            headers=headers,
            timeout=10,
        )
        self.statuses[resp.status_code] += 1
        if resp.status_code == 200 and resp.headers.get("idempotent-replayed") != "true":
            self.ledger[user] += delta
            if key is not None:
                self.first[key] = (user, resp.json())
        return resp

    def round(self, base: str, seed: int) -> None:
        for i, user in enumerate(self.user_ids):
            key = f"k-{seed}-{i}" if i % 2 else None
            assert self.post(base, user, 1 + (i * 7 + seed) % 50, key).status_code == 200

    def expected_rank(self, user: str) -> int:
        return 1 + sum(1 for u in self.user_ids if self.ledger[u] > self.ledger[user])


def assert_exact(
    players: Players, base: str, env: dict[str, str], r: redis.Redis, pg: psycopg.Connection
) -> None:
    """Postgres, Redis (in the partitions of `env`) and the service all equal the client's
    ledger, ranks included."""
    expected = {u: players.ledger[u] for u in players.user_ids}
    assert pg_scores(pg, players.user_ids) == expected
    assert redis_totals(Settings.from_env(env), r, players.user_ids) == expected
    for user in players.user_ids:
        resp = httpx.get(f"{base}/api/v1/users/{user}", timeout=10)
        assert resp.status_code == 200, resp.text  # found: no 404
        assert resp.json() == {
            "user_id": user,
            "score": expected[user],
            "rank": players.expected_rank(user),
        }


def assert_refuses_old_count(base: str, players: Players, old: int, new: int) -> None:
    """A service still running with `old` partitions answers 503 and says why."""
    user = players.user_ids[0]

    def says_why() -> bool:
        resp = players.post(base, user, 1)
        return resp.status_code == 503 and f"SCORE_PARTITIONS is {old}" in resp.text

    wait_for(says_why, 10, "the old service to see the new layout")
    detail = httpx.get(f"{base}/api/v1/users/{user}", timeout=10).json()["detail"]
    assert f"{new} partition(s)" in detail and f"SCORE_PARTITIONS={new}" in detail


def test_partitions_set_moves_every_unpersisted_increment(
    servers: Servers, r: redis.Redis, pg: psycopg.Connection, tmp_path: Path
) -> None:
    env1, env3 = make_env(servers), make_env(servers, SCORE_PARTITIONS="3")
    players = Players(Settings.from_env(env1), users(24))
    assert cli(env1, "users", "add", *players.user_ids).returncode == 0
    old = start_service(env1, tmp_path / "serve1.log")
    try:
        players.round(old.base, 1)  # no worker runs: every increment waits in Redis
        players.round(old.base, 2)
        assert unpersisted(Settings.from_env(env1), r) == 48

        # traffic keeps coming while the layout changes: acknowledged or refused, never lost
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                players.post(old.base, players.user_ids[5], 3)

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            out = cli(env1, "partitions", "set", "3")
        finally:
            stop.set()
            sender.join(30)
        assert out.returncode == 0, out.stderr
        assert "partitions: 1 -> 3" in out.stdout
        assert players.statuses.keys() <= {200, 503}, players.statuses  # no 404, no 500
        assert recorded(r, pg) == (Layout(3), Layout(3))
        assert_refuses_old_count(old.base, players, 1, 3)
    finally:
        stop_process(old.process)

    new = start_service(env3, tmp_path / "serve3.log")
    try:
        assert_exact(players, new.base, env3, r, pg)
        # a retry of a request made before the change is a replay: nothing added
        user, first = players.first["k-1-1"]
        retry = players.post(new.base, user, 1 + (1 * 7 + 1) % 50, "k-1-1")
        assert retry.headers["idempotent-replayed"] == "true"
        assert retry.json()["new_score"] == first["new_score"]
        players.round(new.base, 3)  # waits in the three streams
        assert unpersisted(Settings.from_env(env3), r) == 24

        out = cli(env3, "partitions", "set", "1")
        assert out.returncode == 0, out.stderr
        assert recorded(r, pg) == (Layout(1), Layout(1))
        assert_refuses_old_count(new.base, players, 3, 1)
    finally:
        stop_process(new.process)

    back = start_service(env1, tmp_path / "serve1b.log")
    try:
        assert_exact(players, back.base, env1, r, pg)
        assert not any(r.exists(k.events, k.leaderboard, k.top) for k in KeySchema(3).all()[1:])
        top = httpx.get(back.base + "/api/v1/leaderboard", timeout=10).json()["top"]
        best = max(players.user_ids, key=lambda u: (players.ledger[u], ""))
        assert top[0]["score"] == players.ledger[best]
        report = cli(env1, "reconcile")
        assert report.returncode == 0, report.stdout + report.stderr
    finally:
        stop_process(back.process)


def test_a_worker_with_the_old_count_stops_after_the_change(
    env: dict[str, str], r: redis.Redis, pg: psycopg.Connection, tmp_path: Path
) -> None:
    assert cli(env, "users", "add", "alice").returncode == 0
    log = tmp_path / "worker.log"
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "persister worker:" in log.read_text(), 30, "the worker to start")
        assert cli(env, "partitions", "set", "2").returncode == 0
        assert worker.wait(30) == 2
        assert "stopping: SCORE_PARTITIONS is 1 but this deployment has 2" in log.read_text()
    finally:
        stop_process(worker)


def start_unready(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`score-service serve`, once it answers /readyz (503 expected)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(base + "/readyz", timeout=1).status_code == 503
        except httpx.TransportError:
            return False

    wait_for(answers, 30, "serve to answer")
    return process, base


def test_an_interrupted_change_refuses_everything_until_it_is_resumed(
    env: dict[str, str], r: redis.Redis, pg: psycopg.Connection, tmp_path: Path
) -> None:
    assert cli(env, "users", "add", "alice", "bob").returncode == 0
    two = {**env, "SCORE_PARTITIONS": "2"}
    svc = start_service(env, tmp_path / "serve.log")
    early = None
    try:
        halfway = Layout(2, changing_from=1)  # as a `partitions set 2` killed after step 1
        layout.write_postgres(pg, halfway, replace=True)
        layout.write_redis(r, halfway, replace=True)
        wait_for(
            lambda: httpx.get(svc.base + "/api/v1/users/alice").status_code == 503,
            10,
            "the service to refuse",
        )
        refused(cli(env, "users", "add", "carol"), "being changed to 2", "partitions set 2")
        refused(cli(two, "rebuild"), "being changed to 2")
        admin = {"Authorization": f"Bearer {mint(Settings.from_env(env), 'ops', admin=True)}"}
        resp = httpx.post(
            svc.base + "/api/v1/admin/users", json={"user_ids": ["carol"]}, headers=admin
        )
        assert resp.status_code == 503 and "being changed to 2" in resp.text
        assert layout.read_postgres(pg) == halfway and not pg_scores(pg, ["carol"])
        # a service started early with the new count waits for the change, refusing writes
        early, early_base = start_unready(two, tmp_path / "early.log")
        assert "being changed to 2" in httpx.get(early_base + "/readyz").text
        shown = cli(env, "partitions")
        assert "being changed to 2" in shown.stdout and "{p1}" in shown.stdout
        refused(cli(env, "partitions", "set", "3"), "change to 2 partition(s) is under way")

        out = cli(env, "partitions", "set", "2")  # resumes
        assert out.returncode == 0, out.stderr
        assert recorded(r, pg) == (Layout(2), Layout(2))
        wait_for(lambda: httpx.get(early_base + "/readyz").status_code == 200, 10, "ready")
        assert httpx.get(early_base + "/api/v1/users/bob").json()["score"] == 0
    finally:
        stop_process(svc.process)
        if early is not None:
            stop_process(early)


def test_partitions_shows_the_layout_and_each_backlog(env, r, pg) -> None:
    assert cli(env, "users", "add", "alice").returncode == 0
    out = cli(env, "partitions", "set", "2")
    assert out.returncode == 0, out.stderr
    out = cli({**env, "SCORE_PARTITIONS": "2"}, "partitions")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "partitions: 2 partition(s); recorded in Postgres and Redis"
    tags = [k.tag for k in KeySchema(2).all()]
    assert tags[0] in lines[2] and tags[1] in lines[3] and len(lines) == 4
    assert str(KeySchema(2).all()[0].slot) in lines[2]
    assert SECRET not in out.stdout


def test_keys_of_the_scheme_before_are_refused_then_moved_by_partitions_set(
    env: dict[str, str], r: redis.Redis, pg: psycopg.Connection
) -> None:
    # two partitions written by a version before key scheme 2 (tags {p0}, {p1}), with
    # increments still waiting in their streams
    two = {**env, "SCORE_PARTITIONS": "2"}
    settings = Settings.from_env(two)
    ids = users(6)
    assert cli(two, "users", "add", *ids).returncode == 0
    r.flushall()
    old = KeySchema(2, scheme=1)
    for user_id in ids:
        r.zadd(old.for_user(user_id).leaderboard, {user_id: 0})
    r.set(old.all()[0].ready, "1")
    r.set(old.all()[1].ready, "1")
    before = Layout(2, version=1)
    layout.write_postgres(pg, before, replace=True)
    layout.write_redis(r, before, replace=True)
    scripts = SyncScripts(r)
    for i, user_id in enumerate(ids):
        call = prepare_submit(settings, old, user_id, i + 1, operator=True)
        assert scripts.run(call).status == Status.OK
    refused(cli(two, "rebuild"), "key scheme version 1", "partitions set 2")

    out = cli(two, "partitions", "set", "2")
    assert out.returncode == 0, out.stderr
    assert recorded(r, pg) == (Layout(2), Layout(2))
    expected = {user_id: i + 1 for i, user_id in enumerate(ids)}
    assert pg_scores(pg, ids) == expected
    assert redis_totals(settings, r, ids) == expected  # under the new tags
    gone = [k for k in old.all() if k.tag not in {n.tag for n in KeySchema(2).all()}]
    assert [k.tag for k in gone] == ["{p0}"]  # {p1} is a tag of both schemes
    assert not r.exists(gone[0].leaderboard, gone[0].events, gone[0].ready)


def test_a_process_that_missed_the_change_cannot_write_astray(
    servers: Servers, r: redis.Redis, pg: psycopg.Connection, add_users
) -> None:
    one = Settings.from_env(make_env(servers))
    three = Settings.from_env(make_env(servers, SCORE_PARTITIONS="3"))
    user_ids = add_users(count=30)
    layout.ensure(one)
    for user in user_ids:
        assert submit(one, r, user, 5).status is Status.OK  # waits in the one stream

    assert change(one, 3, say=lambda line: None) is not None

    # A process stalled through the change, still on one partition, makes the Lua call itself
    # (no readiness check): the keys of its layout are fenced off and dropped (three partitions
    # have tags of their own), so it reaches nobody.
    expected = dict.fromkeys(user_ids, 5)
    for user in user_ids:
        status = submit(one, r, user, 7).status
        assert status in (Status.NOT_READY, Status.UNKNOWN_USER), user
    persister = Persister(three)
    try:
        for partition in range(3):
            persister.drain(partition)
    finally:
        persister.close()
    assert pg_scores(pg, user_ids) == expected
    assert redis_totals(three, r, user_ids) == expected
