"""Moving a deployment from one Redis server to a Redis Cluster, the way the README's
"Moving between topologies" says, while clients keep their Idempotency-Keys: nothing
acknowledged is lost or counted twice, and a request retried across the move is a replay."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from persist_support import cli, pg_scores
from support import Servers, empty_postgres, make_env, start_service, start_worker, stop_process

from service.auth import mint
from service.dev.servers import RedisServer, wait_for
from service.dev.topologies import LocalCluster
from service.settings import Settings

USERS = [f"m-{i}" for i in range(12)]


class Client:
    """Keyed increments, and a ledger of the acknowledged ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ledger = dict.fromkeys(USERS, 0)
        self.sent: list[tuple[str, str, int]] = []

    def post(self, base: str, user: str, delta: int, key: str | None = None) -> httpx.Response:
        key = key or uuid.uuid4().hex
        resp = httpx.post(
            base + "/api/v1/score",
            json={"user_id": user, "score_increase": delta},
            headers={
                "Authorization": f"Bearer {mint(self.settings, user)}",
                "Idempotency-Key": key,
            },
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        if resp.headers.get("Idempotent-Replayed") != "true":
            self.ledger[user] += delta
            self.sent.append((user, key, delta))
        return resp

    def play(self, base: str, rounds: int) -> None:
        for i in range(rounds):
            self.post(base, USERS[i % len(USERS)], 1 + i % 5)


def backlog(env: dict[str, str]) -> int:
    """Events waiting or pending, over every partition, as `score-service partitions` says."""
    out = cli(env, "partitions")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()[2:]
    return sum(int(row.split()[3]) + int(row.split()[4]) for row in rows)


def test_one_server_to_a_cluster_loses_and_doubles_nothing(
    servers: Servers,
    queue_server: RedisServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    with servers.redis.client() as c:
        c.flushall()
    empty_postgres(servers)
    cluster = LocalCluster(tmp_path / "cluster", replicas=0)
    request.addfinalizer(cluster.stop)
    cluster.start()
    before = make_env(servers, REDIS_URL=servers.redis.url)
    assert cli(before, "users", "add", *USERS).returncode == 0
    client = Client(Settings.from_env(before))
    svc = start_service(before, tmp_path / "serve-1.log")
    worker = start_worker(before, tmp_path / "worker-1.log")
    processes = [svc.process, worker]
    try:
        client.play(svc.base, 60)
        # 1. stop every service; 2. let the worker drain, then stop it
        stop_process(svc.process)
        wait_for(lambda: backlog(before) == 0, 30, "the worker to drain every partition")
        stop_process(worker)

        # 3. the same processes on the cluster: the first service rebuilds it from Postgres
        after = make_env(servers, REDIS_URL=cluster.url, SCORE_QUEUE_URL=queue_server.url)
        svc = start_service(after, tmp_path / "serve-2.log")
        worker = start_worker(after, tmp_path / "worker-2.log")
        processes += [svc.process, worker]
        user, key, delta = client.sent[0]
        replay = client.post(svc.base, user, delta, key)
        assert replay.headers.get("Idempotent-Replayed") == "true"
        client.play(svc.base, 60)

        # 4. spread over the primaries: `partitions set 3`, then restart with 3
        spread = after | {"SCORE_PARTITIONS": "3"}
        out = cli(spread, "partitions", "set", "3")
        assert out.returncode == 0, out.stdout + out.stderr
        stop_process(svc.process)
        stop_process(worker)
        svc = start_service(spread, tmp_path / "serve-3.log")
        worker = start_worker(spread, tmp_path / "worker-3.log")
        processes += [svc.process, worker]
        user, key, delta = client.sent[-1]
        replay = client.post(svc.base, user, delta, key)
        assert replay.headers.get("Idempotent-Replayed") == "true"
        client.play(svc.base, 60)
        partitions = cli(spread, "partitions").stdout
        assert len({row.split()[-1] for row in partitions.splitlines()[2:]}) == 3, partitions

        def persisted() -> bool:
            with psycopg.connect(servers.postgres.url) as conn:
                return pg_scores(conn, USERS) == client.ledger

        wait_for(persisted, 30, "Postgres to equal the ledger")
        out = cli(spread, "reconcile")
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        for process in processes:
            stop_process(process)
