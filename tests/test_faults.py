"""Faults, with real processes: `score-service serve` and `score-service worker` against a Redis
and a Postgres of this module's own, which it kills, stops and wipes.

Players keep scoring through the service while the faults happen. Each increment carries an
Idempotency-Key (never reused) and is retried until acknowledged (200): the client-side ledger
holds every acknowledged increment. After each fault: Postgres's ledger equals the client's
exactly (one row per key, with its delta, no more, no fewer; each row's total is the running
sum), Redis equals Postgres, and `score-service reconcile` reports zero drift.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from persist_support import cli, keyed_rows, ledger, pg_scores, redis_totals, unpersisted
from support import ROOT, Servers, Service, make_env, start_service, stop_process

from persister.schema import migrate
from service.auth import mint
from service.dev.servers import PostgresServer, RedisServer, free_port, wait_for
from service.keys import KeySchema
from service.persister_lag import read_lags_sync
from service.settings import Settings
from service.users import provision_sync

PARTITIONS = 2
WAIT_S = 60.0
RETRY_PAUSE_S = 0.05


@dataclass
class Stack:
    directory: Path
    redis: RedisServer
    postgres: PostgresServer
    env: dict[str, str]
    settings: Settings
    service: Service | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url)

    def users(self, count: int) -> list[str]:
        ids = [f"f-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        client = self.client()
        try:
            with psycopg.connect(self.postgres.url) as conn:
                provision_sync(conn, client, KeySchema(PARTITIONS), self.settings.top_n, ids)
        finally:
            client.close()
        return ids

    def worker(self, name: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        """`score-service worker` in a session of its own, logging to NAME.log."""
        log = self.directory / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "worker"],
                env={**self.env, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        self.workers.append(process)
        return process, log


def kill9(process: subprocess.Popen[bytes]) -> None:
    """kill -9 the process (its process group: anything it forked too)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            kill9(process)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    directory = Path(tempfile.mkdtemp(prefix="score-faults-"))
    redis_server = RedisServer(directory / "redis").start()
    postgres = PostgresServer(directory / "postgres", fsync=False).start()
    try:
        with psycopg.connect(postgres.url) as conn:
            migrate(conn)
        env = make_env(Servers(redis_server, postgres, directory), SCORE_PARTITIONS=str(PARTITIONS))
        s = Stack(directory, redis_server, postgres, env, Settings.from_env(env))
        s.service = start_service(env, directory / "serve.log")
        yield s
    finally:
        if "s" in locals():
            for process in [*s.workers, *([s.service.process] if s.service else [])]:
                if process.poll() is None:
                    kill9(process)
        postgres.stop()
        redis_server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class Traffic:
    """Players scoring through the service, from a few threads. An increment is retried with
    its Idempotency-Key until acknowledged (a 503 while Redis restarts), never abandoned: an
    unacknowledged attempt may have been applied, and only its retry's 200 tells."""

    def __init__(self, stack: Stack, users: list[str], threads: int = 3) -> None:
        assert stack.service is not None
        self.base = stack.service.base
        self.users = users
        self.tokens = {u: mint(stack.settings, u, ttl_s=3600) for u in users}
        self.run = uuid.uuid4().hex[:8]  # idempotency keys are never reused across runs
        self.acked: list[tuple[str, str, int]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT_S)
        if self.errors:
            raise self.errors[0]

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def wait_more(self, n: int, what: str) -> None:
        """Wait until `n` more increments are acknowledged."""
        target = self.count() + n
        wait_for(lambda: self.count() >= target or bool(self.errors), WAIT_S, what)
        assert not self.errors, self.errors

    def _run(self, thread: int) -> None:
        rng = random.Random(thread)
        try:
            with httpx.Client(base_url=self.base, timeout=5) as client:
                n = 0
                while not self._stop.is_set():
                    user = rng.choice(self.users)
                    self._send(client, user, f"{self.run}-{thread}-{n}", rng.randint(1, 100))
                    n += 1
        except BaseException as exc:
            self.errors.append(exc)

    def _send(self, client: httpx.Client, user: str, key: str, delta: int) -> None:
        headers = {"Authorization": f"Bearer {self.tokens[user]}", "Idempotency-Key": key}
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                reply = client.post(
                    "/api/v1/score", json={"user_id": user, "score_increase": delta},
                    headers=headers,
                )  # fmt: skip
            except httpx.TransportError:
                reply = None
            if reply is not None and reply.status_code == 200:
                with self._lock:
                    self.acked.append((user, key, delta))
                return
            if reply is not None and reply.status_code != 503:
                raise AssertionError(f"unexpected {reply.status_code}: {reply.text}")
            self._stop.wait(RETRY_PAUSE_S)  # a client's pause between retries (short at the end)
        raise AssertionError(f"increment {key} for {user} was never acknowledged")


