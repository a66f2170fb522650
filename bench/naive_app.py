"""What a studio would build instead: the same endpoint on Postgres alone.

Same auth (service.auth), same body validation; then `UPDATE ... RETURNING` the new score and
`SELECT` the top 10 (for the broadcast) on an indexed table. Kept as the baseline the real
service is measured against. Configured by NAIVE_DATABASE_URL and the service's JWT settings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.auth import Authenticator, AuthError
from service.models import ScoreUpdate
from service.settings import Settings

SCHEMA = """
CREATE TABLE IF NOT EXISTS players (user_id text PRIMARY KEY, score bigint NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS players_score ON players (score DESC, user_id);
"""
UPDATE = "UPDATE players SET score = score + %s WHERE user_id = %s RETURNING score"
TOP = "SELECT user_id, score FROM players ORDER BY score DESC, user_id LIMIT 10"
POOL_SIZE = 8


def setup_database(url: str, user_ids: list[str]) -> None:
    """Create the table and provision `user_ids` at score 0."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO players (user_id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING",
            (user_ids,),
        )


def create_app() -> Starlette:
    """The app for `uvicorn --factory bench.naive_app:create_app`."""
    settings = Settings.from_env()
    auth = Authenticator(settings)
    decoder = msgspec.json.Decoder(ScoreUpdate)
    pool = AsyncConnectionPool(
        os.environ["NAIVE_DATABASE_URL"],
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        open=False,
        kwargs={"autocommit": True},
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.open(wait=True)
        yield
        await pool.close()

    async def post_score(request: Request) -> Response:
        try:
            principal = await auth.authenticate(request.headers.get("authorization"))
        except AuthError as exc:
            return JSONResponse({"detail": str(exc)}, 401)
        try:
            update = decoder.decode(await request.body())
        except msgspec.MsgspecError as exc:
            return JSONResponse({"detail": str(exc)}, 400)
        if principal.user_id != update.user_id:
            return JSONResponse({"detail": "not your user"}, 403)
        async with pool.connection() as conn:
            row = await (
                await conn.execute(UPDATE, (update.score_increase, update.user_id))
            ).fetchone()
            if row is None:
                return JSONResponse({"detail": "unknown user"}, 404)
            await (await conn.execute(TOP)).fetchall()  # what the broadcast would send
        return JSONResponse(
            {
                "message": "Score updated successfully.",
                "user_id": update.user_id,
                "new_score": row[0],
            }
        )

    async def ready(request: Request) -> Response:
        return JSONResponse({})

    return Starlette(
        routes=[
            Route("/api/v1/score", post_score, methods=["POST"]),
            Route("/readyz", ready, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
