"""One soak run: start the stack, provision users, run the clients and the chaos for the
given time, stop the faults, drain, check, report; stop every process whatever happens."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from service.dev.servers import ServerError, wait_for
from service.users import provision_sync

from .check import Verdict, drain, verify
from .clients import AdminAdjuster, Gate, Player, Shared, Stats
from .driver import FAMILIES, Chaos
from .ledger import Ledger
from .report import render, unhandled
from .stack import Stack

DRAIN_S = 120.0
FINISH_S = 90.0  # in-flight keyed requests keep retrying this long once the faults stop


@dataclass
class SoakConfig:
    seconds: float = 600.0
    seed: int = 1
    families: set[str] = field(default_factory=lambda: set(FAMILIES))
    players: int = 3
    users: int = 30
    partitions: int = 2
    keyed_share: float = 0.6
    pace_s: float = 0.01  # a player's mean pause between increments
    max_hold_s: float = 4.0  # the longest a fault holds
    keep: bool = False  # keep the logs and data even when the soak passes


@dataclass
class SoakResult:
    failures: list[str]
    report: str


def replay_command(config: SoakConfig) -> str:
    return (
        f"make soak SOAK_SEED={config.seed} SOAK_SECONDS={config.seconds:.0f} "
        f"SOAK_FAULTS={','.join(sorted(config.families))}"
    )


def run_soak(config: SoakConfig) -> SoakResult:
    directory = Path(tempfile.mkdtemp(prefix=f"score-soak-{config.seed}-"))
    failures: list[str] = []
    stack = Stack.start(directory, config.partitions)
    stats, ledger = Stats(), Ledger()
    shared = Shared(stack.base, stack.settings, ledger, stats, Gate(), config.seed)
    chaos = Chaos(stack, shared, config.families, config.max_hold_s)
    verdict: Verdict | None = None
    try:
        users = [f"u{config.seed}-{i}" for i in range(config.users)]
        client = stack.redis_client()
        try:
            with psycopg.connect(stack.postgres.url) as conn:
                provision_sync(conn, client, stack.schema(), stack.settings.top_n, users)
        finally:
            client.close()
        ledger.provisioned(users)
        threads: list[Player | AdminAdjuster] = [
            Player(shared, i, config.keyed_share, config.pace_s) for i in range(config.players)
        ]
        if "admin" in config.families:
            threads.append(AdminAdjuster(shared, pace_s=0.5))
        stats.t0 = time.monotonic()  # the zero of timeline.log and of the report's times
        for thread in threads:
            thread.start()
        chaos.start()
        threading.Event().wait(config.seconds)  # the soak's length; nothing to wait for
        chaos.stop()
        shared.give_up_at = time.monotonic() + FINISH_S
        shared.stop.set()
        for thread in threads:
            thread.join(FINISH_S + 30)
            if thread.is_alive():
                failures.append(f"{thread.name} still running {FINISH_S:.0f}s after the end")
            if thread.error is not None:
                failures.append(f"{thread.name} failed: {thread.error!r}")
        failures += [f"chaos thread failed: {exc!r}" for exc in chaos.errors]
        failures += chaos.problems
        stack.check_alive()
        failures += stack.exited_by_themselves
        try:  # uvicorn's supervisor replaces a killed worker
            wait_for(lambda: len(stack.service_workers()) == 2, 30, "2 uvicorn workers")
        except ServerError:
            failures.append(f"uvicorn workers after the faults: {stack.service_workers()}, not 2")
        failed_drain = drain(stack, DRAIN_S)
        if failed_drain is not None:
            failures.append(failed_drain)
        else:
            verdict = verify(stack, ledger)
            failures += verdict.failures
        crashes = unhandled(directory / "serve.log")
        if crashes:
            failures.append(
                f"the service logged {len(crashes)} unhandled exceptions (500s): "
                + "; ".join(f"{n} x {e}" for e, n in Counter(crashes).most_common(5))
            )
        bad = sum(stats.violations.values())
        if bad:
            worst = ", ".join(f"{n} x {e} {o}" for (e, o), n in stats.violations.most_common(6))
            failures.append(f"{bad} answers the contract does not allow: {worst}")
    finally:
        stack.close()
        (directory / "timeline.log").write_text("\n".join(chaos.timeline) + "\n")
    report = render(
        seed=config.seed, seconds=config.seconds, families=config.families,
        injected=chaos.injected, stats=stats, ledger=ledger, notes=chaos.notes,
        failures=failures, wipes=chaos.wipes, verdict=verdict, directory=directory,
        replay=replay_command(config),
    )  # fmt: skip
    if not failures and not config.keep:
        shutil.rmtree(directory, ignore_errors=True)
    return SoakResult(failures, report)
