"""`score-service worker` rides out an outage of Redis or Postgres of any length: it is never
restarted, and once the store is back, the increments accepted before, during and after the
outage reach Postgres by themselves.

The worker runs as a real process. Redis is taken away behind tests/fault_proxy.py (down:
connections reset and refused; partitioned: connections hang) for longer than RQ's own
connection timeouts and retries; Postgres is stopped. Increments keep being accepted by the
real Redis meanwhile (through the Lua hot path, as the service does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
import support
from fault_proxy import FaultProxy, Mode
from persist_support import pg_scores, submit
from support import Servers, make_env

from persister.schema import migrate
from service.dev.servers import PostgresServer, RedisServer, wait_for
from service.keys import PERSISTER_GROUP, KeySchema
from service.settings import Settings
from service.users import provision_sync

CATCH_UP_S = 60.0


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker(env: dict[str, str], log: Path) -> Worker:
    return Worker(support.start_worker(env, log), log)


def stop_worker(worker: Worker) -> None:
    if worker.alive():
        os.killpg(worker.process.pid, signal.SIGTERM)
        try:
            worker.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait(10)


@dataclass
class Setup:
    redis: redis.Redis
    settings: Settings
    postgres_url: str
    user: str
    worker: Worker

    def score_in_postgres(self) -> int | None:
        with psycopg.connect(self.postgres_url, connect_timeout=2) as conn:
            return pg_scores(conn, [self.user]).get(self.user)

    def reaches_postgres(self, total: int, what: str) -> None:
        def caught_up() -> bool:
            assert self.worker.alive(), self.worker.output()[-3000:]
            return self.score_in_postgres() == total

        wait_for(caught_up, CATCH_UP_S, what)


def _setup(
    servers: Servers,
    redis_server: RedisServer,
    worker_redis_url: str,
    postgres_url: str,
    tmp_path: Path,
) -> Iterator[Setup]:
    """The worker on `worker_redis_url` (the service's Redis, or a proxy to it) and Postgres,
    and a user; yielded once (a generator: the caller's `for` keeps the cleanup in one place)."""
    env = make_env(servers, REDIS_URL=worker_redis_url, DATABASE_URL=postgres_url)
    settings = Settings.from_env(env | {"REDIS_URL": redis_server.url})
    client = redis.Redis.from_url(redis_server.url)
    client.mset(dict.fromkeys(KeySchema(settings.partitions).ready_markers, "1"))
    user = f"w-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url) as conn:
        migrate(conn)
        provision_sync(conn, client, KeySchema(settings.partitions), settings.top_n, [user])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        yield Setup(client, settings, postgres_url, user, worker)
    finally:
        stop_worker(worker)
        client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path / "postgres", fsync=False).start()
    yield server
    if server.process is not None:
        os.killpg(server.process.pid, signal.SIGCONT)  # in case the test left it stopped
    server.stop()


@pytest.mark.parametrize("mode", [Mode.REFUSE, Mode.BLACKHOLE])
def test_the_worker_rides_out_a_redis_outage_that_hits_a_flush(
    mode: Mode, own_redis: RedisServer, servers: Servers, r: redis.Redis, tmp_path: Path
) -> None:
    """Redis goes away (down, or partitioned) while a flush is committing: the job fails, RQ's
    work loop ends, and starting it again meets the outage too."""
    proxy = FaultProxy("127.0.0.1", own_redis.port).start()
    try:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        for s in _setup(servers, own_redis, url, servers.postgres.url, tmp_path):
            submit(s.settings, s.redis, s.user, 5)
            s.reaches_postgres(5, "the first increment in Postgres")

            with psycopg.connect(servers.postgres.url) as blocker:
                # the user's row locked: the next flush waits in its UPDATE
                blocker.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", [s.user])
                submit(s.settings, s.redis, s.user, 7)
                wait_for(lambda: _pending(s) == 1, CATCH_UP_S, "a flush reading the increment")
                warned = s.worker.output().count("WARNING")
                proxy.set(mode)
                if mode is Mode.REFUSE:
                    proxy.reset_all()  # Redis is gone: its connections too
            # the lock is gone: the flush commits, then finds no Redis to acknowledge in
            submit(s.settings, s.redis, s.user, 11)  # accepted meanwhile (the service's Redis)
            # the outage lasts until the worker has met it twice (refused: its loop fails and
            # starts again into it; partitioned: its reads time out), and it is still alive
            wait_for(lambda: s.worker.output().count("WARNING") >= warned + 2, CATCH_UP_S,
                     "the worker to meet the outage twice")  # fmt: skip
            assert s.worker.alive(), s.worker.output()[-3000:]
            proxy.set(Mode.PASS)
            proxy.reset_all()  # a partition that heals resets what hung meanwhile

            s.reaches_postgres(23, "the increments accepted before and during the outage")
            submit(s.settings, s.redis, s.user, 13)
            s.reaches_postgres(36, "an increment accepted after the outage in Postgres")
    finally:
        proxy.stop()


def _pending(s: Setup) -> int:
    events = KeySchema(s.settings.partitions).for_user(s.user).events
    return int(s.redis.xpending(events, PERSISTER_GROUP)["pending"])


def test_the_worker_rides_out_a_postgres_outage(
    own_redis: RedisServer, own_postgres: PostgresServer, servers: Servers, tmp_path: Path
) -> None:
    for s in _setup(servers, own_redis, own_redis.url, own_postgres.url, tmp_path):
        submit(s.settings, s.redis, s.user, 5)
        s.reaches_postgres(5, "the first increment in Postgres")

        own_postgres.stop()
        submit(s.settings, s.redis, s.user, 7)
        # the outage lasts until the worker has met it, and retried: it is still alive
        wait_for(lambda: s.worker.output().count("Postgres unavailable") >= 2, CATCH_UP_S,
                 "the worker to retry a flush while Postgres is down")  # fmt: skip
        assert s.worker.alive(), s.worker.output()[-3000:]
        own_postgres.start()

        s.reaches_postgres(12, "the increment accepted during the outage in Postgres")
        submit(s.settings, s.redis, s.user, 11)
        s.reaches_postgres(23, "an increment accepted after the outage in Postgres")
