"""The hot path's script as a Redis Function (service.scripts.Scripts): where Redis has no
Functions (6.2) or will not let us use them (an ACL), the same calls go by EVALSHA, and each
increment is counted once either way."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import redis
import redis.asyncio as aioredis
from lua_harness import has_functions

from service.keys import KeySchema
from service.scripts import Scripts, Status, load, prepare_submit
from service.settings import Settings


async def test_a_redis_that_refuses_functions_gets_every_call_by_evalsha(
    r: redis.Redis,
    settings: Settings,
    add_users: Callable[..., list[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (user,) = add_users(count=1)
    r.script_flush()
    if has_functions(r):
        r.function_flush()
    # an operator's ACL: scripts yes, Functions no (on 6.2 there are none to refuse)
    refused = ["-function", "-fcall"] if has_functions(r) else []
    r.execute_command("ACL", "SETUSER", "no-functions", "on", ">pw", "~*", "&*", "+@all", *refused)
    host, port = (
        r.connection_pool.connection_kwargs["host"],
        r.connection_pool.connection_kwargs["port"],
    )
    client = aioredis.Redis(host=host, port=port, username="no-functions", password="pw")
    try:
        scripts = Scripts(client)
        schema = KeySchema(settings.partitions)
        with caplog.at_level(logging.INFO, logger="service.scripts"):
            for delta in (3, 4):
                result = await scripts.submit(prepare_submit(settings, schema, user, delta))
                assert result.status is Status.OK
        assert result.total == 7
        assert [m for m in caplog.messages if "EVALSHA" in m], caplog.messages
        name, _ = load("submit_score").function()
        if has_functions(r):
            assert r.function_list(library=name) == []
    finally:
        await client.aclose()
        r.execute_command("ACL", "DELUSER", "no-functions")
    assert r.zscore(schema.for_user(user).leaderboard, user) == -7
    assert r.xlen(schema.for_user(user).events) == 2
