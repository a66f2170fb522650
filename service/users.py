"""Provisioning users: a row in Postgres (the source of truth), then a member in Redis.

Postgres first, so a user Redis knows is always one a rebuild will bring back. Both writes
are idempotent: provisioning an existing user changes nothing, its score included, and a
provisioning call cut short can be sent again.

While a rebuild runs, Redis's half (lua/provision_users-3.lua) adds the users to the rebuilt
leaderboard too, in the same atomic step: a user whose provisioning has returned is in the
leaderboard before and after the swap, and the increments accepted for it meanwhile are
replayed. On a Redis that lost its data, the hot path answers 503 (not 404) until the rebuild
is done, and the rebuild reads Postgres, where the user already is.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence

import psycopg
import redis

from service.keys import KeySchema, PartitionKeys
from service.progress import Progress, no_progress
from service.scripts import Scripts, SyncScripts, provision_users, publish_top

IMPORT_CHUNK = 10_000
"""Users provisioned per transaction and Lua call by an import: the admin API's most per
request, too."""

INSERT_USERS = """
INSERT INTO users (user_id)
SELECT unnest(%s::text[])
ON CONFLICT (user_id) DO NOTHING
"""


def by_partition(
    schema: KeySchema, user_ids: Iterable[str]
) -> list[tuple[PartitionKeys, list[str]]]:
    """`user_ids`, de-duplicated (order kept), with the keys of the partition of each group."""
    groups: dict[int, list[str]] = defaultdict(list)
    for user_id in dict.fromkeys(user_ids):
        groups[schema.for_user(user_id).index].append(user_id)
    return [(schema.all()[index], ids) for index, ids in groups.items()]


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
    for keys, ids in by_partition(schema, user_ids):
        if scripts.run(provision_users(keys, ids)):
            scripts.run(publish_top(keys, top_n))  # new members may enter a short top-N
    return created


async def provision(
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    scripts: Scripts,
    schema: KeySchema,
    top_n: int,
    user_ids: Sequence[str],
) -> int:
    """Provision `user_ids`; return how many were new in Postgres."""
    async with conn.transaction():
        created = (await conn.execute(INSERT_USERS, (list(user_ids),))).rowcount
    for keys, ids in by_partition(schema, user_ids):
        if await scripts.run(provision_users(keys, ids)):
            await scripts.run(publish_top(keys, top_n))  # new members may enter a short top-N
    return created


def provision_all(
    conn: psycopg.Connection[tuple[object, ...]],
    client: redis.Redis,
    schema: KeySchema,
    top_n: int,
    user_ids: Iterable[str],
    progress: Progress = no_progress,
) -> tuple[int, int]:
    """Provision the users `user_ids` yields, IMPORT_CHUNK at a time, reading no further ahead
    (memory stays flat, whatever their number): (new in Postgres, provisioned). A user given
    twice in one chunk counts once; in two, the second time as one that already existed."""
    created = provisioned = 0
    ids = iter(user_ids)
    while chunk := list(dict.fromkeys(itertools.islice(ids, IMPORT_CHUNK))):
        created += provision_sync(conn, client, schema, top_n, chunk)
        provisioned += len(chunk)
        progress("users provisioned", len(chunk))
    return created, provisioned
