"""Reading the partitions' current top-N from Redis: the one read behind REST and frames.

GET /api/v1/leaderboard and the live broadcaster both build the leaderboard
(`service.leaderboard.build`) from what `read_tops` returns: each partition's newest top
stream entry. The version is derived from the very entries whose rows are shown
(`leaderboard.combined`), so a version always comes with the same top-N, whichever way a client
reads it, with no transaction: on a Redis Cluster the partitions are in different slots, and
one read of them all would be refused (CROSSSLOT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from service import streamids
from service.keys import KeySchema
from service.leaderboard import Row, rows_from_fields


@dataclass(slots=True)
class Tops:
    """Each partition's newest top-N and its version (a top stream id), by partition index."""

    versions: list[str]
    rows: list[list[Row]]


async def read_tops(client: aioredis.Redis, schema: KeySchema, top_n: int) -> Tops:
    """Every partition's newest top stream entry (one pipelined round trip per primary).

    A partition that never published (data older than the top streams) falls back to its
    ZSET with version 0-0, so that its players still show.
    """
    parts = schema.all()
    pipe = client.pipeline(transaction=False)
    for p in parts:
        pipe.xrevrange(p.top, count=1)
    latest: list[Any] = await pipe.execute()
    tops = Tops([], [])
    for p, entries in zip(parts, latest, strict=True):
        if entries:
            stream_id, fields = entries[0]
            tops.versions.append(stream_id.decode())
            # redis-py gives the fields as a dict, in stream (rank) order
            tops.rows.append(rows_from_fields([x for kv in fields.items() for x in kv]))
        else:
            zset: list[Any] = await client.zrange(p.leaderboard, 0, top_n - 1, withscores=True)
            tops.versions.append(streamids.ZERO)
            tops.rows.append([(u.decode(), -int(s)) for u, s in zset])
    return tops
