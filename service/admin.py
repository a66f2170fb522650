"""The admin API, for operators and batch jobs. It needs an admin token: a JWT whose `scope`
claim (space-separated) includes `score:admin`.

- POST /api/v1/admin/users provisions users: Postgres first, then Redis (service.users).
- POST /api/v1/admin/scores applies a batch of adjustments. Each item is one call of the hot
  path's own Lua script (so one atomic step, appended to the same events stream the persister
  drains), with its own idempotency key; the response has one result per item. A batch cut
  short by an outage can be sent again as it is: the items already applied are replayed, not
  applied twice.

The whole body is validated before anything is written: a bad item refuses the request (400)
and changes nothing.
"""

from __future__ import annotations

import psycopg
import psycopg_pool
from starlette.requests import Request
from starlette.responses import Response

from service.context import Context
from service.errors import ApiError
from service.models import (
    AdjustmentResult,
    AdjustmentsApplied,
    AdjustmentsRequest,
    UsersProvisioned,
    UsersRequest,
    adjustments_decoder,
    encoder,
    users_request_decoder,
)
from service.redis_errors import RETRY_AFTER_S, not_ready, redis_unavailable, refuse_until_ready
from service.requests import (
    IDEMPOTENCY_KEY,
    Head,
    authenticate,
    decode_json,
    read_body,
    refuse_declared_oversize,
)
from service.scripts import Status, prepare_submit
from service.settings import ADMIN_SCOPE
from service.users import provision

MAX_BODY_BYTES = 2 * 1024 * 1024  # 10,000 user ids of up to 128 characters, with room

_RESULTS = {
    Status.OK: "applied",
    Status.REPLAY: "replayed",
    Status.UNKNOWN_USER: "unknown_user",
    Status.OUT_OF_RANGE: "out_of_range",
    Status.IDEMPOTENCY_MISMATCH: "conflict",
}


async def _admin_body(request: Request) -> tuple[Context, Head, bytes]:
    """The context, headers and body of a request made with an admin token; 401/403
    otherwise."""
    ctx: Context = request.app.state.ctx
    head = Head.of(request.scope)
    refuse_declared_oversize(head, MAX_BODY_BYTES)
    principal = await authenticate(ctx, head)
    if not principal.admin:
        raise ApiError(403, f"the admin API needs a token with the scope {ADMIN_SCOPE!r}")
    return ctx, head, await read_body(ctx, head, request.receive, MAX_BODY_BYTES)


async def post_users(request: Request) -> Response:
    """Provision users (idempotent: an existing user keeps its score)."""
    ctx, head, body = await _admin_body(request)
    wanted: UsersRequest = decode_json(head, body, users_request_decoder)
    user_ids = list(dict.fromkeys(wanted.user_ids))
    refuse_until_ready(ctx)  # e.g. while the partition layout changes: Redis's half would go astray
    try:
        async with redis_unavailable(), ctx.pg.connection() as conn:
            created = await provision(conn, ctx.scripts, ctx.schema, ctx.settings.top_n, user_ids)
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        raise ApiError(
            503,
            f"Postgres is unavailable ({type(exc).__name__}); users are provisioned there "
            "first: retry shortly",
            {"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    reply = UsersProvisioned(created=created, existing=len(user_ids) - created)
    return Response(encoder.encode(reply), media_type="application/json")


def _check(batch: AdjustmentsRequest) -> None:
    for i, item in enumerate(batch.adjustments):
        if item.delta == 0:
            raise ApiError(400, f"adjustments[{i}].delta must not be zero")
        if not IDEMPOTENCY_KEY.match(item.idempotency_key):
            raise ApiError(
                400, f"adjustments[{i}].idempotency_key must be 1-200 printable ASCII characters"
            )


async def post_scores(request: Request) -> Response:
    """Apply a batch of score adjustments (negative deltas allowed), one result per item."""
    ctx, head, body = await _admin_body(request)
    batch: AdjustmentsRequest = decode_json(head, body, adjustments_decoder)
    _check(batch)
    results: list[AdjustmentResult] = []
    flush: set[int] = set()
    refuse_until_ready(ctx)
    async with redis_unavailable():
        for item in batch.adjustments:
            call = prepare_submit(
                ctx.settings,
                ctx.schema,
                item.user_id,
                item.delta,
                idempotency_key=item.idempotency_key,
                operator=True,
            )
            result = await ctx.scripts.submit(call)
            if result.status is Status.NOT_READY:
                raise not_ready()  # the items before it are applied: the batch can be re-sent
            done = result.status in (Status.OK, Status.REPLAY)
            results.append(
                AdjustmentResult(
                    user_id=item.user_id,
                    idempotency_key=item.idempotency_key,
                    status=_RESULTS[result.status],  # type: ignore[arg-type]
                    new_score=result.total if done else None,
                )
            )
            if result.flush:
                flush.add(ctx.schema.for_user(item.user_id).index)
    if ctx.request_flush is not None:
        for partition in sorted(flush):
            ctx.request_flush(partition)
    return Response(encoder.encode(AdjustmentsApplied(results)), media_type="application/json")
