"""service/redis_errors.py: a Redis that answers but cannot serve (busy with a long script, a
replica after a failover, a replica that lost its master) is a 503 with Retry-After for the
API, never a 500. Each test runs the app on a throwaway Redis it puts in that state."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import redis.exceptions
from starlette.testclient import TestClient
from support import Servers, assert_problem, make_env

from service.app import create_app
from service.auth import mint
from service.dev.servers import RedisServer, free_port, wait_for
from service.errors import ApiError
from service.keys import KeySchema
from service.redis_errors import redis_unavailable
from service.settings import Settings
from service.users import provision_sync

BUSY_LOOP = "while true do end"  # read-only: SCRIPT KILL ends it


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", extra=["--lua-time-limit", "50"]).start()
    yield server
    server.stop()


@pytest.fixture
def app(own_redis: RedisServer, servers: Servers) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The app on `own_redis`, ready, with user alice; the client and alice's headers."""
    settings = Settings.from_env(make_env(servers, REDIS_URL=own_redis.url))
    with redis.Redis.from_url(own_redis.url) as direct, psycopg.connect(servers.postgres.url) as pg:
        provision_sync(pg, direct, KeySchema(settings.partitions), settings.top_n, ["alice"])
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "the app")
        yield client, {"Authorization": f"Bearer {mint(settings, 'alice')}"}


def _assert_every_route_is_503(client: TestClient, auth: dict[str, str], *words: str) -> None:
    score = client.post(
        "/api/v1/score", json={"user_id": "alice", "score_increase": 5}, headers=auth
    )
    reads = [client.get("/api/v1/leaderboard"), client.get("/api/v1/users/alice")]
    for resp in [score, *reads]:
        assert_problem(resp, 503, *words)
        assert resp.headers["Retry-After"] == "1"


def test_a_long_script_is_503_not_500(
    own_redis: RedisServer, app: tuple[TestClient, dict[str, str]]
) -> None:
    client, auth = app
    direct = redis.Redis.from_url(own_redis.url)
    other = redis.Redis.from_url(own_redis.url)
    busy = threading.Thread(target=_run_until_killed, args=(direct,))
    busy.start()
    try:
        wait_for(lambda: _answers_busy(other), 10, "Redis busy with a script")
        _assert_every_route_is_503(client, auth, "busy")
    finally:
        wait_for(lambda: _kill_script(other), 10, "SCRIPT KILL")
        busy.join(10)
        direct.close()
        other.close()
    resp = client.post(
        "/api/v1/score", json={"user_id": "alice", "score_increase": 5}, headers=auth
    )
    assert resp.json()["new_score"] == 5


def _run_until_killed(client: redis.Redis) -> None:
    try:
        client.eval(BUSY_LOOP, 0)
    except redis.exceptions.ResponseError as exc:
        assert "killed" in str(exc), exc


def _answers_busy(client: redis.Redis) -> bool:
    try:
        client.ping()
    except redis.exceptions.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


def _kill_script(client: redis.Redis) -> bool:
    try:
        client.script_kill()
    except redis.exceptions.ResponseError as exc:
        return "NOTBUSY" in str(exc)
    return True


@pytest.mark.parametrize(
    ("stale_data", "words"), [("yes", "read-only replica"), ("no", "lost its master")]
)
def test_a_redis_demoted_to_a_replica_is_503_not_500(
    own_redis: RedisServer,
    app: tuple[TestClient, dict[str, str]],
    stale_data: str,
    words: str,
) -> None:
    client, auth = app
    with redis.Redis.from_url(own_redis.url) as direct:
        direct.config_set("replica-serve-stale-data", stale_data)
        direct.replicaof("127.0.0.1", free_port())  # a master that never answers
        try:
            _assert_every_route_is_503_for_writes(client, auth, words, reads_too=stale_data == "no")
        finally:
            direct.replicaof("NO", "ONE")
    resp = client.post(
        "/api/v1/score", json={"user_id": "alice", "score_increase": 5}, headers=auth
    )
    assert resp.json()["new_score"] == 5


def _assert_every_route_is_503_for_writes(
    client: TestClient, auth: dict[str, str], words: str, *, reads_too: bool
) -> None:
    if reads_too:
        _assert_every_route_is_503(client, auth, words)
        return
    resp = client.post(
        "/api/v1/score", json={"user_id": "alice", "score_increase": 5}, headers=auth
    )
    assert_problem(resp, 503, words)
    assert resp.headers["Retry-After"] == "1"
    assert client.get("/api/v1/users/alice").json()["score"] == 0  # a replica still reads


async def test_a_slot_no_cluster_node_covers_is_503_not_500() -> None:
    """redis-py says so with RedisClusterException, which is no RedisError."""
    with pytest.raises(ApiError) as caught:
        async with redis_unavailable():
            raise redis.exceptions.SlotNotCoveredError('Slot "7" is not covered by the cluster.')
    assert caught.value.status == 503
    assert "cluster that is down" in caught.value.detail
    assert caught.value.headers["Retry-After"] == "1"
