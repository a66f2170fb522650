"""What the routes that take a body share: the token check, the body read within its size and
time limits, JSON decoding, and the Idempotency-Key header. (POST /api/v1/score and the admin
API use them; each has its own size limit.)"""

from __future__ import annotations

import asyncio
import re
from typing import TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from service.auth import AuthError, Principal
from service.context import Context
from service.errors import ApiError

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
BEARER_CHALLENGE = 'Bearer realm="score-service", error="invalid_token"'
T = TypeVar("T")
_JSON_TYPES = ("application/json", "application/problem+json")


def refuse_declared_oversize(request: Request, limit: int) -> None:
    """413 when the declared Content-Length is over `limit`: the first check, before the
    token, so a large body is refused without reading it."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body must be at most {limit} bytes")


async def authenticate(ctx: Context, request: Request) -> Principal:
    """Whose bearer token the request carries; 401 with a challenge when it has none valid."""
    try:
        return await ctx.auth.authenticate(request.headers.get("authorization"))
    except AuthError as exc:
        raise ApiError(401, str(exc), {"WWW-Authenticate": BEARER_CHALLENGE}) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body (after the token check), 400 for a malformed Content-Length, 413 as
    soon as it is known to be larger than `limit`, 408 (and the connection closed) unless
    the whole body arrives within SCORE_BODY_TIMEOUT_S.

    A chunked body is counted as it arrives, so no body larger than `limit` is ever held in
    memory; a client that sends its headers and then trickles or stops holds its request
    for that long at most.
    """
    ctx: Context = request.app.state.ctx
    timeout_s = ctx.settings.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g}s (SCORE_BODY_TIMEOUT_S)",
            {"Connection": "close"},  # the rest of the body may still come: no next request
        ) from None


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"the request body must be at most {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "the Content-Length header is not a number of bytes")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before sending the whole body") from None
    return bytes(body)


def decode_json(request: Request, body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode and validate a JSON body; 415/400 with msgspec's explanation on failure."""
    content_type = request.headers.get("content-type", "application/json")
    if content_type.split(";")[0].strip().lower() not in _JSON_TYPES:
        raise ApiError(415, f"send the body as application/json, not {content_type!r}")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None


def idempotency_key(request: Request) -> str | None:
    """The Idempotency-Key header, if sent; 400 unless it is 1-200 printable ASCII characters."""
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "Idempotency-Key must be 1-200 printable ASCII characters")
    return key