def assert_consistent(stack: Stack, acked: list[tuple[str, str, int]], users: list[str]) -> None:
    """Once the persister has caught up: Postgres = the ledger exactly, Redis = Postgres,
    and reconcile finds no drift."""
    assert len({k for _, k, _ in acked}) == len(acked)
    totals: Counter[str] = Counter({u: 0 for u in users})
    for u, _, d in acked:
        totals[u] += d
    client = stack.client()
    try:
        with psycopg.connect(stack.postgres.url, autocommit=True) as conn:

            def caught_up() -> bool:
                return unpersisted(stack.settings, client) == 0 and len(ledger(conn, users)) == len(
                    acked
                )

            wait_for(caught_up, WAIT_S, "the persister to catch up")
            rows = keyed_rows(conn, users)
            assert Counter((u, k, d) for u, k, d, _ in rows) == Counter(acked)
            running: Counter[str] = Counter()
            for u, _, d, total in rows:  # in the order Redis accepted them
                running[u] += d
                assert total == running[u], (u, total, running[u])
            assert pg_scores(conn, users) == dict(totals)
            assert redis_totals(stack.settings, client, users) == dict(totals)
    finally:
        client.close()
    report = cli(stack.env, "reconcile")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "drift: none" in report.stdout


def persisting(stack: Stack, users: list[str]) -> None:
    """Wait until the worker has committed some of these users' increments."""
    with psycopg.connect(stack.postgres.url, autocommit=True) as conn:
        wait_for(lambda: bool(ledger(conn, users)), WAIT_S, "the worker to persist")


def wait_for_line(log: Path, text: str) -> None:
    wait_for(lambda: text in log.read_text(errors="replace"), WAIT_S, f"{text!r} in {log.name}")


def test_a_worker_killed_mid_batch_loses_nothing(stack: Stack) -> None:
    users = stack.users(6)
    worker, log = stack.worker("mid-batch", SCORE_PERSIST_FAULT="pause-before-commit")
    with Traffic(stack, users) as traffic:
        wait_for_line(log, "fault point before-commit reached")
        with psycopg.connect(stack.postgres.url) as conn:
            assert ledger(conn, users) == {}  # applied, not committed
        kill9(worker)
        traffic.wait_more(30, "increments while no worker runs")
        worker, _ = stack.worker("after-mid-batch")
        traffic.wait_more(30, "increments with a new worker")
    assert_consistent(stack, traffic.acked, users)
    stop_worker(worker)


def test_a_worker_killed_between_commit_and_ack_doubles_nothing(stack: Stack) -> None:
    users = stack.users(6)
    worker, log = stack.worker("commit-ack", SCORE_PERSIST_FAULT="pause-after-commit")
    with Traffic(stack, users) as traffic:
        wait_for_line(log, "fault point after-commit reached")
        with psycopg.connect(stack.postgres.url) as conn:
            committed = ledger(conn, users)
        client = stack.client()
        try:
            pending = sum(
                lag.pending for lag in read_lags_sync(client, KeySchema(PARTITIONS).all())
            )
        finally:
            client.close()
        assert committed and pending >= len(committed)  # in Postgres, and still pending
        kill9(worker)
        traffic.wait_more(30, "increments while no worker runs")
        worker, _ = stack.worker("after-commit-ack")
        traffic.wait_more(30, "increments with a new worker")
    assert_consistent(stack, traffic.acked, users)
    stop_worker(worker)


