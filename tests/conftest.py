"""Fixtures: throwaway redis-server and postgres for the whole session, clean stores per test.

Servers run on ports the OS picks, in a temp dir, and are stopped at the end; nothing here
touches a server already running on the machine.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from starlette.testclient import TestClient
from support import Servers, Service, make_env, start_service, stop_process

from persister.schema import migrate
from service.app import create_app
from service.auth import mint
from service.dev.servers import PostgresServer, RedisServer, wait_for
from service.keys import KeySchema
from service.settings import Settings
from service.users import provision_sync


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    directory = Path(tempfile.mkdtemp(prefix="score-tests-"))
    redis_server = RedisServer(directory / "redis").start()
    pg = PostgresServer(directory / "postgres", fsync=False).start()
    with psycopg.connect(pg.url) as conn:
        migrate(conn)
    try:
        yield Servers(redis_server, pg, directory)
    finally:
        pg.stop()
        redis_server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def env(servers: Servers) -> dict[str, str]:
    return make_env(servers)


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def r(servers: Servers, settings: Settings) -> Iterator[redis.Redis]:
    """A clean Redis (FLUSHALL) and Postgres (TRUNCATE) for this test; a client to Redis.
    Redis is ready (every partition's marker set), as after a new deployment's first rebuild."""
    client = redis.Redis.from_url(servers.redis.url)
    client.flushall()
    client.mset(dict.fromkeys(KeySchema(settings.partitions).ready_markers, "1"))
    with psycopg.connect(servers.postgres.url, autocommit=True) as conn:
        conn.execute("TRUNCATE users, score_events, score_events_pruned, score_layout")
    yield client
    client.close()


@pytest.fixture
def pg(servers: Servers, r: redis.Redis) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(servers.postgres.url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def snapshot(
    r: redis.Redis, pg: psycopg.Connection[tuple[object, ...]]
) -> Callable[[], tuple[object, ...]]:
    """Take the state of both stores (every Redis key's DUMP, every Postgres row): equal
    snapshots around a refused request prove that it changed nothing. Keys about to expire
    by themselves (a fast rate limit's state lives a millisecond) are left out."""

    def take() -> tuple[object, ...]:
        keys: dict[bytes, object] = {}
        for key in sorted(r.scan_iter(count=1000)):
            ttl = r.pttl(key)  # -1: no expiry, -2: already gone
            if ttl == -1 or ttl >= 1000:
                keys[key] = r.dump(key)
        users = pg.execute("SELECT * FROM users ORDER BY user_id").fetchall()
        events = pg.execute("SELECT * FROM score_events ORDER BY event_id").fetchall()
        return keys, users, events

    return take


@pytest.fixture
def add_users(settings: Settings, r: redis.Redis, servers: Servers) -> Callable[..., list[str]]:
    """Provision users (random ids unless given); returns their ids."""

    def add(*ids: str, count: int = 0) -> list[str]:
        user_ids = list(ids) + [f"u-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        with psycopg.connect(servers.postgres.url) as conn:
            provision_sync(conn, r, KeySchema(settings.partitions), settings.top_n, user_ids)
        return user_ids

    return add


@pytest.fixture
def token(settings: Settings) -> Callable[..., str]:
    def make(user_id: str, **kwargs: object) -> str:
        return mint(settings, user_id, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def client(settings: Settings, r: redis.Redis) -> Iterator[TestClient]:
    """The app in-process (its lifespan runs), on the test's clean stores."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        yield c


@pytest.fixture
def service(env: dict[str, str], r: redis.Redis, tmp_path: Path) -> Iterator[Service]:
    svc = start_service(env, tmp_path / "serve.log")
    yield svc
    stop_process(svc.process)


@pytest.fixture(scope="session")
def queue_server(servers: Servers) -> Iterator[RedisServer]:
    """A Redis server for a cluster deployment's job queue (RQ cannot use a cluster)."""
    server = RedisServer(servers.directory / "queue").start()
    yield server
    server.stop()
