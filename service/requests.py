"""What the routes that take a body share: the token check, the body read within its size and
time limits, JSON decoding, and the Idempotency-Key header, on the ASGI scope and `receive`
(POST /api/v1/score is a raw ASGI app: no Starlette Request on the hot path). The admin API
uses them too; each route has its own size limit."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import TypeVar

import msgspec
from starlette.types import Receive, Scope

from service.auth import AuthError, Principal
from service.context import Context
from service.errors import ApiError

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")
BEARER_CHALLENGE = 'Bearer realm="score-service", error="invalid_token"'
T = TypeVar("T")
_JSON_TYPES = ("application/json", "application/problem+json")


@dataclass(slots=True)
class Head:
    """The headers the body-taking routes read, picked from the ASGI scope in one pass (the
    first of each, as Starlette's Headers.get would give it)."""

    authorization: str | None = None
    content_length: str | None = None
    content_type: str | None = None
    idempotency_key: str | None = None
    request_id: str | None = None  # X-Request-ID, as sent (service.request_id checks it)

    @classmethod
    def of(cls, scope: Scope) -> Head:
        head = cls()
        for name, value in scope["headers"]:
            field = _HEAD_FIELDS.get(name)
            if field is not None and getattr(head, field) is None:
                setattr(head, field, value.decode("latin-1"))
        return head


_HEAD_FIELDS = {
    b"authorization": "authorization",
    b"content-length": "content_length",
    b"content-type": "content_type",
    b"idempotency-key": "idempotency_key",
    b"x-request-id": "request_id",
}


def refuse_declared_oversize(head: Head, limit: int) -> None:
    """413 when the declared Content-Length is over `limit`: the first check, before the
    token, so a large body is refused without reading it."""
    declared = head.content_length or ""
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body must be at most {limit} bytes")


async def authenticate(ctx: Context, head: Head) -> Principal:
    """Whose bearer token the request carries; 401 with a challenge when it has none valid."""
    try:
        return await ctx.auth.authenticate(head.authorization)
    except AuthError as exc:
        raise ApiError(401, str(exc), {"WWW-Authenticate": BEARER_CHALLENGE}) from None


async def read_body(ctx: Context, head: Head, receive: Receive, limit: int) -> bytes:
    """The request body (after the token check), 400 for a malformed Content-Length, 413 as
    soon as it is known to be larger than `limit`, 408 (and the connection closed) unless
    the whole body arrives within SCORE_BODY_TIMEOUT_S.

    A chunked body is counted as it arrives, so no body larger than `limit` is ever held in
    memory; a client that sends its headers and then trickles or stops holds its request
    for that long at most.
    """
    if _arrived(receive):  # nothing to wait for: no timer
        return await _read_body(head, receive, limit)
    timeout_s = ctx.settings.body_timeout_s
    task = asyncio.current_task()
    assert task is not None
    # asyncio.timeout's context manager, reduced to its timer: on the hot path it cost more
    # than the rest of the body read (`python -m bench.profile`)
    expired: list[bool] = []
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, task, expired)
    try:
        return await _read_body(head, receive, limit)
    except asyncio.CancelledError:
        if not expired or task.uncancel() > 0:
            raise  # cancelled by someone else too (the server's shutdown): let it through
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g}s (SCORE_BODY_TIMEOUT_S)",
            {"Connection": "close"},  # the rest of the body may still come: no next request
        ) from None
    finally:
        timer.cancel()


def _arrived(receive: Receive) -> bool:
    """Whether the whole body is in already, so that reading it cannot wait: uvicorn's
    request cycle (whose method `receive` is) says so once its parser has seen the end of the
    message. Elsewhere (the test client), False."""
    return getattr(getattr(receive, "__self__", None), "more_body", True) is False


def _expire(task: asyncio.Task[object], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


async def _read_body(head: Head, receive: Receive, limit: int) -> bytes:
    declared = head.content_length
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "the Content-Length header is not a number of bytes")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client disconnected before sending the whole body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def decode_json(head: Head, body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode and validate a JSON body; 415/400 with msgspec's explanation on failure."""
    content_type = head.content_type
    # nearly every request says exactly application/json: parsed only when it does not
    if (
        content_type is not None
        and content_type != "application/json"
        and content_type.split(";")[0].strip().lower() not in _JSON_TYPES
    ):
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


def idempotency_key(head: Head) -> str | None:
    """The Idempotency-Key header, if sent; 400 unless it is 1-200 printable ASCII characters."""
    key = head.idempotency_key
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise ApiError(400, "Idempotency-Key must be 1-200 printable ASCII characters")
    return key
