"""What the tests share besides their fixtures: the stores' servers, the environment and the
processes of a service, and the shapes of its refusals. (Fixtures stay in conftest.py, which
builds them from these; tests import from here, never from conftest.)"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import NoReturn

import httpx
import psycopg
import pytest

from service.dev.servers import PostgresServer, RedisServer, free_port, wait_for
from service.keys import partition_of

SECRET = "test-secret-" + "x" * 40
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Servers:
    redis: RedisServer
    postgres: PostgresServer
    directory: Path


def make_env(servers: Servers, **overrides: str) -> dict[str, str]:
    """The environment a service process of the tests runs with."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORE_")}
    env.update(
        REDIS_URL=servers.redis.url,
        DATABASE_URL=servers.postgres.url,
        SCORE_JWT_SECRET=SECRET,
        SCORE_RATE_LIMIT="100000/s",
        SCORE_RATE_BURST="100000",
        SCORE_SHUTDOWN_GRACE_S="0",  # no load balancer to wait for: tests stop services fast
    )
    env.update(overrides)
    return env


def assert_problem(resp: httpx.Response, status: int, *words: str) -> dict[str, object]:
    """`resp` is an RFC 9457 problem with this status whose detail mentions `words`."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = resp.json()
    assert body["status"] == status
    assert body["title"] == HTTPStatus(status).phrase
    for word in words:
        assert word in str(body["detail"]), body["detail"]
    return body


def refused(out: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exit status 2 and one clear line on stderr."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("score-service: configuration error: ")
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@dataclass
class Service:
    base: str
    process: subprocess.Popen[bytes]
    log: Path


def start_service(env: dict[str, str], log: Path, *args: str, until: str = "/readyz") -> Service:
    """`score-service serve` as a real process (uvicorn, uvloop, httptools), once `until`
    answers 200 (/healthz: once it serves, whether or not Redis is up)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("serve exited: " + log.read_text()[-2000:])
        return httpx.get(base + until, timeout=1).status_code == 200

    try:
        wait_for(ready, 30, "score-service serve")
    except BaseException:
        stop_process(process)
        raise
    return Service(base, process, log)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`score-service worker` as a real process, its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip


def empty_postgres(servers: Servers) -> None:
    """No user, no event, no layout: a new deployment's Postgres."""
    with psycopg.connect(servers.postgres.url, autocommit=True) as conn:
        conn.execute("TRUNCATE users, score_events, score_events_pruned, score_layout")


def cannot_run(what: str, why: str) -> NoReturn:
    """`what` cannot run on this machine: a failure that says what to install. Only the
    tests marked `system` (`make test-system`) need what a new machine lacks."""
    pytest.fail(f"{what} cannot run: {why}", pytrace=False)


def users_in_every_partition(partitions: int, each: int) -> list[str]:
    """New user ids, `each` of them in every one of `partitions` partitions (random ids alone
    leave a partition empty now and then: 64 over 8 partitions, once in 700 runs)."""
    prefix = uuid.uuid4().hex[:8]
    chosen: dict[int, list[str]] = {p: [] for p in range(partitions)}
    for n in itertools.count():
        user = f"u-{prefix}-{n}"
        mine = chosen[partition_of(user, partitions)]
        if len(mine) < each:
            mine.append(user)
        if all(len(users) == each for users in chosen.values()):
            return [user for users in chosen.values() for user in users]
    raise AssertionError("unreachable")
