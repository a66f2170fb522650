"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

import msgspec
import redis.exceptions
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from service.context import Context
from service.models import encoder

PG_CHECK_TIMEOUT_S = 1.0


class Readiness(msgspec.Struct):
    status: str  # "ready", "degraded" (Postgres down: the hot path still works) or "unavailable"
    redis: str
    postgres: str
    detail: str = ""


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def postgres_status(ctx: Context) -> str:
    try:
        async with asyncio.timeout(PG_CHECK_TIMEOUT_S), ctx.pg.connection() as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure is "down", reported, not raised
        return f"down: {type(exc).__name__}"
    return "ok"


async def readyz(request: Request) -> Response:
    """Ready when Redis answers, has loaded its data and holds the leaderboards.

    A Postgres outage keeps 200 with status "degraded": scores are still accepted, and the
    persister catches up when Postgres returns.
    """
    ctx: Context = request.app.state.ctx
    redis_state = "ok"
    try:
        await ctx.redis.ping()
    except redis.exceptions.BusyLoadingError:
        redis_state = "loading"
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        redis_state = f"down: {type(exc).__name__}"
    pg_state = await postgres_status(ctx)
    if redis_state != "ok" or not ctx.ready:
        body = Readiness("unavailable", redis_state, pg_state, "" if ctx.ready else ctx.not_ready_reason)
        return Response(encoder.encode(body), status_code=503, media_type="application/json",
                        headers={"Retry-After": "1"})
    status = "ready" if pg_state == "ok" else "degraded"
    return Response(encoder.encode(Readiness(status, redis_state, pg_state)), media_type="application/json")


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
