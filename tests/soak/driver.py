"""The chaos: a fault thread and an operator thread, each drawing every choice from its own
`random.Random` seeded from the soak's seed.

Fault families (`--faults`):
- `kill`: kill -9 of the persister, of one of uvicorn's worker processes, of Redis (restarted
  on the same port and directory: it replays its AOF), of Postgres (restarted: crash recovery).
- `stop`: SIGSTOP, then SIGCONT, of the same four.
- `proxy`: the proxy between the service and Redis, or between the persister and Postgres,
  drops replies (the server executed, the client never hears), delays, blackholes, refuses
  new connections, or resets every open one.
- `flushall`: FLUSHALL on Redis. A wipe takes the increments the persister has not committed
  yet (the README says so: they are in neither store), so the driver first holds new client
  work, lets what is in flight finish and the persister drain, then wipes; clients resume at
  once, into the rebuild.
Operator families, run concurrently with the faults:
- `rebuild`: `score-service rebuild`.
- `repair`: `score-service reconcile --repair`.
- `users`: new users through `score-service users add` and `POST /api/v1/admin/users`; the
  players start scoring for them as soon as the call returns.
- `admin`: admin adjustments (POST /api/v1/admin/scores), see clients.AdminAdjuster.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
from fault_proxy import FaultProxy, Mode

from service.dev.servers import ServerError, wait_for
from service.persister_lag import read_lags_sync

from .clients import NOT_SENT, UNKNOWN, Shared, classify
from .stack import ROOT, Stack

FAMILIES = ("kill", "stop", "proxy", "flushall", "rebuild", "repair", "users", "admin")
FAULT_FAMILIES = ("kill", "stop", "proxy", "flushall")
OPERATOR_FAMILIES = ("rebuild", "repair", "users")
CLI_TIMEOUT_S = 120.0
QUIESCE_S = 90.0
WIPE_GRACE_S = 5.0  # drift seen this soon after a FLUSHALL may be the rebuild not done yet


LAST_LAG_ERROR = [""]
"""Why the last `unpersisted` could not tell (for the report)."""


def unpersisted(stack: Stack) -> int | None:
    """Increments waiting in Redis for the persister (None: Redis did not answer)."""
    client = stack.redis_client()
    try:
        return sum(lag.unpersisted for lag in read_lags_sync(client, stack.schema().all()))
    except Exception as exc:  # Redis restarting, loading: not known now
        LAST_LAG_ERROR[0] = f"{type(exc).__name__}: {exc}"
        return None
    finally:
        client.close()


def wait_drained(stack: Stack, timeout: float, stop: threading.Event | None = None) -> bool:
    """True once no increment waits in Redis; False after `timeout` seconds."""
    drained = [False]

    def done() -> bool:
        drained[0] = unpersisted(stack) == 0
        return drained[0] or (stop is not None and stop.is_set())

    with contextlib.suppress(ServerError):
        wait_for(done, timeout, "the drain")
    return drained[0]


def last_line(output: str) -> str:
    """The last line of a command's output: the exception a traceback ends with."""
    lines = output.strip().splitlines()
    return lines[-1][:300] if lines else "(no output)"


