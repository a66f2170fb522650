"""Public reads: GET /api/v1/leaderboard and GET /api/v1/users/{user_id}.

Ranks follow the leaderboard's one rule: equal scores share a rank (1 + the number of users
with a strictly higher score) and are listed by user_id ascending.
"""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.context import Context
from service.errors import ApiError
from service.leaderboard import build
from service.models import Leaderboard, UserId, UserScore, encoder
from service.redis_errors import not_ready, redis_unavailable, refuse_until_ready
from service.tops import read_tops


async def read_leaderboard(ctx: Context, limit: int) -> Leaderboard:
    """The top `limit` with its version, from each partition's latest top stream entry.

    The same atomic read as the live broadcaster's (`service.tops.read_tops`): the REST body
    and the live frame of one version are the same, so a page can load by REST and follow
    the stream without a gap.
    """
    async with redis_unavailable():
        tops = await read_tops(ctx.reads, ctx.schema, ctx.settings.top_n)
    return build(tops.versions, tops.rows, limit)


async def get_leaderboard(request: Request) -> Response:
    """The top `limit` (default and maximum: SCORE_TOP_N) users, best first."""
    ctx: Context = request.app.state.ctx
    top_n = ctx.settings.top_n
    raw = request.query_params.get("limit", str(top_n))
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= top_n):
        raise ApiError(400, f"limit must be an integer from 1 to {top_n}, got {raw[:32]!r}")
    board = await read_leaderboard(ctx, int(raw))
    return Response(encoder.encode(board), media_type="application/json")


async def get_user(request: Request) -> Response:
    """One user's score and rank; 404 for a user never provisioned."""
    ctx: Context = request.app.state.ctx
    user_id: str = request.path_params["user_id"]
    try:
        msgspec.convert(user_id, UserId)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid user_id: {exc}") from None
    refuse_until_ready(ctx)
    keys = ctx.schema.for_user(user_id)
    async with redis_unavailable():
        # the marker with the score, in one step: a Redis wiped since the last readiness poll
        # has neither, and that is a 503, not a 404
        pipe = ctx.reads.pipeline(transaction=True)
        pipe.exists(keys.ready)
        pipe.zscore(keys.leaderboard, user_id)
        ready, stored = await pipe.execute()
        if not ready:
            raise not_ready()
        if stored is None:
            raise ApiError(404, f"user {user_id!r} not found")
        # rank = 1 + users with a strictly higher score, in every partition (scores negated)
        pipe = ctx.reads.pipeline(transaction=False)
        for p in ctx.schema.all():
            pipe.zcount(p.leaderboard, "-inf", f"({int(stored)}")
        better = sum(await pipe.execute())
    body = UserScore(user_id=user_id, score=-int(stored), rank=better + 1)
    return Response(encoder.encode(body), media_type="application/json")
