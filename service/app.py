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
from starlette.middleware import Middleware
from starlette.routing import Route

from service import tally
from service.admin import post_scores, post_users
from service.asyncapi import ASYNCAPI_PATH, asyncapi
from service.auth import Authenticator
from service.batching import Replication
from service.concurrency import ConcurrencyLimit, Slots
from service.connections import async_redis, refuse_evicting_redis
from service.context import Context, FlushRequester
from service.cors import cors_middleware
from service.errors import ApiError, api_error_handler, http_exception_handler, server_error_handler
from service.front import ScoreApp
from service.health import healthz, metrics, process_exits, readyz
from service.keys import KeySchema
from service.layout import Layout, LayoutMismatch, decode, encode, layout_of
from service.layout import problem as layout_problem
from service.live.broadcast import Broadcaster
from service.live.endpoints import live_routes
from service.live.going_away import CloseWhileDraining, hook_shutdown_signals
from service.openapi import OPENAPI_PATH, openapi
from service.page import page_routes
from service.reads import get_leaderboard, get_user
from service.request_id import RequestId
from service.scores import PATH as SCORE_PATH
from service.scores import ScoreEndpoint
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
    score = ScoreEndpoint()  # POST /api/v1/score, given its context by the lifespan

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(refuse_evicting_redis, settings)
        client = async_redis(settings)
        reads = async_redis(settings, reads_only=True)
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
            reads=reads,
            scripts=Scripts(
                client, Replication(settings.redis_min_replicas, settings.redis_wait_ms)
            ),
            auth=Authenticator(settings),
            pg=pg,
            request_flush=request_flush,
        )
        app.state.ctx = ctx
        score.ctx = ctx
        if ctx.auth.jwks is not None:
            await ctx.auth.jwks.start()
        with contextlib.suppress(redis.exceptions.RedisError, LayoutMismatch):
            # ready from the first request when Redis holds the leaderboards (of our layout):
            # uvicorn accepts connections only once this startup is done
            marked, recorded = await _read_state(ctx)
            ctx.ready = marked and layout_problem(recorded, settings) is None
        readiness = asyncio.create_task(keep_ready(ctx, rebuild))
        tallying = asyncio.create_task(tally.keep_flushing())
        await live.start()
        unhook_signals = hook_shutdown_signals(ctx, live)
        try:
            yield
        finally:
            unhook_signals()
            await live.stop()
            await cancel_and_wait(readiness)
            await cancel_and_wait(tallying)  # and flushes what is left
            if ctx.auth.jwks is not None:
                await ctx.auth.jwks.stop()
            await pg.close()
            await client.aclose()
            await reads.aclose()
            process_exits()  # `serve --workers N`: this worker's live gauges go with it

    routes = [
        # its POSTs are taken before the middleware (ScoreApp), but with CORS configured
        Route(SCORE_PATH, score, methods=["POST"]),
        Route("/api/v1/leaderboard", get_leaderboard, methods=["GET"]),
        Route("/api/v1/users/{user_id:path}", get_user, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/api/v1/admin/users", post_users, methods=["POST"]),
        Route("/api/v1/admin/scores", post_scores, methods=["POST"]),
        Route(OPENAPI_PATH, openapi, methods=["GET"]),
        Route(ASYNCAPI_PATH, asyncapi, methods=["GET"]),
        *live_routes(live),
        *page_routes(settings),
    ]
    slots = Slots(settings.max_concurrency)
    cors = cors_middleware(settings)
    return ScoreApp(
        score=score,
        slots=slots,
        cors=bool(cors),
        access_log=settings.access_log,
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(RequestId, access_log=settings.access_log),
            *cors,  # refusals below carry the CORS headers too
            Middleware(CloseWhileDraining),
            Middleware(ConcurrencyLimit, slots=slots),
        ],
        exception_handlers={
            ApiError: api_error_handler,
            HTTPException: http_exception_handler,
            Exception: server_error_handler,
        },
    )


async def keep_ready(ctx: Context, rebuild: Rebuild | None) -> None:
    """Say through `ctx.ready` whether Redis holds the leaderboards, for as long as we run.

    Redis without a partition's ready marker (new, or it lost its data while we run: a
    restart without its AOF, a failover to an empty replica) is rebuilt from Postgres; until
    then requests get 503, never a 404 for a user who exists. (Between a wipe and the next
    poll the hot path's own Lua call sees the marker missing and answers NOT_READY: 503.)
    A Redis that is merely down changes nothing here: requests get 503 from the Redis error
    itself, and it comes back with its data.

    The partition layout Redis records is checked on every poll: while `partitions set` runs,
    or once it has changed the layout to another count than ours, requests get 503 with the
    reason, rather than writes into partitions that are no longer the users'.
    """
    schema = ctx.schema
    # Without a rebuild hook (an app embedded in tests), a new Redis is taken as it is, once;
    # one that loses its data later stays not ready until someone runs a rebuild.
    adopt = rebuild is None
    while True:
        try:
            marked, recorded = await _read_state(ctx)
            wrong_layout = layout_problem(recorded, ctx.settings)
            if wrong_layout is not None:
                # `partitions set` is running, or has changed the layout: every partition this
                # process would write to may be the wrong one
                _refuse_layout(ctx, wrong_layout)
            elif marked:
                if recorded is None:  # a deployment from before layouts were recorded
                    await ctx.redis.set(schema.layout, encode(layout_of(ctx.settings)), nx=True)
                ctx.ready, ctx.not_ready_reason = True, ""
            elif adopt:
                await ctx.redis.set(schema.layout, encode(layout_of(ctx.settings)), nx=True)
                pipe = ctx.redis.pipeline(transaction=False)  # one key each: a cluster's slots
                for marker in schema.ready_markers:
                    pipe.set(marker, "1")
                await pipe.execute()
                adopt = False
                continue
            elif rebuild is None:
                ctx.ready, ctx.not_ready_reason = False, "Redis lost its data: rebuild it"
            else:
                if ctx.ready:
                    log.warning("Redis holds no leaderboards any more: rebuilding from Postgres")
                ctx.ready, ctx.not_ready_reason = False, "rebuilding Redis from Postgres"
                await asyncio.to_thread(rebuild, ctx.settings)
                continue  # look at the marker again at once (a rebuild waits on its lock)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if not ctx.ready:
                ctx.not_ready_reason = f"waiting for Redis: {type(exc).__name__}"
        except LayoutMismatch as exc:  # found by the rebuild hook, which checks Postgres too
            _refuse_layout(ctx, str(exc))
        except Exception as exc:  # the rebuild failed (Postgres down?): keep trying
            log.warning("could not make Redis ready: %s", exc)
            # clients see the reason (/readyz, 503s): the error's type only, never its text,
            # which may name a host and port; the log above has it all
            ctx.not_ready_reason = f"rebuild failed: {type(exc).__name__}"
        await asyncio.sleep(READY_POLL_S)


async def _read_state(ctx: Context) -> tuple[bool, Layout | None]:
    """Whether Redis holds the leaderboards (the ready marker), and the layout it records."""
    markers = ctx.schema.ready_markers
    marked = await ctx.reads.exists(*markers) == len(markers)
    raw = await ctx.reads.get(ctx.schema.layout)
    return marked, None if raw is None else decode(raw)


def _refuse_layout(ctx: Context, why: str) -> None:
    """Answer 503 from now on: the partitions this process would use are not the recorded ones."""
    if ctx.ready or ctx.not_ready_reason != why:
        log.error("not serving: %s", why)
    ctx.ready, ctx.not_ready_reason = False, why
