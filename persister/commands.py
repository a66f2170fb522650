"""The persister's CLI commands, registered into `score-service` by service.cli."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from service.settings import Settings

# The commands' modules are imported when a command runs: `score-service token` need not load
# RQ and psycopg.


def cmd_worker(args: argparse.Namespace) -> int:
    from persister.worker import run

    return run(Settings.for_stores())


def cmd_rebuild(args: argparse.Namespace) -> int:
    from persister.layout import ensure
    from persister.rebuild import rebuild

    settings = Settings.for_stores()
    ensure(settings)
    done = rebuild(settings, force=True)
    assert done is not None  # forced: it always runs
    print(
        f"rebuilt Redis from Postgres: {done.users} users, {done.unpersisted} increments not yet "
        f"persisted included, {done.replayed} accepted during the rebuild replayed, "
        f"{done.records} Idempotency-Key records restored, in {done.seconds:.1f}s"
    )
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from persister.layout import ensure
    from persister.reconcile import reconcile, render

    settings = Settings.for_stores()
    ensure(settings)
    report = reconcile(settings, repair=args.repair)
    print(render(report))
    return 0 if report.clean else 1


def _worker(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the persister: an RQ worker (with its scheduler) that drains the events streams "
        "into Postgres, and sweeps every partition every few seconds."
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


COMMANDS: list[tuple[str, Callable[[argparse.ArgumentParser], None]]] = [
    ("worker", _worker),
    ("rebuild", _rebuild),
    ("reconcile", _reconcile),
]
