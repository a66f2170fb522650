"""The ceiling the framework allows: Starlette on the same server settings, a handler that
only parses the JSON body and returns a fixed JSON reply. No auth, no Redis.

`create_floor_app` is the same app waiting on Redis once per request (a PING through the
service's own auto-pipeline, service.batching): what a worker spends to wait on Redis at
all, before any of the hot path's own work. BENCH_REDIS_URL says which Redis."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import msgspec
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.batching import AutoPipeline

REPLY = b'{"message":"Score updated successfully.","user_id":"u","new_score":1}'


async def post_score(request: Request) -> Response:
    msgspec.json.decode(await request.body())
    return Response(REPLY, media_type="application/json")


async def ready(request: Request) -> Response:
    return Response(b"{}", media_type="application/json")


def create_app() -> Starlette:
    """The app for `uvicorn --factory bench.bare_app:create_app`."""
    return Starlette(
        routes=[
            Route("/api/v1/score", post_score, methods=["POST"]),
            Route("/readyz", ready, methods=["GET"]),
        ]
    )


async def post_score_after_redis(request: Request) -> Response:
    msgspec.json.decode(await request.body())
    await request.app.state.pipeline.execute("PING")
    return Response(REPLY, media_type="application/json")


def create_floor_app() -> Starlette:
    """The app for `uvicorn --factory bench.bare_app:create_floor_app`."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
        app.state.pipeline = AutoPipeline.for_client(client, timeout=5.0)
        if app.state.pipeline is None:  # every request would answer 500: measure nothing
            raise RuntimeError(f"no auto-pipeline for {os.environ['BENCH_REDIS_URL']}")
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route("/api/v1/score", post_score_after_redis, methods=["POST"]),
            Route("/readyz", ready, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
