"""Operations endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import time

import msgspec
import redis.exceptions
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response

from service import persister_lag, tally
from service.context import Context
from service.models import encoder

log = logging.getLogger(__name__)

PG_CHECK_TIMEOUT_S = 1.0


PERSISTER_READ_EVERY_S = 1.0
"""/readyz reads the persister's state at most this often per process (polls in between get
the last reading): its cost stays flat however often a load balancer asks."""


class Persister(msgspec.Struct):
    """The persister as /readyz sees it."""

    workers: int
    """Workers whose heartbeat is fresh (seen within the last 10 s)."""
    lag_seconds: float
    """Age of the oldest accepted increment not yet in Postgres, over every partition."""


class Readiness(msgspec.Struct):
    """Body of /readyz."""

    # "ready"; "degraded" (Postgres down, no persister worker alive, or the persister's lag
    # past SCORE_PERSISTER_LAG_DEGRADED_S: the hot path still works, `detail` says what);
    # "unavailable" (503)
    status: str
    redis: str
    postgres: str
    detail: str = ""
    persister: Persister | None = None
    """None while Redis, where the persister's state is read, does not answer."""


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Dependencies are /readyz's business."""
    return Response(b'{"status":"ok"}', media_type="application/json")


async def postgres_status(ctx: Context) -> str:
    """ "ok", or "down: <error type>" when Postgres does not answer within a second.

    /readyz is public: the error's text (psycopg's names the server's host and port) goes to
    the log only.
    """
    try:
        async with asyncio.timeout(PG_CHECK_TIMEOUT_S), ctx.pg.connection() as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:  # any failure is "down": reported, not raised
        log.info("readiness: Postgres is down: %s", exc)
        return f"down: {type(exc).__name__}"
    return "ok"


async def redis_status(ctx: Context) -> str:
    """ "ok", "loading", or "down: <why>"."""
    try:
        await ctx.reads.ping()
    except redis.exceptions.BusyLoadingError:
        return "loading"
    except redis.exceptions.RedisError as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


class PersisterProbe:
    """The persister's state for /readyz, read from Redis at most every PERSISTER_READ_EVERY_S."""

    def __init__(self) -> None:
        self._read_at = -PERSISTER_READ_EVERY_S
        self._last: Persister | None = None

    async def read(self, ctx: Context) -> Persister | None:
        """Live workers and the largest lag; None when Redis does not answer."""
        now = time.monotonic()
        if now - self._read_at < PERSISTER_READ_EVERY_S:
            return self._last
        try:
            # one after the other, on one pooled connection: a connection for each would be
            # one more to find broken after a Redis restart (this client never retries)
            workers = await persister_lag.live_workers(ctx.reads)
            lags = await persister_lag.read_lags(ctx.reads, ctx.schema.all())
        except redis.exceptions.RedisError:
            self._last = None
        else:
            oldest = max((lag.oldest_age_s for lag in lags), default=0.0)
            self._last = Persister(len(workers), round(oldest, 3))
        self._read_at = now
        return self._last


def _persister_problem(state: Persister | None, threshold_s: int) -> str:
    """Why the persister makes the service degraded; "" when it does not."""
    if state is None:
        return ""  # Redis is down: that is the answer
    if state.workers == 0:
        return "no persister worker alive (run `score-service worker`)"
    if state.lag_seconds > threshold_s:
        return (
            f"the persister is {state.lag_seconds:.0f}s behind "
            f"(SCORE_PERSISTER_LAG_DEGRADED_S={threshold_s})"
        )
    return ""


async def _redis_and_persister(ctx: Context, probe: PersisterProbe) -> tuple[str, Persister | None]:
    """Redis's state, then (when it answers) the persister's: in turn, on one connection."""
    state = await redis_status(ctx)
    return state, await probe.read(ctx) if state == "ok" else None


async def readyz(request: Request) -> Response:
    """Ready when Redis answers, has loaded its data and holds the leaderboards.

    Degraded, still 200, when Postgres is down, no persister worker is alive, or the
    persister is more than SCORE_PERSISTER_LAG_DEGRADED_S behind: scores are still accepted,
    and wait in Redis until the persister catches up.
    """
    ctx: Context = request.app.state.ctx
    probe: PersisterProbe | None = getattr(request.app.state, "persister_probe", None)
    if probe is None:
        probe = request.app.state.persister_probe = PersisterProbe()
    (redis_state, persister), pg_state = await asyncio.gather(
        _redis_and_persister(ctx, probe), postgres_status(ctx)
    )
    if redis_state != "ok" or not ctx.ready or ctx.draining:
        reason = "shutting down" if ctx.draining else "" if ctx.ready else ctx.not_ready_reason
        body = encoder.encode(
            Readiness("unavailable", redis_state, pg_state, reason, persister=persister)
        )
        return Response(
            body, status_code=503, media_type="application/json", headers={"Retry-After": "1"}
        )
    problems = [] if pg_state == "ok" else ["Postgres is down"]
    behind = _persister_problem(persister, ctx.settings.persister_lag_degraded_s)
    if behind:
        problems.append(behind)
    status = "degraded" if problems else "ready"
    body = encoder.encode(Readiness(status, redis_state, pg_state, "; ".join(problems), persister))
    return Response(body, media_type="application/json")


def _registry() -> CollectorRegistry | None:
    """With `serve --workers N`, every worker writes its metrics under
    PROMETHEUS_MULTIPROC_DIR and a scrape of any one of them reports all of them."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None  # one process: the default registry has everything
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(persister_lag.COLLECTOR)  # read from Redis: the same in every process
    return registry


def forget_dead_processes() -> None:
    """In multiprocess mode, drop the live gauges of worker processes that are gone: one that
    exited has done it itself (`process_exits`), one that was killed could not. Cheap: a
    listing of PROMETHEUS_MULTIPROC_DIR."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    pids = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        number = os.path.basename(path)[: -len(".db")].rsplit("_", 1)[1]
        if number.isdigit():
            pids.add(int(number))
    for pid in pids:
        if not _alive(pid):
            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def process_exits() -> None:
    """In multiprocess mode, drop this process's live gauges (its lifespan is ending)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process by now: not ours any more
        return False
    return True


async def metrics(request: Request) -> Response:
    """Prometheus exposition of the service's metrics, and the persister's lag (from Redis)."""
    await persister_lag.refresh(request.app.state.ctx)
    tally.flush()  # this process's counts, up to this request
    forget_dead_processes()
    registry = _registry()
    body = generate_latest() if registry is None else generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
