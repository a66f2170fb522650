"""A real Redis Cluster changing under load: a partition's slot resharded to another primary
while players post. Every call is answered 200 (or 503, retried with its Idempotency-Key), and
the totals add up exactly, in Postgres and in Redis. And a cluster that is down when the
service and the worker start: both wait for it, answering 503 meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from persist_support import cli
from players import Players
from support import (
    Servers,
    empty_postgres,
    make_env,
    start_service,
    start_worker,
    stop_process,
    users_in_every_partition,
)

from service.auth import mint
from service.dev.servers import RedisServer, wait_for
from service.dev.topologies import LocalCluster
from service.keys import KeySchema
from service.settings import Settings

PARTITIONS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    started = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield started
    started.stop()


def test_a_partition_resharded_under_load_loses_and_doubles_nothing(
    cluster: LocalCluster, queue_server: RedisServer, servers: Servers, tmp_path: Path
) -> None:
    for node in cluster.nodes:
        with redis.Redis(port=node.port) as c:
            if c.info("replication")["role"] == "master":
                c.flushall()
    empty_postgres(servers)
    env = make_env(
        servers,
        REDIS_URL=cluster.url,
        SCORE_QUEUE_URL=queue_server.url,
        SCORE_PARTITIONS=str(PARTITIONS),
    )
    settings = Settings.from_env(env)
    users = users_in_every_partition(PARTITIONS, 10)
    assert cli(env, "users", "add", *users).returncode == 0
    svc = start_service(env, tmp_path / "serve.log")
    worker = start_worker(env, tmp_path / "worker.log")
    moving = KeySchema(PARTITIONS).partition(0)
    try:
        with Players(svc.base, settings, users) as players:
            wait_for(lambda: players.acknowledged() > 200, 30, "traffic")
            source = cluster.owner(moving.slot)
            target = cluster.owner(KeySchema(PARTITIONS).partition(1).slot)
            assert source is not target
            moved = cluster.move_slot(moving.slot, target)
            assert moved >= 3  # the partition's leaderboard, streams, records...
            assert cluster.owner(moving.slot) is target
            before = players.acknowledged()
            wait_for(lambda: players.acknowledged() > before + 200, 30, "traffic after")
        assert set(players.statuses) <= {200, 503}, players.statuses

        def drained() -> bool:
            with psycopg.connect(servers.postgres.url) as conn:
                rows = conn.execute("SELECT user_id, score FROM users").fetchall()
            return {str(u): int(str(s)) for u, s in rows} == {u: players.ledger[u] for u in users}

        wait_for(drained, 60, "Postgres to equal the ledger")
        out = cli(env, "reconcile")
        assert out.returncode == 0, out.stdout + out.stderr
        body = httpx.get(f"{svc.base}/api/v1/users/{users[0]}").json()
        assert body["score"] == players.ledger[users[0]]
        metrics = httpx.get(svc.base + "/metrics").text
        redirected = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("score_redis_redirects_total{")
        ]
        assert sum(redirected) >= 1, "the move was never seen"  # then the test proves nothing
    finally:
        stop_process(svc.process)
        stop_process(worker)


def test_a_cluster_down_at_start_is_waited_for_by_the_service_and_the_worker(
    queue_server: RedisServer, servers: Servers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    down = LocalCluster(tmp_path / "down", replicas=0)
    request.addfinalizer(down.stop)
    down.start()
    empty_postgres(servers)
    env = make_env(servers, REDIS_URL=down.url, SCORE_QUEUE_URL=queue_server.url)
    settings = Settings.from_env(env)
    assert cli(env, "users", "add", "alice").returncode == 0
    for node in down.nodes:
        node.stop()
    svc = start_service(env, tmp_path / "serve.log", until="/healthz")
    worker = start_worker(env, tmp_path / "worker.log")
    headers = {"Authorization": f"Bearer {mint(settings, 'alice')}"}
    body = {"user_id": "alice", "score_increase": 5}
    try:
        with httpx.Client(base_url=svc.base, timeout=10) as http:
            # redis-py says "no node answered" with an exception that is no RedisError
            resp = http.post("/api/v1/score", json=body, headers=headers)
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"]
            assert http.get("/readyz").status_code == 503
            wait_for(lambda: "waiting for Redis" in (tmp_path / "worker.log").read_text(), 30,
                     "the worker to say it waits")  # fmt: skip
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            for node in down.nodes:
                node.start()
            wait_for(lambda: http.get("/readyz").status_code == 200, 30, "/readyz")
            resp = http.post("/api/v1/score", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            assert resp.json()["new_score"] == 5

        def persisted() -> bool:
            with psycopg.connect(servers.postgres.url) as conn:
                row = conn.execute("SELECT score FROM users WHERE user_id = 'alice'").fetchone()
            return row is not None and int(str(row[0])) == 5

        wait_for(persisted, 30, "the worker to persist the increment")
    finally:
        stop_process(svc.process)
        stop_process(worker)
