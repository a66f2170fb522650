"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec
import redis.exceptions
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from service import persister_lag
from service.context import Context
from service.models import encoder

log = logging.getLogger(__name__)

PG_CHECK_TIMEOUT_S = 1.0


class Readiness(msgspec.Struct):
    """Body of /readyz."""

    status: str  # "ready", "degraded" (Postgres down: the hot path still works) or "unavailable"
    redis: str
    postgres: str
    detail: str = ""


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def postgres_status(ctx: Context) -> str:
    """ "ok", or "down: <error type>" when Postgres does not answer within a second.

    /readyz is public: the error's text (psycopg's names the server's host and port) goes to
    the log only.
    """
    try:
        async with asyncio.timeout(PG_CHECK_TIMEOUT_S), ctx.pg.connection() as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:  # any failure is "down": reported, not raised
        log.info("readiness: Postgres is down: %s", exc)
        return f"down: {type(exc).__name__}"
    return "ok"


async def redis_status(ctx: Context) -> str:
    """ "ok", "loading", or "down: <why>"."""
    try:
        await ctx.redis.ping()
    except redis.exceptions.BusyLoadingError:
        return "loading"
    except redis.exceptions.RedisError as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


async def readyz(request: Request) -> Response:
    """Ready when Redis answers, has loaded its data and holds the leaderboards.

    A Postgres outage keeps 200 with status "degraded": scores are still accepted, and the
    persister catches up when Postgres returns.
    """
    ctx: Context = request.app.state.ctx
    redis_state, pg_state = await asyncio.gather(redis_status(ctx), postgres_status(ctx))
    if redis_state != "ok" or not ctx.ready or ctx.draining:
        reason = "shutting down" if ctx.draining else "" if ctx.ready else ctx.not_ready_reason
        body = encoder.encode(Readiness("unavailable", redis_state, pg_state, reason))
        return Response(
            body, status_code=503, media_type="application/json", headers={"Retry-After": "1"}
        )
    status = "ready" if pg_state == "ok" else "degraded"
    body = encoder.encode(Readiness(status, redis_state, pg_state))
    return Response(body, media_type="application/json")


def _registry() -> CollectorRegistry | None:
    """With `serve --workers N`, every worker writes its metrics under
    PROMETHEUS_MULTIPROC_DIR and a scrape of any one of them reports all of them."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None  # one process: the default registry has everything
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(persister_lag.COLLECTOR)  # read from Redis: the same in every process
    return registry


async def metrics(request: Request) -> Response:
    """Prometheus exposition of the service's metrics, and the persister's lag (from Redis)."""
    await persister_lag.refresh(request.app.state.ctx)
    registry = _registry()
    body = generate_latest() if registry is None else generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
