"""Public reads: GET /api/v1/leaderboard and GET /api/v1/users/{user_id}."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.context import Context
from service.errors import ApiError
from service.leaderboard import EMPTY_VERSION, Row, build, rows_from_fields
from service.models import Leaderboard, UserId, UserScore, encoder
from service.redis_errors import redis_unavailable



async def read_leaderboard(ctx: Context, limit: int) -> Leaderboard:
    """The top `limit` with its version, from each partition's latest top stream entry.

    The top stream entry holds the top-N and its version together, so the REST body and the
    live frames agree exactly. A partition that never published reads its ZSET directly.
    """
    parts = ctx.schema.all()
    async with redis_unavailable():
        pipe = ctx.redis.pipeline(transaction=False)
        for p in parts:
            pipe.xrevrange(p.top, count=1)
        latest = await pipe.execute()
        versions: list[str] = []
        rows: list[list[Row]] = []
        for p, entries in zip(parts, latest, strict=True):
            if entries:
                stream_id, fields = entries[0]
                versions.append(stream_id.decode())
                flat = [x for kv in fields.items() for x in kv]
                rows.append(rows_from_fields(flat))
            else:
                top = await ctx.redis.zrange(p.leaderboard, 0, ctx.settings.top_n - 1, withscores=True)
                versions.append(EMPTY_VERSION)
                rows.append([(u.decode(), -int(s)) for u, s in top])
    return build(versions, rows, limit)


async def get_leaderboard(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    top_n = ctx.settings.top_n
    raw = request.query_params.get("limit", str(top_n))
    if not raw.isdigit() or not 1 <= int(raw) <= top_n:
        raise ApiError(400, f"limit must be an integer from 1 to {top_n}, got {raw!r}")
    board = await read_leaderboard(ctx, int(raw))
    return Response(encoder.encode(board), media_type="application/json")


async def get_user(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    user_id: str = request.path_params["user_id"]
    try:
        msgspec.convert(user_id, UserId)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid user_id: {exc}") from None
    async with redis_unavailable():
        stored = await ctx.redis.zscore(ctx.schema.for_user(user_id).leaderboard, user_id)
        if stored is None:
            raise ApiError(404, f"user {user_id!r} not found")
        # rank = 1 + users with a strictly higher score, in every partition (scores negated)
        pipe = ctx.redis.pipeline(transaction=False)
        for p in ctx.schema.all():
            pipe.zcount(p.leaderboard, "-inf", f"({int(stored)}")
        better = sum(await pipe.execute())
    body = UserScore(user_id=user_id, score=-int(stored), rank=better + 1)
    return Response(encoder.encode(body), media_type="application/json")
