"""The persister's CLI commands, registered into `score-service` by service.cli."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable

from service.progress import Meter, rate
from service.settings import Settings

# The commands' modules are imported when a command runs: `score-service token` need not load
# RQ and psycopg.


def cmd_worker(args: argparse.Namespace) -> int:
    from persister.worker import run

    if args.check:
        return check_worker(Settings.for_stores())
    return run(Settings.for_stores())


def check_worker(settings: Settings) -> int:
    """`worker --check`: 0 when a worker of this host has a fresh heartbeat, 1 otherwise
    (none, or Redis does not answer). For process managers and container health checks."""
    import asyncio
    import socket

    import redis

    from service.connections import async_redis
    from service.persister_lag import HEARTBEAT_FRESH_S, live_workers

    async def mine() -> list[str]:
        client = async_redis(settings)
        try:
            return [w for w in await live_workers(client) if w.startswith(host + ":")]
        finally:
            await client.aclose()

    host = socket.gethostname()
    try:
        workers = asyncio.run(mine())
    except redis.RedisError as exc:
        print(f"unhealthy: cannot read the heartbeats from Redis: {type(exc).__name__}")
        return 1
    if not workers:
        print(f"unhealthy: no persister worker on {host} beat in the last {HEARTBEAT_FRESH_S:.0f}s")
        return 1
    print(f"healthy: {', '.join(sorted(workers))}")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from persister.layout import ensure
    from persister.rebuild import rebuild

    settings = Settings.for_stores()
    ensure(settings)
    with Meter("rebuild") as meter:
        done = rebuild(settings, force=True, progress=meter)
    assert done is not None  # forced: it always runs
    print(
        f"rebuilt Redis from Postgres: {done.users} users, {done.unpersisted} increments not yet "
        f"persisted included, {done.replayed} accepted during the rebuild replayed, "
        f"{done.records} Idempotency-Key records restored, in {done.seconds:.1f}s "
        f"(users at {rate(done.users, done.seconds)})"
    )
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from persister.layout import ensure
    from persister.reconcile import reconcile, render

    settings = Settings.for_stores()
    ensure(settings)
    with Meter("reconcile") as meter:
        report = reconcile(settings, repair=args.repair, progress=meter)
    print(render(report))
    return 0 if report.clean else 1


def cmd_ledger_prune(args: argparse.Namespace) -> int:
    from persister.layout import ensure
    from persister.prune import prune

    settings = Settings.for_stores()
    ensure(settings)
    with Meter("ledger prune") as meter:
        done = prune(settings, args.before, progress=meter)
    print(
        f"ledger: pruned {done.events} events recorded before {args.before.isoformat()} "
        f"({done.users} users' totals carried forward), {done.pages} pages scanned "
        f"in {done.seconds:.1f}s ({rate(done.events, done.seconds)})"
    )
    return 0


def _date(text: str) -> dt.datetime:
    """An ISO 8601 date or time; UTC unless it says otherwise."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date: {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def _worker(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the persister: an RQ worker that drains the events streams "
        "into Postgres, and sweeps every partition every few seconds."
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="health check: exit 0 when a worker on this host is alive (a fresh heartbeat in "
        "Redis), 1 otherwise",
    )
    p.set_defaults(func=cmd_worker)


def _rebuild(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Rebuild Redis's leaderboards and top-N from Postgres, plus the increments still "
        "waiting in Redis. Safe while the service runs."
    )
    p.set_defaults(func=cmd_rebuild)


def _reconcile(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Compare every user's score in Redis with Postgres (counting increments not yet "
        "persisted) and check that each score is the sum of its events. Exit 0 when there is "
        "no drift, 1 otherwise."
    )
    p.add_argument("--repair", action="store_true", help="make Redis agree with Postgres")
    p.set_defaults(func=cmd_reconcile)


def _ledger(p: argparse.ArgumentParser) -> None:
    p.description = "The ledger of score events (score_events) in Postgres."
    actions = p.add_subparsers(dest="action", required=True)
    prune = actions.add_parser(
        "prune",
        help="delete the ledger's rows older than DATE, keeping each user's sum",
        description="Delete the ledger's rows of events recorded before DATE, carrying each "
        "user's sum forward (reconcile still checks every score). Refused (exit 2) for a DATE "
        "less than a day old, inside the Idempotency-Key window, or newer than the oldest "
        "event Redis still holds for the persister. Safe while everything runs.",
    )
    prune.add_argument(
        "--before", type=_date, required=True, metavar="DATE", help="ISO 8601; UTC by default"
    )
    prune.set_defaults(func=cmd_ledger_prune)


COMMANDS: list[tuple[str, Callable[[argparse.ArgumentParser], None]]] = [
    ("worker", _worker),
    ("rebuild", _rebuild),
    ("reconcile", _reconcile),
    ("ledger", _ledger),
]
