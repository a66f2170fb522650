"""GET /openapi.json: the API description, its schemas generated from the wire Structs."""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service import models

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(ref: str) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    return {"required": True, "content": {"application/json": {"schema": schema}}}


@cache
def document() -> bytes:
    """The OpenAPI 3.1 document, built once."""
    _, components = msgspec.json.schema_components(
        [
            models.ScoreUpdate,
            models.ScoreUpdated,
            models.Leaderboard,
            models.UserScore,
            models.UsersRequest,
            models.UsersProvisioned,
            models.AdjustmentsRequest,
            models.AdjustmentsApplied,
            models.Problem,
        ],
        ref_template="#/components/schemas/{name}",
    )
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    unavailable = _problem("Redis is unavailable or loading (Retry-After)")
    paths: dict[str, Any] = {
        "/api/v1/score": {
            "post": {
                "summary": "Add to the caller's own score",
                "security": bearer,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,200}$"},
                        "description": "A retry with the same key returns the first result.",
                    }
                ],
                "requestBody": _body("ScoreUpdate"),
                "responses": {
                    "200": _json("ScoreUpdated", "The new score"),
                    "400": _problem("Invalid body, or the total would pass 2^53-1"),
                    "401": _problem("Missing or invalid token"),
                    "403": _problem("The token belongs to another user"),
                    "404": _problem("Unknown user"),
                    "413": _problem("Body over 4 KiB"),
                    "415": _problem("Body is not JSON"),
                    "422": _problem("Idempotency-Key reused with another body"),
                    "429": _problem("Rate limited (Retry-After, RateLimit headers)"),
                    "503": unavailable,
                },
            }
        },
        "/api/v1/leaderboard": {
            "get": {
                "summary": "The top N with its version",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}
                ],
                "responses": {
                    "200": _json("Leaderboard", "The leaderboard"),
                    "400": _problem("Bad limit"),
                    "503": unavailable,
                },
            }
        },
        "/api/v1/users/{user_id}": {
            "get": {
                "summary": "A user's score and rank",
                "parameters": [
                    {
                        "name": "user_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json("UserScore", "Score and rank"),
                    "404": _problem("Unknown user"),
                    "503": unavailable,
                },
            }
        },
        "/api/v1/admin/users": {
            "post": {
                "summary": "Provision users (admin)",
                "security": bearer,
                "requestBody": _body("UsersRequest"),
                "responses": {
                    "200": _json("UsersProvisioned", "How many were created"),
                    "401": _problem("Missing or invalid token"),
                    "403": _problem("Not an admin token"),
                },
            }
        },
        "/api/v1/admin/scores": {
            "post": {
                "summary": "Apply score adjustments, idempotent per item (admin)",
                "security": bearer,
                "requestBody": _body("AdjustmentsRequest"),
                "responses": {
                    "200": _json("AdjustmentsApplied", "One result per item"),
                    "401": _problem("Missing or invalid token"),
                    "403": _problem("Not an admin token"),
                },
            }
        },
    }
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "score-service", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
    return msgspec.json.encode(doc)


async def openapi(request: Request) -> Response:
    return Response(document(), media_type="application/json")
