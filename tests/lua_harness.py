"""Drive lua/submit_score-7.lua on fakeredis or on the suite's real Redis, the same way.

The contract tests and the Hypothesis model both use this: one backend fixture per kind
(`fake`: fakeredis with Lua via lupa; `real`: the session redis-server, FLUSHDB first, the
script by EVALSHA; `hot`: the same server, submit_score sent by the service's own hot path,
`service.scripts.Scripts` over the auto-pipeline: a Redis Function by FCALL on Redis 7,
EVALSHA on 6.2), and a Harness that calls the script through `service.scripts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Collection, Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from service.keys import KeySchema, PartitionKeys
from service.scripts import Call, Scripts, SubmitResult, SyncScripts, prepare_submit, publish_top
from service.settings import Settings

BACKENDS = ["fake", "real", "hot"]

HOUR_US = 3_600_000_000
"""A GCRA emission interval so slow that no request is refilled while a test runs: the
allowance is exactly the burst, spent one accepted call at a time, so tests need no clock."""

SETTINGS = Settings(rate_interval_us=HOUR_US, rate_burst=1000, max_increase=1_000_000, top_n=3)


@contextlib.contextmanager
def open_backend(kind: str, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """An empty Redis of `kind`: a new fakeredis server, or the real one after FLUSHDB.

    The real server is asked for lazily, so `-k fake` runs without starting any server.
    """
    if kind == "fake":
        client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        servers = request.getfixturevalue("servers")
        kind_of_client = HotPathRedis if kind == "hot" else redis.Redis
        client = kind_of_client.from_url(servers.redis.url)
        client.flushdb()
        client.script_flush()  # each test's first call loads what it uses again
        if has_functions(client):
            client.function_flush()
    try:
        yield client
    finally:
        if isinstance(client, HotPathRedis):
            client.close_hot_path()
        client.close()


def has_functions(client: redis.Redis) -> bool:
    """Whether the server has Redis Functions (7.0 on): fakeredis and Redis 6.2 have not."""
    if isinstance(client, fakeredis.FakeRedis):
        return False
    return int(str(client.info("server")["redis_version"]).split(".")[0]) >= 7


class HotPathRedis(redis.Redis):
    """A client whose Harness sends submit_score the way the service does (`hot`)."""

    _hot: _HotPath | None = None

    def hot_path(self) -> _HotPath:
        if self._hot is None:
            self._hot = _HotPath(self)
        return self._hot

    def close_hot_path(self) -> None:
        if self._hot is not None:
            self._hot.close()
            self._hot = None


class _HotPath:
    """The service's `Scripts` on an event loop of its own: `run` like SyncScripts'."""

    def __init__(self, client: redis.Redis) -> None:
        self._sync = SyncScripts(client)
        self._loop = asyncio.new_event_loop()
        self._client = async_twin(client)
        self.scripts = Scripts(self._client)

    def run(self, call: Call[Any]) -> Any:
        if call.script != "submit_score":
            return self._sync.run(call)
        return self._loop.run_until_complete(self.scripts.submit(call))

    def close(self) -> None:
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()


def async_twin(client: redis.Redis) -> aioredis.Redis:
    """An asyncio client to the same (fake or real) server as `client`."""
    kwargs = client.connection_pool.connection_kwargs
    if isinstance(client, fakeredis.FakeRedis):
        return fakeredis.FakeAsyncRedis(server=kwargs["server"])
    return aioredis.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0))


Snapshot = dict[bytes, tuple[bytes, bytes | None, int]]


class Harness:
    """One partition's leaderboard on one client, with the script's calls and readers."""

    def __init__(self, client: redis.Redis, settings: Settings = SETTINGS) -> None:
        self.client = client
        self.settings = settings
        self.schema = KeySchema(1)
        self.keys: PartitionKeys = self.schema.all()[0]
        self.scripts: SyncScripts | _HotPath = (
            client.hot_path() if isinstance(client, HotPathRedis) else SyncScripts(client)
        )
        client.set(self.keys.ready, "1")  # as after a deployment's first rebuild

    def with_settings(self, **changes: int) -> Harness:
        """The same client with other settings (e.g. a small burst)."""
        return Harness(self.client, dataclasses.replace(self.settings, **changes))

    def provision(self, *user_ids: str) -> None:
        """What service.users does in Redis: a member at 0 (kept if present), a new top-N."""
        if user_ids and self.client.zadd(
            self.keys.leaderboard, dict.fromkeys(user_ids, 0), nx=True
        ):
            self.scripts.run(publish_top(self.keys, self.settings.top_n))

    def prepare(
        self, user_id: str, delta: int, key: str | None = None, *, operator: bool = False
    ) -> Call[SubmitResult]:
        return prepare_submit(
            self.settings, self.schema, user_id, delta, idempotency_key=key, operator=operator
        )

    def submit(
        self, user_id: str, delta: int, key: str | None = None, *, operator: bool = False
    ) -> SubmitResult:
        return self.scripts.run(self.prepare(user_id, delta, key, operator=operator))

    def board(self) -> list[tuple[str, int]]:
        """Every (user_id, total), best first, read from the ZSET of negated scores."""
        raw = self.client.zrange(self.keys.leaderboard, 0, -1, withscores=True)
        return [(member.decode(), _exact(-score)) for member, score in raw]

    def events(self) -> list[tuple[str, dict[str, str]]]:
        """The events stream: (stream id, fields)."""
        return [
            (sid.decode(), {k.decode(): v.decode() for k, v in fields.items()})
            for sid, fields in self.client.xrange(self.keys.events)
        ]

    def top_entries(self) -> list[tuple[str, list[tuple[str, int]]]]:
        """The top stream: (version, [(user_id, total), ...] best first) per entry."""
        entries = self.client.xrange(self.keys.top)
        return [(sid.decode(), _pairs(fields)) for sid, fields in entries]

    def snapshot(self) -> Snapshot:
        """Every key: its type, its DUMP (the exact serialized value) and its PTTL.

        DUMP does not carry the TTL; comparing PTTLs with `unchanged` catches a rewrite that
        would only extend an expiry.
        """
        snap: Snapshot = {}
        for key in sorted(self.client.scan_iter(count=1000)):
            snap[key] = (self.client.type(key), self.client.dump(key), self.client.pttl(key))
        return snap

    def assert_unchanged(self, before: Snapshot, *, but: Collection[bytes] = ()) -> None:
        """The keyspace is byte-for-byte what it was (and no expiry was pushed back), except
        for the keys in `but`."""
        after = {k: v for k, v in self.snapshot().items() if k not in but}
        before = {k: v for k, v in before.items() if k not in but}
        assert sorted(after) == sorted(before)
        for key, (kind, dumped, pttl) in before.items():
            kind_after, dumped_after, pttl_after = after[key]
            assert (kind_after, dumped_after) == (kind, dumped), key
            assert (pttl_after < 0) == (pttl < 0), key
            assert pttl_after <= pttl, key


def _exact(score: float) -> int:
    """A ZSET score as the integer it stands for (refusing, not rounding, a fraction)."""
    assert score == int(score), score
    return int(score)


def _pairs(fields: dict[bytes, bytes]) -> list[tuple[str, int]]:
    # redis-py keeps stream fields in reply order, which is the ZRANGE order the script wrote
    return [(k.decode(), -int(v)) for k, v in fields.items() if k != b""]
