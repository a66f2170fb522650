"""POST /api/v1/score: the hot path.

The checks run in the order the contract fixes: body size (413), token (401), body (400),
token user = body user (403), then one Lua call for rate limit (429), idempotency (422),
user existence (404) and range (400). Nothing is written unless every check passes.
"""

from __future__ import annotations

import logging
import math
import time
from functools import lru_cache

import msgspec
from prometheus_client import Counter, Histogram
from starlette.types import Receive, Scope, Send

from service.auth import Principal
from service.context import Context
from service.errors import SERVER_ERROR, ApiError, problem
from service.models import ScoreUpdate, ScoreUpdated, encoder, score_update_decoder
from service.redis_errors import REDIS_ERRORS, not_ready, refuse_until_ready
from service.redis_errors import answer as redis_answer
from service.requests import (
    Head,
    authenticate,
    decode_json,
    idempotency_key,
    read_body,
    refuse_declared_oversize,
)
from service.scripts import Call, Status, SubmitResult, prepare_submit
from service.settings import MAX_SCORE
from service.tally import CountTally, HistogramTally

log = logging.getLogger(__name__)
RawHeaders = list[tuple[bytes, bytes]]
"""A response's headers as ASGI sends them: lower-case names, latin-1 bytes."""

RESPONSES = Counter(
    "score_update_responses", "POST /api/v1/score responses by status code", ["status"]
)
ACCEPTED = CountTally(RESPONSES.labels("200"))  # counted in the process: service.tally
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""From half a millisecond (a request alone on a fast host) to a second (an outage's timeout)."""
LATENCY = Histogram(
    "score_update_duration_seconds",
    "POST /api/v1/score: time in the handler, from the request to its response, by status code",
    ["status"],
    buckets=LATENCY_BUCKETS_S,
)
ACCEPTED_LATENCY = HistogramTally(LATENCY.labels("200"))
REDIS_LATENCY = HistogramTally(
    Histogram(
        "score_update_redis_seconds",
        "POST /api/v1/score: the submit_score call to Redis (one batched round trip), its own time",
        buckets=LATENCY_BUCKETS_S,
    )
)

MAX_BODY_BYTES = 4096


def rate_headers(ctx: Context, result: SubmitResult) -> RawHeaders:
    """IETF RateLimit headers (draft-ietf-httpapi-ratelimit-headers) and Retry-After, as the
    ASGI response's raw headers: the hot path sends them as they are."""
    reset = max(0, math.ceil(result.reset_after_us / 1_000_000))
    headers = [
        (b"ratelimit-policy", _policy(ctx.settings.rate_interval_us, ctx.settings.rate_burst)),
        (b"ratelimit", b'"burst";r=%d;t=%d' % (result.remaining, reset)),
    ]
    if result.status is Status.RATE_LIMITED:
        retry_s = max(1, math.ceil(result.retry_after_us / 1_000_000))
        headers.append((b"retry-after", b"%d" % retry_s))
    return headers


@lru_cache(maxsize=16)  # the same for every request of a process
def _policy(interval_us: int, burst: int) -> bytes:
    window = max(1, math.ceil(interval_us * burst / 1_000_000))
    return b'"burst";q=%d;w=%d' % (burst, window)


def _refusal(status: int, detail: str, headers: RawHeaders) -> ApiError:
    return ApiError(status, detail, {k.decode("latin-1"): v.decode("latin-1") for k, v in headers})


class ScoreEndpoint:
    """The route's ASGI app, without the Request and Response objects a function endpoint
    gets: the hot path reads the four headers it needs in one pass and sends one prepared
    header list. It answers every request itself: a refusal as the app's ApiError handler
    would, a bug as a logged 500. Requests come straight from ScoreApp (service.front),
    which passes the headers the middleware would have added, or, with CORS configured,
    through the middleware and the router, with none.

    Between the request's task and the reply from Redis there are as few coroutines as it
    takes (ScoreApp, `serve`, `Scripts.submit`): each level is run again when the reply
    comes, and the checks around the call are plain functions."""

    def __init__(self) -> None:
        self.ctx: Context | None = None
        """The app's context, once its lifespan has made it (service.app)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.serve(scope, Head.of(scope), receive, send, [])

    async def serve(
        self, scope: Scope, head: Head, receive: Receive, send: Send, extra: RawHeaders
    ) -> int:
        """Add `score_increase` to the caller's own score (`head`: the request's headers),
        `extra` headers added to the response: its status. The checks in the contract's
        order (the module's docstring)."""
        started = time.perf_counter()
        try:
            ctx = self.ctx
            if ctx is None:
                raise RuntimeError("the app's lifespan has not started")
            refuse_declared_oversize(head, MAX_BODY_BYTES)
            principal = ctx.auth.known(head.authorization) or await authenticate(ctx, head)
            body = await read_body(ctx, head, receive, MAX_BODY_BYTES)
            update, call = _checked(ctx, head, principal, body)
            sent = time.perf_counter()
            try:
                result = await ctx.scripts.submit(call)
            except REDIS_ERRORS as exc:
                raise redis_answer(exc) from None
            REDIS_LATENCY.observe(time.perf_counter() - sent)
            headers, body = _reply(ctx, update, result)
        except ApiError as exc:
            status, detail, more = exc.status, exc.detail, exc.headers
        except Exception:
            log.exception("POST %s failed", PATH)
            status, detail, more = 500, SERVER_ERROR, {}
        else:
            raw = [*_JSON_HEAD, (b"content-length", b"%d" % len(body)), *extra, *headers]
            await send({"type": "http.response.start", "status": 200, "headers": raw})
            await send({"type": "http.response.body", "body": body})
            ACCEPTED.inc()
            ACCEPTED_LATENCY.observe(time.perf_counter() - started)
            return 200
        RESPONSES.labels(str(status)).inc()
        LATENCY.labels(str(status)).observe(time.perf_counter() - started)
        refusal = problem(status, detail, more)
        refusal.raw_headers += [h for h in extra if h not in refusal.raw_headers]
        await refusal(scope, receive, send)
        return status


_JSON_HEAD = [(b"content-type", b"application/json")]
PATH = "/api/v1/score"


def _checked(
    ctx: Context, head: Head, principal: Principal, body: bytes
) -> tuple[ScoreUpdate, Call[SubmitResult]]:
    """The request's checks after the token and before Redis (body, Idempotency-Key, token
    user = body user, readiness): the update and its call, or ApiError."""
    update: ScoreUpdate = decode_json(head, body, score_update_decoder)
    if update.score_increase > ctx.settings.max_increase:
        raise ApiError(
            400, f"score_increase must be at most {ctx.settings.max_increase} (SCORE_MAX_INCREASE)"
        )
    key = idempotency_key(head)
    if principal.user_id != update.user_id:
        raise ApiError(403, "the token belongs to another user than the body's user_id")
    call = prepare_submit(
        ctx.settings,
        ctx.schema,
        update.user_id,
        update.score_increase,
        idempotency_key=key,
    )
    refuse_until_ready(ctx)
    return update, call


def _reply(ctx: Context, update: ScoreUpdate, result: SubmitResult) -> tuple[RawHeaders, bytes]:
    """The response's headers and body for what Redis said, or ApiError for a refusal."""
    status = result.status
    if status is Status.NOT_READY:
        raise not_ready()
    headers = rate_headers(ctx, result)
    if status is Status.RATE_LIMITED:
        raise _refusal(429, "too many score updates: retry after the Retry-After delay", headers)
    if status is Status.UNKNOWN_USER:
        raise _refusal(404, f"user {update.user_id!r} not found", headers)
    if status is Status.OUT_OF_RANGE:
        raise _refusal(
            400,
            f"the new score would exceed {MAX_SCORE} (2^53-1), the largest exact score",
            headers,
        )
    if status is Status.IDEMPOTENCY_MISMATCH:
        raise _refusal(
            422, "this Idempotency-Key was already used with a different request body", headers
        )
    if result.flush and ctx.request_flush is not None:
        ctx.request_flush(ctx.schema.for_user(update.user_id).index)
    if status is Status.REPLAY:
        headers.append((b"idempotent-replayed", b"true"))
    reply = ScoreUpdated(
        message="Score updated successfully.",
        user_id=update.user_id,
        new_score=result.total,
        # a partition's rank is not the global one; 0: a replay whose record does not know
        # the first response's rank (restored by a rebuild)
        rank=result.rank if ctx.settings.partitions == 1 and result.rank > 0 else msgspec.UNSET,
    )
    return headers, encoder.encode(reply)
