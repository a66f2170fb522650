"""service/batching.py: concurrent calls share a connection and round trips, each keeps its
own reply or error, and Redis being down, hung or restarted fails calls fast, never twice."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions
from lua_harness import has_functions

from service.batching import AutoPipeline, NotReplicated, Replication
from service.connections import SOCKET_TIMEOUT_S, async_redis
from service.dev.servers import RedisServer, wait_for
from service.keys import KeySchema
from service.scripts import Scripts, Status, prepare_submit
from service.settings import Settings

NAME = "batching-test"


@pytest.fixture
async def client(settings: Settings, r: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    c = async_redis(settings, client_name=NAME)
    yield c
    await c.aclose()


async def test_concurrent_calls_share_one_connection_and_keep_their_own_replies(
    client: aioredis.Redis, r: redis.Redis
) -> None:
    r.set("not-a-number", "x")
    pipeline = AutoPipeline.for_client(client, SOCKET_TIMEOUT_S)
    assert pipeline is not None
    calls = [pipeline.execute("INCRBY", f"counter-{i % 7}", i) for i in range(300)]
    calls += [pipeline.execute("INCRBY", "not-a-number", 1) for _ in range(5)]
    replies = await asyncio.gather(*calls, return_exceptions=True)

    for i in range(7):
        assert int(r.get(f"counter-{i}") or 0) == sum(range(i, 300, 7))
    assert all(isinstance(x, int) for x in replies[:300])
    for error in replies[300:]:
        assert isinstance(error, redis.exceptions.ResponseError)
        assert "not an integer" in str(error)
    assert r.get("not-a-number") == b"x"
    # 300 concurrent calls went through one connection (the plain client opens one per call)
    named = [c for c in r.client_list() if c["name"] == NAME]
    assert len(named) == 1


async def test_error_replies_map_to_redis_py_exceptions(client: aioredis.Redis) -> None:
    pipeline = AutoPipeline.for_client(client, SOCKET_TIMEOUT_S)
    assert pipeline is not None
    with pytest.raises(redis.exceptions.NoScriptError):
        await pipeline.execute("EVALSHA", "0" * 40, 0)
    assert await pipeline.execute("PING") == b"PONG"


async def test_submits_run_the_script_on_a_redis_that_lost_it_without_a_connection_storm(
    client: aioredis.Redis, r: redis.Redis, settings: Settings, add_users: Callable[..., list[str]]
) -> None:
    users = add_users(count=5)
    scripts = Scripts(client)
    schema = KeySchema(settings.partitions)
    first = await scripts.submit(prepare_submit(settings, schema, users[0], 5))
    # as after a Redis restart without its data: every EVALSHA gets NOSCRIPT, every FCALL
    # "no such function"
    r.script_flush()
    if has_functions(r):
        r.function_flush()
    results = await asyncio.gather(
        *(scripts.submit(prepare_submit(settings, schema, users[i % 5], 1)) for i in range(100))
    )
    assert (first.status, first.total) == (Status.OK, 5)
    assert all(x.status is Status.OK for x in results)
    totals = {u: -int(s) for u, s in r.zrange(schema.all()[0].leaderboard, 0, -1, withscores=True)}
    assert totals == {u.encode(): (5 if u == users[0] else 0) + 20 for u in users}
    # the batches' connection, and the one that loaded the library once for them all
    assert len([c for c in r.client_list() if c["name"] == NAME]) <= 2


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    if server.process is not None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


async def test_a_redis_that_is_down_fails_calls_and_a_restarted_one_serves_again(
    own_redis: RedisServer,
) -> None:
    c = async_redis(Settings(redis_url=own_redis.url, jwt_secret="s" * 40))
    try:
        pipeline = AutoPipeline.for_client(c, SOCKET_TIMEOUT_S)
        assert pipeline is not None
        assert await pipeline.execute("SET", "k", "1") == b"OK"
        own_redis.stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            await pipeline.execute("INCR", "k")
        own_redis.start()  # same port and directory: the AOF brings k back
        assert await pipeline.execute("INCR", "k") == 2
    finally:
        await c.aclose()


async def test_a_hung_redis_times_out_every_waiting_call(own_redis: RedisServer) -> None:
    c = async_redis(Settings(redis_url=own_redis.url, jwt_secret="s" * 40))
    try:
        pipeline = AutoPipeline.for_client(c, SOCKET_TIMEOUT_S)
        assert pipeline is not None
        assert await pipeline.execute("PING") == b"PONG"
        assert own_redis.process is not None
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        replies = await asyncio.gather(
            *(pipeline.execute("INCR", "k") for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(x, redis.exceptions.TimeoutError) for x in replies), replies
        os.kill(own_redis.process.pid, signal.SIGCONT)
        # the connection that timed out is dropped: its late replies are never matched
        # to new calls
        assert await pipeline.execute("SET", "other", "v") == b"OK"
        assert await pipeline.execute("GET", "other") == b"v"
    finally:
        await c.aclose()


async def test_a_primary_without_its_replicas_loses_the_connection_not_the_calls(
    own_redis: RedisServer,
) -> None:
    """NOREPLICAS (min-replicas-to-write) and a short WAIT say this primary may be cut off and
    replaced: the pipeline drops the connection, so the next one asks the sentinels again who
    the primary is. Each call still gets its own answer, and nothing is sent twice."""
    settings = Settings(redis_url=own_redis.url, jwt_secret="s" * 40)
    c = async_redis(settings, client_name=NAME)
    admin = redis.Redis(port=own_redis.port)

    def connection_ids() -> set[int]:
        return {int(x["id"]) for x in admin.client_list() if x["name"] == NAME}

    try:
        pipeline = AutoPipeline.for_client(c, SOCKET_TIMEOUT_S)
        assert pipeline is not None
        assert await pipeline.execute("INCR", "k") == 1
        first = connection_ids()
        admin.config_set("min-replicas-to-write", 1)  # this server has none
        with pytest.raises(redis.exceptions.ResponseError, match="NOREPLICAS"):
            await pipeline.execute("INCR", "k")
        admin.config_set("min-replicas-to-write", 0)
        assert await pipeline.execute("INCR", "k") == 2  # ran once, on a new connection
        second = connection_ids()
        assert second.isdisjoint(first)

        waiting = AutoPipeline.for_client(c, SOCKET_TIMEOUT_S, Replication(replicas=1, wait_ms=1))
        assert waiting is not None
        with pytest.raises(NotReplicated, match="confirmed by 0 of 1"):
            await waiting.execute("INCR", "k")
        assert await pipeline.execute("GET", "k") == b"3"  # ran once
        # the connection WAIT came short on is closed (the other pipeline's stays)
        wait_for(lambda: connection_ids() == second, 5, "the connection to close")
    finally:
        await c.aclose()
        admin.close()


def test_fakes_are_left_to_redis_py_and_every_scheme_is_pipelined() -> None:
    fake = fakeredis.FakeAsyncRedis()
    assert AutoPipeline.for_client(fake, SOCKET_TIMEOUT_S) is None
    for url in ["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///tmp/r.sock"]:
        assert AutoPipeline.for_client(aioredis.Redis.from_url(url), SOCKET_TIMEOUT_S)


async def test_a_connect_that_fails_outside_redis_py_is_still_a_connection_error(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in the chaos soak: a reset during the handshake surfaces under uvloop as a
    # RuntimeError, which the hot path answered with a 500. It must be a ConnectionError (503).
    pipeline = AutoPipeline.for_client(client, SOCKET_TIMEOUT_S)
    assert pipeline is not None

    async def closed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    monkeypatch.setattr(client.connection_pool, "get_connection", closed)
    with pytest.raises(redis.exceptions.ConnectionError, match="cannot connect to Redis"):
        await pipeline.execute("PING")
    monkeypatch.undo()
    assert await pipeline.execute("PING") == b"PONG"