def test_postgres_stopped_while_increments_arrive(stack: Stack) -> None:
    assert stack.service is not None
    users = stack.users(6)
    worker, log = stack.worker("postgres-down")
    with Traffic(stack, users) as traffic:
        traffic.wait_more(30, "increments")
        stack.postgres.stop()
        traffic.wait_more(100, "increments while Postgres is down")  # the hot path serves
        ready = httpx.get(stack.service.base + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        metrics = httpx.get(stack.service.base + "/metrics", timeout=5).text
        waiting = sum(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("score_persister_unpersisted_events{")
        )
        assert waiting > 0
        wait_for_line(log, "Postgres unavailable")
        stack.postgres.start()
        traffic.wait_more(30, "increments after Postgres is back")
    assert_consistent(stack, traffic.acked, users)
    stop_worker(worker)


def test_postgres_hung_on_a_lock(stack: Stack) -> None:
    users = stack.users(4)
    worker, log = stack.worker("postgres-hung")
    with Traffic(stack, users) as traffic:
        traffic.wait_more(20, "increments")
        with psycopg.connect(stack.postgres.url) as blocker:
            blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            traffic.wait_more(50, "increments while Postgres hangs")
            wait_for_line(log, "QueryCanceled")  # the statement timeout ended the wait
        traffic.wait_more(20, "increments after the lock is gone")
    assert_consistent(stack, traffic.acked, users)
    stop_worker(worker)


def test_redis_killed_and_restarted_from_its_aof(stack: Stack) -> None:
    users = stack.users(6)
    worker, _ = stack.worker("redis-restart")
    with Traffic(stack, users) as traffic:
        traffic.wait_more(50, "increments")
        persisting(stack, users)
        stack.redis.stop(signal.SIGKILL)
        stack.redis.start()  # the same port and directory: it replays its AOF
        traffic.wait_more(100, "increments after the restart")
    assert_consistent(stack, traffic.acked, users)
    stop_worker(worker)


def test_a_wiped_redis_is_rebuilt_from_postgres_before_ready(stack: Stack) -> None:
    assert stack.service is not None
    users = stack.users(6)
    worker, _ = stack.worker("wiped")
    with Traffic(stack, users) as traffic:
        traffic.wait_more(50, "increments")
    assert_consistent(stack, traffic.acked, users)
    acked = list(traffic.acked)

    stop_process(stack.service.process)
    client = stack.client()
    client.flushall()
    client.close()
    stack.postgres.stop()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(stack.directory / "serve-2.log", "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=stack.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
    stack.service = Service(base, process, stack.directory / "serve-2.log")

    def not_ready_rebuilding() -> bool:
        reply = httpx.get(base + "/readyz", timeout=2)
        return reply.status_code == 503 and "rebuild" in reply.json()["detail"]

    wait_for(not_ready_rebuilding, WAIT_S, "a 503 from /readyz while the rebuild cannot run")
    stack.postgres.start()
    wait_for(lambda: httpx.get(base + "/readyz", timeout=2).status_code == 200, WAIT_S, "ready")

    with psycopg.connect(stack.postgres.url) as conn:
        scores = pg_scores(conn, users)
    client = stack.client()
    try:
        assert redis_totals(stack.settings, client, users) == scores
        # clients retrying requests made before the wipe: the rebuild restored the keys' records
        tokens = {u: mint(stack.settings, u, ttl_s=3600) for u in users}
        with httpx.Client(base_url=base, timeout=5) as http:
            for user, key, delta in acked:
                reply = http.post(
                    "/api/v1/score", json={"user_id": user, "score_increase": delta},
                    headers={"Authorization": f"Bearer {tokens[user]}", "Idempotency-Key": key},
                )  # fmt: skip
                assert reply.status_code == 200, reply.text
                assert reply.headers["idempotent-replayed"] == "true"
        assert redis_totals(stack.settings, client, users) == scores  # nothing added
    finally:
        client.close()
    with Traffic(stack, users) as traffic:  # the users are known again
        traffic.wait_more(30, "increments after the rebuild")
    assert_consistent(stack, acked + traffic.acked, users)
    stop_worker(worker)
