"""The Starlette application: `create_app(settings)` and the lifespan that owns its resources."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import redis.exceptions
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from service.admin import post_scores, post_users
from service.auth import Authenticator
from service.broadcast import Broadcaster
from service.connections import async_redis, check_redis
from service.context import Context, FlushRequester
from service.errors import ApiError, api_error_handler, http_exception_handler, server_error_handler
from service.going_away import hook_shutdown_signals
from service.health import healthz, metrics, readyz
from service.keys import KeySchema
from service.live import live_routes
from service.openapi import openapi
from service.page import page_routes
from service.reads import get_leaderboard, get_user
from service.scores import post_score
from service.scripts import Scripts
from service.settings import Settings
from service.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Rebuild = Callable[[Settings], None]
"""Rebuilds Redis from Postgres (blocking; run off the event loop). Provided by the CLI."""

READY_POLL_S = 0.5


def create_app(
    settings: Settings,
    *,
    rebuild: Rebuild | None = None,
    request_flush: FlushRequester | None = None,
) -> Starlette:
    """The service. `rebuild` restores an empty Redis from Postgres before it reports ready;
    `request_flush` asks the persister to drain a partition's events."""
    live = Broadcaster(settings, KeySchema(settings.partitions))  # the live leaderboard

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = async_redis(settings)
        await check_redis(client)
        pg = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=2.0,
            kwargs={"connect_timeout": 2, "autocommit": True},
        )
        await pg.open(wait=False)
        ctx = Context(
            settings=settings,
            schema=KeySchema(settings.partitions),
            redis=client,
            scripts=Scripts(client),
            auth=Authenticator(settings),
            pg=pg,
            request_flush=request_flush,
        )
        app.state.ctx = ctx
        if ctx.auth.jwks is not None:
            await ctx.auth.jwks.start()
        with contextlib.suppress(redis.exceptions.RedisError):
            # ready from the first request when Redis holds the leaderboards: uvicorn accepts
            # connections only once this startup is done
            ctx.ready = bool(await client.exists(ctx.schema.ready_marker))
        readiness = asyncio.create_task(keep_ready(ctx, rebuild))
        await live.start()
        unhook_signals = hook_shutdown_signals(live)
        try:
            yield
        finally:
            unhook_signals()
            await live.stop()
            await cancel_and_wait(readiness)
            if ctx.auth.jwks is not None:
                await ctx.auth.jwks.stop()
            await pg.close()
            await client.aclose()

    routes = [
        Route("/api/v1/score", post_score, methods=["POST"]),
        Route("/api/v1/leaderboard", get_leaderboard, methods=["GET"]),
        Route("/api/v1/users/{user_id:path}", get_user, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/api/v1/admin/users", post_users, methods=["POST"]),
        Route("/api/v1/admin/scores", post_scores, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *live_routes(live),
        *page_routes(settings),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_exception_handler,
            Exception: server_error_handler,
        },
    )


async def keep_ready(ctx: Context, rebuild: Rebuild | None) -> None:
    """Say through `ctx.ready` whether Redis holds the leaderboards, for as long as we run.

    Redis without its ready marker (new, or it lost its data while we run: a restart without
    its AOF, a failover to an empty replica) is rebuilt from Postgres; until then requests
    get 503, never a 404 for a user who exists. A Redis that is merely down changes nothing
    here: requests get 503 from the Redis error itself, and it comes back with its data.
    """
    marker = ctx.schema.ready_marker
    while True:
        try:
            if await ctx.redis.exists(marker):
                ctx.ready, ctx.not_ready_reason = True, ""
            elif rebuild is None:
                await ctx.redis.set(marker, "1")
            else:
                if ctx.ready:
                    log.warning("Redis holds no leaderboards any more: rebuilding from Postgres")
                ctx.ready, ctx.not_ready_reason = False, "rebuilding Redis from Postgres"
                await asyncio.to_thread(rebuild, ctx.settings)
                continue  # look at the marker again at once (a rebuild waits on its lock)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if not ctx.ready:
                ctx.not_ready_reason = f"waiting for Redis: {type(exc).__name__}"
        except Exception as exc:  # the rebuild failed (Postgres down?): keep trying
            log.warning("could not make Redis ready: %s", exc)
            ctx.not_ready_reason = f"rebuild failed: {exc}"
        await asyncio.sleep(READY_POLL_S)
