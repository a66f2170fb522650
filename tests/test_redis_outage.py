"""Redis goes away under a running `score-service serve`: the API fails closed with 503 and
Retry-After (never hangs), and recovers by itself when Redis returns, losing nothing.

Each test runs its own throwaway Redis, stopped and restarted (same port, same AOF) while the
service keeps running."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from support import Servers, assert_problem, make_env, start_service, stop_process

from service.auth import mint
from service.dev.servers import RedisServer, wait_for
from service.keys import KeySchema
from service.settings import Settings
from service.users import provision_sync

CLIENT_TIMEOUT_S = 5  # a request that hangs fails the test instead of stalling it


@dataclass
class Outage:
    redis: RedisServer
    http: httpx.Client
    post: Callable[..., httpx.Response]

    def ready(self) -> bool:
        return self.http.get("/readyz").status_code == 200


@pytest.fixture
def outage(servers: Servers, pg: psycopg.Connection, tmp_path: Path) -> Iterator[Outage]:
    """A service on its own Redis, with user alice provisioned."""
    rs = RedisServer(tmp_path / "redis").start()
    try:
        env = make_env(servers, REDIS_URL=rs.url)
        settings = Settings.from_env(env)
        with redis.Redis.from_url(rs.url) as client:
            provision_sync(pg, client, KeySchema(1), settings.top_n, ["alice"])
        svc = start_service(env, tmp_path / "serve.log")
        try:
            auth = {"Authorization": f"Bearer {mint(settings, 'alice')}"}
            with httpx.Client(base_url=svc.base, timeout=CLIENT_TIMEOUT_S) as http:

                def post(delta: int, **headers: str) -> httpx.Response:
                    body = {"user_id": "alice", "score_increase": delta}
                    return http.post("/api/v1/score", json=body, headers={**auth, **headers})

                yield Outage(rs, http, post)
        finally:
            stop_process(svc.process)
    finally:
        if rs.process is not None:
            os.kill(rs.process.pid, signal.SIGCONT)  # in case a test left it stopped
        rs.stop()


def test_redis_down_is_503_then_recovers_without_a_restart(outage: Outage) -> None:
    assert outage.post(5).json()["new_score"] == 5
    outage.redis.stop()

    resp = outage.post(7)
    assert_problem(resp, 503, "unavailable")
    assert resp.headers["Retry-After"] == "1"
    for path in ["/api/v1/leaderboard", "/api/v1/users/alice"]:
        resp = outage.http.get(path)
        assert_problem(resp, 503)
        assert resp.headers["Retry-After"] == "1"
    ready = outage.http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["redis"].startswith("down")
    assert outage.http.get("/healthz").status_code == 200
    # client mistakes are still told apart from the outage
    assert_problem(outage.http.post("/api/v1/score", json={}), 401)
    assert_problem(outage.post(0), 400)

    outage.redis.start()  # same port, same data directory: the AOF brings the scores back
    wait_for(outage.ready, 20, "readiness after Redis returns")
    assert outage.post(7).json()["new_score"] == 12
    resp = outage.http.get("/api/v1/users/alice")
    assert resp.status_code == 200, resp.text
    assert resp.json()["score"] == 12


def test_a_hung_redis_is_503_not_a_hang_and_a_retry_counts_once(outage: Outage) -> None:
    assert outage.post(5).json()["new_score"] == 5
    assert outage.redis.process is not None
    os.kill(outage.redis.process.pid, signal.SIGSTOP)
    try:
        resp = outage.post(7, **{"Idempotency-Key": "retry-1"})
        assert_problem(resp, 503)
        assert resp.headers["Retry-After"] == "1"
    finally:
        os.kill(outage.redis.process.pid, signal.SIGCONT)
    wait_for(outage.ready, 20, "readiness after Redis resumes")
    # The first attempt may or may not have been applied when Redis woke up; retried with
    # the same Idempotency-Key, it counts exactly once either way.
    resp = outage.post(7, **{"Idempotency-Key": "retry-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["new_score"] == 12
    resp = outage.http.get("/api/v1/users/alice")
    assert resp.status_code == 200, resp.text
    assert resp.json()["score"] == 12
