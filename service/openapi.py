"""GET /openapi.json: every HTTP route the service serves, every status each can answer, and
the schemas, generated from the wire Structs.

The live leaderboard's frames are described by the AsyncAPI document beside it
(`service.asyncapi`, GET /asyncapi.json), which the OpenAPI document names in `x-asyncapi`.
tests/test_openapi.py fails when a route of the app is missing here, and
tests/test_openapi_fuzz.py runs schemathesis against a real server to hold the service to it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service import models
from service.admin import MAX_BODY_BYTES as ADMIN_MAX_BODY_BYTES
from service.asyncapi import ASYNCAPI_PATH
from service.concurrency import UNCOUNTED
from service.health import Readiness
from service.requests import IDEMPOTENCY_KEY
from service.scores import MAX_BODY_BYTES

OPENAPI_PATH = "/openapi.json"

Json = dict[str, Any]

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_INT_STRING = {"type": "string", "pattern": "^[0-9]+$"}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": _INT_STRING,
    }
}
_RATE_HEADERS = {
    "RateLimit": {
        "description": 'The caller\'s remaining quota: `"burst";r=<left>;t=<seconds to full>` '
        "(draft-ietf-httpapi-ratelimit-headers).",
        "required": True,
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": 'The quota: `"burst";q=<burst>;w=<seconds to refill>`.',
        "required": True,
        "schema": {"type": "string"},
    },
}
_EXAMPLE_USER = "player-1"


def _problem(description: str, headers: Json | None = None) -> Json:
    response: Json = {
        "description": description,
        "content": {"application/problem+json": {"schema": _PROBLEM}},
    }
    if headers:
        response["headers"] = headers
    return response


def _json(ref: str, description: str, headers: Json | None = None) -> Json:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    response: Json = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        response["headers"] = headers
    return response


def _body(ref: str, example: Any) -> Json:
    schema = {"$ref": f"#/components/schemas/{ref}"}
    media = {"schema": schema, "example": example}
    return {"required": True, "content": {"application/json": media}}


def _unavailable(what: str) -> Json:
    return _problem(f"{what} (Retry-After)", _RETRY_AFTER)


_UNAUTHORIZED = _problem(
    "Missing or invalid token (WWW-Authenticate: Bearer)",
    {
        "WWW-Authenticate": {
            "description": "The bearer challenge (RFC 6750).",
            "required": True,
            "schema": {"type": "string"},
        }
    },
)
_NOT_READY = "Redis is unavailable, loading or being rebuilt from Postgres"


def _admin(summary: str, request: str, example: Any, reply: str, what: str) -> Json:
    return {
        "post": {
            "summary": summary,
            "tags": ["admin"],
            "security": [{"bearer": []}],
            "requestBody": _body(request, example),
            "responses": {
                "200": _json(reply, what),
                "400": _problem("Invalid body, or a malformed Content-Length"),
                "401": _UNAUTHORIZED,
                "403": _problem("Not an admin token (the scope `score:admin`)"),
                "413": _problem(f"Body over {ADMIN_MAX_BODY_BYTES} bytes"),
                "415": _problem("Body is not JSON"),
                "503": _unavailable(_NOT_READY + ", or Postgres is unavailable"),
            },
        }
    }


def _page(summary: str, parameters: list[Json] | None = None) -> Json:
    html = {"text/html": {"schema": {"type": "string"}}}
    operation: Json = {
        "summary": summary,
        "tags": ["pages"],
        "responses": {"200": {"description": "The page", "content": html}},
    }
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _query(name: str, schema: Json, description: str) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _paths(user_id: Json) -> Json:
    """Every route: path -> operations."""
    sse_event = {
        "type": "object",
        "required": ["id", "data"],
        "properties": {
            "id": {"type": "string", "description": "The leaderboard's version"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/Leaderboard"},
            },
        },
    }
    see_asyncapi = f"The frames and close codes are described in AsyncAPI 3 at {ASYNCAPI_PATH}."
    return {
        "/api/v1/score": {
            "post": {
                "summary": "Add to the caller's own score",
                "tags": ["scores"],
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY.pattern},
                        "description": "A retry with the same key returns the first result.",
                    }
                ],
                "requestBody": _body(
                    "ScoreUpdate", {"user_id": _EXAMPLE_USER, "score_increase": 10}
                ),
                "responses": {
                    "200": _json(
                        "ScoreUpdated",
                        "The new score (Idempotent-Replayed: true for a replay)",
                        {
                            **_RATE_HEADERS,
                            "Idempotent-Replayed": {
                                "description": "`true` when this answers an earlier request "
                                "with the same Idempotency-Key.",
                                "schema": {"const": "true"},
                            },
                        },
                    ),
                    "400": _problem(
                        "Invalid body or Idempotency-Key, an increase over SCORE_MAX_INCREASE, "
                        "or the total would pass 2^53-1"
                    ),
                    "401": _UNAUTHORIZED,
                    "403": _problem("The token belongs to another user"),
                    "404": _problem("Unknown user"),
                    "413": _problem(f"Body over {MAX_BODY_BYTES} bytes"),
                    "415": _problem("Body is not JSON"),
                    "422": _problem("Idempotency-Key reused with another body"),
                    "429": _problem(
                        "Rate limited (Retry-After, RateLimit headers)",
                        {**_RETRY_AFTER, **_RATE_HEADERS},
                    ),
                    "503": _unavailable(_NOT_READY),
                },
            }
        },
        "/api/v1/leaderboard": {
            "get": {
                "summary": "The top N with its version",
                "tags": ["scores"],
                "parameters": [
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1},
                        "How many (default and maximum: SCORE_TOP_N).",
                    )
                ],
                "responses": {
                    "200": _json("Leaderboard", "The leaderboard"),
                    "400": _problem("A limit that is not an integer from 1 to SCORE_TOP_N"),
                    "503": _unavailable(_NOT_READY),
                },
            }
        },
        "/api/v1/users/{user_id}": {
            "get": {
                "summary": "A user's score and rank",
                "tags": ["scores"],
                "parameters": [
                    {
                        "name": "user_id",
                        "in": "path",
                        "required": True,
                        "schema": user_id,
                        "example": _EXAMPLE_USER,
                    }
                ],
                "responses": {
                    "200": _json("UserScore", "Score and rank"),
                    "400": _problem("Not a valid user id (empty, too long, control characters)"),
                    "404": _problem("Unknown user"),
                    "503": _unavailable(_NOT_READY),
                },
            }
        },
        "/api/v1/admin/users": _admin(
            "Provision users (admin)",
            "UsersRequest",
            {"user_ids": [_EXAMPLE_USER, "player-2"]},
            "UsersProvisioned",
            "How many were created",
        ),
        "/api/v1/admin/scores": _admin(
            "Apply score adjustments, idempotent per item (admin)",
            "AdjustmentsRequest",
            {"adjustments": [{"user_id": _EXAMPLE_USER, "delta": -5, "idempotency_key": "fix-1"}]},
            "AdjustmentsApplied",
            "One result per item",
        ),
        "/api/v1/leaderboard/ws": {
            "get": {
                "summary": "The live leaderboard over WebSocket",
                "description": "Open it with a WebSocket client. " + see_asyncapi,
                "tags": ["live"],
                "responses": {
                    "101": {"description": "Switching to the WebSocket protocol"},
                    "403": {"description": "The Origin may not open the live leaderboard"},
                    "426": _problem(
                        "A plain HTTP GET: use a WebSocket client",
                        {"Upgrade": {"required": True, "schema": {"const": "websocket"}}},
                    ),
                },
            }
        },
        "/api/v1/leaderboard/stream": {
            "get": {
                "summary": "The live leaderboard as Server-Sent Events",
                "description": "One event per leaderboard version, the first at once. "
                + see_asyncapi,
                "tags": ["live"],
                "parameters": [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "The last version seen: nothing older is sent again.",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "The stream: each event's data is a leaderboard frame",
                        "content": {"text/event-stream": {"itemSchema": sse_event}},
                    },
                    "403": _problem("The Origin may not open the live leaderboard"),
                    "503": _unavailable("A connection limit is reached, or no leaderboard yet"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "tags": ["operations"],
                "responses": {"200": _json("Health", "Alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: Redis answers and holds the leaderboards",
                "tags": ["operations"],
                "responses": {
                    "200": _json("Readiness", "Ready, or degraded (Postgres down)"),
                    "503": _json("Readiness", "Not ready (Retry-After)", _RETRY_AFTER),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "tags": ["operations"],
                "responses": {
                    "200": {
                        "description": "The Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        OPENAPI_PATH: {
            "get": {
                "summary": "This document (OpenAPI 3.1)",
                "tags": ["operations"],
                "responses": {"200": _json("Document", "The OpenAPI document")},
            }
        },
        ASYNCAPI_PATH: {
            "get": {
                "summary": "The live leaderboard's channels and frames (AsyncAPI 3.0)",
                "tags": ["operations"],
                "responses": {"200": _json("Document", "The AsyncAPI document")},
            }
        },
        "/": _page("The live leaderboard page"),
        "/embed": _page(
            "The live leaderboard for an iframe (options read by the page's script)",
            [
                _query("limit", {"type": "string"}, "Rows to show."),
                _query("heading", {"type": "string"}, "The heading."),
                _query("theme", {"type": "string"}, "`light` or `dark`."),
            ],
        ),
        "/static/{path}": {
            "get": {
                "summary": "The pages' script and styles",
                "tags": ["pages"],
                "parameters": [
                    {
                        "name": "path",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "example": "leaderboard.js",
                    }
                ],
                "responses": {
                    "200": {"description": "The file", "content": {"*/*": {}}},
                    "304": {"description": "Not modified (If-None-Match, If-Modified-Since)"},
                    "404": _problem("No such file"),
                },
            }
        },
    }


@cache
def document() -> bytes:
    """The OpenAPI 3.1 document, built once."""
    (user_id, *_), components = msgspec.json.schema_components(
        [
            models.UserId,
            models.ScoreUpdate,
            models.ScoreUpdated,
            models.Leaderboard,
            models.UserScore,
            models.UsersRequest,
            models.UsersProvisioned,
            models.AdjustmentsRequest,
            models.AdjustmentsApplied,
            models.Problem,
            Readiness,
        ],
        ref_template="#/components/schemas/{name}",
    )
    components["Health"] = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"const": "ok"}},
    }
    components["Document"] = {"type": "object"}
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "score-service",
            "version": "1",
            "description": "A real-time game leaderboard. Errors are RFC 9457 problem+json. "
            f"The live leaderboard's WebSocket and SSE frames: AsyncAPI 3 at {ASYNCAPI_PATH}.",
        },
        "x-asyncapi": ASYNCAPI_PATH,
        "paths": _with_overload(_paths(user_id)),
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
    return msgspec.json.encode(doc)


def _with_overload(paths: Json) -> Json:
    """Add what any route may answer under load (service.concurrency: 503 once
    SCORE_MAX_CONCURRENCY requests run) and any POST to a slow client (408 once the body takes
    longer than SCORE_BODY_TIMEOUT_S), where the route does not say it already."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path not in UNCOUNTED:
                responses.setdefault("503", _unavailable("Too many requests at once"))
            if method == "post":
                responses.setdefault("408", _problem("The body took too long to arrive"))
    return paths


async def openapi(request: Request) -> Response:
    return Response(document(), media_type="application/json")
