"""The ceiling the framework allows: Starlette on the same server settings, a handler that
only parses the JSON body and returns a fixed JSON reply. No auth, no Redis."""

from __future__ import annotations

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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
