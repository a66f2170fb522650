"""SCORE_REDIS_MIN_REPLICAS: an increment is acknowledged only once that many replicas have
it (WAIT, once per pipelined batch). A replica that does not confirm in time makes it a 503,
and the retry with the same Idempotency-Key counts it once. Real primary and replica."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from persist_support import cli
from starlette.testclient import TestClient
from support import Servers, assert_problem, make_env

from persister.wiring import hooks
from service.app import create_app
from service.auth import mint
from service.dev.servers import RedisServer, wait_for
from service.settings import Settings


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(
        tmp_path / "replica", extra=["--replicaof", "127.0.0.1", str(primary.port)]
    ).start()
    with redis.Redis(port=replica.port, decode_responses=True) as c:
        wait_for(lambda: c.info("replication")["master_link_status"] == "up", 20, "the replica")
    yield primary, replica
    replica.stop()
    primary.stop()


def test_an_increment_no_replica_confirms_is_a_503_and_its_retry_counts_once(
    pair: tuple[RedisServer, RedisServer], servers: Servers, pg: object
) -> None:
    primary, replica = pair
    env = make_env(
        servers, REDIS_URL=primary.url, SCORE_REDIS_MIN_REPLICAS="1", SCORE_REDIS_WAIT_MS="200"
    )
    settings = Settings.from_env(env)
    assert cli(env, "users", "add", "alice").returncode == 0
    headers = {"Authorization": f"Bearer {mint(settings, 'alice')}", "Idempotency-Key": "k-1"}
    body = {"user_id": "alice", "score_increase": 5}
    with TestClient(create_app(settings, **hooks(settings))) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 20, "ready")
        ok = client.post("/api/v1/score", json=body, headers={**headers, "Idempotency-Key": "k-0"})
        assert ok.status_code == 200 and ok.json()["new_score"] == 5  # the replica confirmed

        assert replica.process is not None
        replica.process.send_signal(signal.SIGSTOP)  # it stops confirming
        try:
            refused = client.post("/api/v1/score", json=body, headers=headers)
            assert_problem(refused, 503, "not confirmed by 0 of 1 replica", "Idempotency-Key")
            assert refused.headers["Retry-After"] == "1"
        finally:
            replica.process.send_signal(signal.SIGCONT)

        retried = client.post("/api/v1/score", json=body, headers=headers)
        assert retried.status_code == 200, retried.text
        assert retried.json()["new_score"] == 10  # the first attempt's, counted once
        assert retried.headers["idempotent-replayed"] == "true"
        with redis.Redis(port=replica.port) as c:
            wait_for(lambda: c.zscore("score:{p0}:leaderboard", "alice") == -10, 10, "sync")