class Chaos:
    """Runs the fault thread and the operator thread until `stop()`; counts what it did."""

    def __init__(self, stack: Stack, shared: Shared, families: set[str], max_hold_s: float):
        self.stack = stack
        self.shared = shared
        self.families = families
        self.max_hold_s = max_hold_s
        self.injected: Counter[str] = Counter()
        self.timeline: list[str] = []  # "<seconds since start> <what>", for narrowing down
        self.notes: list[str] = []  # operator commands that failed, holds that timed out
        self.problems: list[str] = []  # guarantees broken while it ran
        self.errors: list[BaseException] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._guard(self._faults), name="faults", daemon=True),
            threading.Thread(target=self._guard(self._operator), name="operator", daemon=True),
        ]
        self._users = 0
        self._last_wipe = -math.inf
        self.wipes: list[float] = []  # when each FLUSHALL ran, in seconds since the start

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop injecting, heal everything, return once both threads are done."""
        self._halt.set()
        for thread in self._threads:
            thread.join(CLI_TIMEOUT_S + 30)
        self.stack.heal()
        self.stack.check_alive()

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # the soak fails with it, never silently
                self.errors.append(exc)

        return run

    def _count(self, what: str) -> None:
        with self._lock:
            self.injected[what] += 1
        self._mark(what)

    def _mark(self, what: str) -> None:
        with self._lock:
            self.timeline.append(f"{time.monotonic() - self.shared.stats.t0:8.2f}  {what}")

    def _note(self, what: str) -> None:
        with self._lock:
            self.notes.append(f"at {time.monotonic() - self.shared.stats.t0:.2f}s {what}")

    def _hold(self, rng: random.Random) -> None:
        self._halt.wait(rng.uniform(0.2, self.max_hold_s))
        self._mark("  healed")

    # --- faults ---------------------------------------------------------------------------

    def _faults(self) -> None:
        rng = random.Random(f"{self.shared.seed}/faults")
        episodes: list[Callable[[random.Random], None]] = []
        if "kill" in self.families:
            episodes += [self._kill_persister, self._kill_service_worker, self._kill_redis,
                         self._kill_postgres]  # fmt: skip
        if "stop" in self.families:
            episodes += [self._stop("persister"), self._stop("service worker"),
                         self._stop("redis"), self._stop("postgres")]  # fmt: skip
        if "proxy" in self.families:
            episodes += [self._proxy("service->redis"), self._proxy("persister->postgres")] * 2
        if "flushall" in self.families:
            episodes.append(self._flushall)
        while episodes and not self._halt.wait(rng.uniform(0.5, 2.5)):
            rng.choice(episodes)(rng)
            self.stack.check_alive()

    def _kill_persister(self, rng: random.Random) -> None:
        self._count("kill -9 persister")
        self.stack.kill_persister()
        self._hold(rng)
        self.stack.start_persister()

    def _kill_service_worker(self, rng: random.Random) -> None:
        workers = sorted(self.stack.service_workers())
        if not workers:
            self._note("no uvicorn worker to kill (the supervisor is restarting them)")
            return
        self._count("kill -9 service worker")
        with contextlib.suppress(ProcessLookupError):
            os.kill(rng.choice(workers), signal.SIGKILL)
        # uvicorn's supervisor starts another one

    def _kill_redis(self, rng: random.Random) -> None:
        self._count("kill -9 redis")
        self.stack.kill_redis()
        self._hold(rng)
        self.stack.start_redis()

    def _kill_postgres(self, rng: random.Random) -> None:
        self._count("kill -9 postgres")
        self.stack.kill_postgres()
        self._hold(rng)
        self.stack.start_postgres()

    def _stop(self, target: str) -> Callable[[random.Random], None]:
        def episode(rng: random.Random) -> None:
            if target == "service worker":
                workers = sorted(self.stack.service_workers())
                if not workers:
                    return
                pid = rng.choice(workers)

                def send(sig: int) -> None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            else:
                send = {
                    "persister": self.stack.signal_persister,
                    "redis": self.stack.signal_redis,
                    "postgres": self.stack.signal_postgres,
                }[target]
            self._count(f"SIGSTOP/SIGCONT {target}")
            send(signal.SIGSTOP)
            try:
                self._hold(rng)
            finally:
                send(signal.SIGCONT)

        return episode

    def _proxy(self, which: str) -> Callable[[random.Random], None]:
        proxy: FaultProxy = (
            self.stack.redis_proxy if which == "service->redis" else self.stack.pg_proxy
        )

        def episode(rng: random.Random) -> None:
            mode = rng.choice([Mode.DROP_REPLIES, Mode.DELAY, Mode.BLACKHOLE, Mode.REFUSE, "reset"])
            if mode == "reset":
                self._count(f"proxy {which}: reset all")
                proxy.reset_all()
                return
            assert isinstance(mode, Mode)
            delay = rng.uniform(0.05, 1.5) if mode is Mode.DELAY else 0.0
            self._count(f"proxy {which}: {mode.value}")
            proxy.set(mode, delay)
            try:
                self._hold(rng)
            finally:
                # refuse new connections while the old ones are reset: a blackholed connection
                # lost bytes mid-stream and must not carry anything after them
                proxy.set(Mode.REFUSE)
                proxy.reset_all()
                proxy.set(Mode.PASS)

        return episode

    def _flushall(self, rng: random.Random) -> None:
        gate = self.shared.gate
        self._mark("FLUSHALL: holding new client work, draining")
        try:
            if not gate.close(QUIESCE_S):
                self.problems.append(
                    f"FLUSHALL skipped: client requests still in flight after {QUIESCE_S:.0f}s "
                    "with every fault healed (a keyed request never acknowledged?)"
                )
                return
            if not wait_drained(self.stack, QUIESCE_S, self._halt):
                if not self._halt.is_set():
                    self.problems.append(
                        f"FLUSHALL skipped: the persister did not drain within {QUIESCE_S:.0f}s "
                        "with every fault healed and no traffic"
                    )
                return
            self._count("FLUSHALL (after a drain)")
            client = self.stack.redis_client()
            try:
                self._last_wipe = time.monotonic()
                self.wipes.append(self._last_wipe - self.shared.stats.t0)
                client.flushall()
            finally:
                client.close()
                self._last_wipe = time.monotonic()
        finally:
            gate.reopen()
            self._mark("  clients resumed")

    # --- operators ------------------------------------------------------------------------

    def _operator(self) -> None:
        rng = random.Random(f"{self.shared.seed}/operator")
        actions: list[Callable[[random.Random], None]] = []
        if "rebuild" in self.families:
            actions.append(self._rebuild)
        if "repair" in self.families:
            actions.append(self._repair)
        if "users" in self.families:
            actions += [self._users_cli, self._users_api]
        while actions and not self._halt.wait(rng.uniform(1.0, 5.0)):
            rng.choice(actions)(rng)

    def _cli(self, *args: str) -> tuple[str, str]:
        """`score-service ARGS` against the stores directly: (outcome, output)."""
        self._mark(f"{' '.join(args)}: start")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=self.stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = process.communicate(timeout=CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            return "timeout", out.decode(errors="replace")
        return f"exit {process.returncode}", out.decode(errors="replace")

    def _rebuild(self, rng: random.Random) -> None:
        outcome, out = self._cli("rebuild")
        self._count(f"rebuild: {outcome}")
        if outcome != "exit 0":
            self._note(f"rebuild {outcome}: {last_line(out)}")

    def _repair(self, rng: random.Random) -> None:
        """`reconcile --repair`, or `reconcile` alone. Redis must never drift from Postgres
        (plus pending increments): drift found while the service says it is ready, with no
        FLUSHALL near, is a failure, even though --repair then hides it from the end check.
        """
        args = ["reconcile", "--repair"] if rng.random() < 0.6 else ["reconcile"]
        started = time.monotonic()
        ready = self._ready()
        outcome, out = self._cli(*args)
        self._count(f"{' '.join(args)}: {outcome}")
        lines = out.splitlines()
        drift = [i for i, line in enumerate(lines) if line.startswith("drift: ") and
                 not line.startswith("drift: none")]  # fmt: skip
        ledger = [line for line in lines if line.startswith("ledger: ") and "user(s)" in line]
        wiped_near = self._last_wipe >= started - WIPE_GRACE_S
        if drift and ready and not wiped_near:
            at = drift[0]
            self.problems.append(
                f"at {started - self.shared.stats.t0:.2f}s `{' '.join(args)}` found Redis "
                f"drifted from Postgres while the service was ready: "
                + " / ".join(line.strip() for line in lines[at : at + 7])
            )
        elif drift:
            self._note(f"{' '.join(args)}: {lines[drift[0]]} (a FLUSHALL near, or not ready)")
        if ledger:
            self.problems.append(f"`{' '.join(args)}`: {ledger[0]}")
        if outcome != "exit 0" and not drift:
            self._note(f"{' '.join(args)} {outcome}: {last_line(out)}")

    def _ready(self) -> bool:
        try:
            return httpx.get(self.shared.base + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _new_ids(self, how: str, rng: random.Random) -> list[str]:
        with self._lock:
            self._users += 1
            n = self._users
        return [f"n{self.shared.seed}-{how}{n}-{j}" for j in range(rng.randint(1, 3))]

    def _users_cli(self, rng: random.Random) -> None:
        ids = self._new_ids("c", rng)
        for _ in range(5):
            outcome, out = self._cli("users", "add", *ids)
            self._count(f"users add (CLI): {outcome}")
            if outcome == "exit 0":
                self.shared.ledger.provisioned(ids)
                return
            if self._halt.wait(rng.uniform(0.5, 2)):
                break
        self._note(f"users add {ids} never succeeded: {last_line(out)}")

    def _users_api(self, rng: random.Random) -> None:
        s = self.shared
        ids = self._new_ids("a", rng)
        endpoint = "POST /api/v1/admin/users"
        headers = {"Authorization": f"Bearer {s.token('soak-operator', admin=True)}"}
        with httpx.Client(base_url=s.base, timeout=5.0) as http:
            for _ in range(20):
                outcome, reply = classify(
                    lambda: http.post(
                        "/api/v1/admin/users", json={"user_ids": ids}, headers=headers
                    )
                )
                s.stats.answer(endpoint, outcome)
                if outcome == "200":
                    self._count("users (admin API): 200")
                    s.ledger.provisioned(ids)
                    return
                if reply is not None and outcome != "503":
                    s.stats.violation(endpoint, outcome, reply.text)
                    return
                assert outcome == "503" or outcome.startswith((NOT_SENT, UNKNOWN))
                if self._halt.wait(rng.uniform(0.2, 1.0)):
                    break
        self._note(f"admin users {ids} never acknowledged")
