"""Provisioning users: a row in Postgres (the source of truth), then a member in Redis.

Postgres first, so a user Redis knows is always one a rebuild will bring back. Both writes
are idempotent: provisioning an existing user changes nothing, its score included.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import psycopg
import redis
import redis.asyncio as aioredis

from service.keys import KeySchema
from service.scripts import Scripts, SyncScripts

INSERT_USERS = """
INSERT INTO users (user_id)
SELECT unnest(%s::text[])
ON CONFLICT (user_id) DO NOTHING
"""


def by_partition(schema: KeySchema, user_ids: Iterable[str]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for user_id in dict.fromkeys(user_ids):  # de-duplicated, order kept
        groups[schema.for_user(user_id).index].append(user_id)
    return groups


def _zadd_args(user_ids: Sequence[str]) -> dict[str, int]:
    # NX: an existing member keeps its score
    return dict.fromkeys(user_ids, 0)


def provision_sync(
    conn: psycopg.Connection[tuple[object, ...]],
    client: redis.Redis,
    schema: KeySchema,
    top_n: int,
    user_ids: Sequence[str],
) -> int:
    """Provision `user_ids`; return how many were new in Postgres."""
    with conn.transaction():
        created = conn.execute(INSERT_USERS, (list(user_ids),)).rowcount
    scripts = SyncScripts(client)
    for index, ids in by_partition(schema, user_ids).items():
        keys = schema.all()[index]
        if client.zadd(keys.leaderboard, _zadd_args(ids), nx=True):
            scripts.publish_top(keys, top_n)  # new members may enter a short top-N
    return created


async def provision(
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    client: aioredis.Redis,
    scripts: Scripts,
    schema: KeySchema,
    top_n: int,
    user_ids: Sequence[str],
) -> int:
    """Provision `user_ids`; return how many were new in Postgres."""
    async with conn.transaction():
        created = (await conn.execute(INSERT_USERS, (list(user_ids),))).rowcount
    for index, ids in by_partition(schema, user_ids).items():
        keys = schema.all()[index]
        if await client.zadd(keys.leaderboard, _zadd_args(ids), nx=True):
            await scripts.publish_top(keys, top_n)  # new members may enter a short top-N
    return created
