"""GET /asyncapi.json: the live leaderboard's channels (WebSocket and SSE) and their frame, in
AsyncAPI 3.0; the frame's schema is generated from the Struct both transports send."""

from __future__ import annotations

from functools import cache

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.models import Leaderboard

ASYNCAPI_PATH = "/asyncapi.json"
WS_PATH = "/api/v1/leaderboard/ws"
SSE_PATH = "/api/v1/leaderboard/stream"

_FRAMES = (
    "The current leaderboard first, then one frame per change (at most one per "
    "SCORE_LIVE_TICK_MS). Frames carry a whole top-N, never a diff; `version` only grows, "
    "and equals the REST `GET /api/v1/leaderboard` version of the same state."
)
_WS = (
    "Clients need send nothing; a message over SCORE_LIVE_MAX_MESSAGE_BYTES closes the socket. "
    "An Origin not allowed (SCORE_CORS_ORIGINS) is refused in the handshake (403). "
    "Close codes: 1001 the server is shutting down (reconnect); 1009 the client sent too "
    "much; 1011 no answer to protocol pings; 1013 a "
    "connection limit is reached or no leaderboard is known yet (retry later); 4001 the "
    "client reads too slowly (a send waited over SCORE_LIVE_SEND_TIMEOUT_MS)."
)
_SSE = (
    "Server-Sent Events (`text/event-stream`): each event's `id` is the frame's version and "
    "its `data` the frame; send `Last-Event-ID` to skip what was already seen. The stream "
    "opens with `retry: 1000` and has `: keepalive` comments while idle. Refusals are HTTP "
    "problem+json: 403 for an Origin not allowed, 503 with Retry-After at a connection limit."
)


@cache
def document() -> bytes:
    """The AsyncAPI 3.0 document, built once."""
    (frame,), schemas = msgspec.json.schema_components(
        [Leaderboard], ref_template="#/components/schemas/{name}"
    )
    message = {"$ref": "#/components/messages/leaderboard"}

    def channel(address: str, title: str, description: str) -> dict[str, object]:
        return {
            "address": address,
            "title": title,
            "description": f"{_FRAMES} {description}",
            "messages": {"leaderboard": message},
        }

    def sends(name: str) -> dict[str, object]:
        return {
            "action": "send",
            "summary": "The service sends every leaderboard version to each client",
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/leaderboard"}],
        }

    ws = channel(WS_PATH, "The live leaderboard over WebSocket", _WS)
    ws["bindings"] = {"ws": {"method": "GET", "bindingVersion": "0.1.0"}}
    doc = {
        "asyncapi": "3.0.0",
        "info": {
            "title": "score-service live leaderboard",
            "version": "1",
            "description": "The frames of the live leaderboard. The HTTP API: /openapi.json.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "leaderboardWebSocket": ws,
            "leaderboardStream": channel(SSE_PATH, "The live leaderboard as SSE", _SSE),
        },
        "operations": {
            "sendLeaderboardWebSocket": sends("leaderboardWebSocket"),
            "sendLeaderboardStream": sends("leaderboardStream"),
        },
        "components": {
            "messages": {
                "leaderboard": {
                    "name": "leaderboard",
                    "title": "A leaderboard frame",
                    "contentType": "application/json",
                    "payload": frame,
                }
            },
            "schemas": schemas,
        },
    }
    return msgspec.json.encode(doc)


async def asyncapi(request: Request) -> Response:
    return Response(document(), media_type="application/json")
