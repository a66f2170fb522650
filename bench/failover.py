"""Failover timing (issue 9): a primary SIGKILLed while keyed clients post, and the time from
the kill to the first acknowledged write to a user of the partition it held, on Sentinel and
on Cluster. The killed node is restarted after each kill, as a supervisor would restart it,
and rejoins as a replica; the next kill waits until the deployment is whole again.

The probes post increments of 1 with an Idempotency-Key each and send a 503 (or a request
that got no answer) again with the same key, so their ledger is exact per user: they post for
users of partition 0 that wrk never posts for.
"""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from bench.ledger import UserLedger
from bench.stack import TOKEN_TTL_S, Stack, user_id
from service.auth import mint
from service.dev.servers import RedisServer, ServerError, wait_for
from service.dev.topologies import MASTER_NAME, LocalCluster, LocalSentinel
from service.keys import PERSISTER_WORKERS

RECOVERY_DEADLINE_S = 60.0
"""A repetition whose probes got no write through within this is recorded as not recovered."""
WHOLE_DEADLINE_S = 90.0
STEADY_DEADLINE_S = 30.0
PROBE_CONNECTIONS = 4
PROBE_USERS = 8
PACE_S = 0.01
"""A probe's pause between two requests and before a retry: its pace (and the resolution of
the times measured), not a wait for any state."""
REQUEST_TIMEOUT_S = 10.0
GIVE_UP_S = 60.0
"""A key still unanswered after this is left in doubt (applied once or not at all)."""


@dataclass(frozen=True)
class Failover:
    """How one deployment fails over: the primary to kill now, and whether it is whole again
    (every node up, each in its role, every replica in sync)."""

    primary: Callable[[], RedisServer]
    whole: Callable[[], bool]


def of_sentinel(deployment: LocalSentinel) -> Failover:
    return Failover(lambda: sentinel_primary(deployment), lambda: sentinel_whole(deployment))


def of_cluster(deployment: LocalCluster, slot: int) -> Failover:
    """The primary that serves `slot` (partition 0's) is the one killed."""
    return Failover(lambda: deployment.owner(slot), lambda: cluster_whole(deployment))


class Probe:
    """Threads posting keyed increments for a few users of partition 0 of a stack, retrying
    each until it is answered; when each 200 came, and a ledger per user."""

    def __init__(self, label: str, stack: Stack) -> None:
        self.label, self.stack = label, stack
        settings = stack.settings
        self.tokens = {u: mint(settings, u, ttl_s=TOKEN_TTL_S) for u in probe_users(stack)}
        self.ledger = UserLedger()
        self.statuses: Counter[int] = Counter()
        self._oks: list[tuple[float, float]] = []  # (sent, answered) of every 200
        self._lock = threading.Lock()
        self._stop = threading.Event()
        users = list(self.tokens)
        self._threads = [
            threading.Thread(target=self._play, args=(users[k::PROBE_CONNECTIONS],))
            for k in range(PROBE_CONNECTIONS)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop posting; each thread first finishes the key it is on."""
        self._stop.set()
        for t in self._threads:
            t.join()

    def acknowledged(self) -> int:
        with self._lock:
            return len(self._oks)

    def first_ok_after(self, moment: float) -> float | None:
        """When the first 200 came to a request sent after `moment` (time.monotonic())."""
        with self._lock:
            answered = [done for sent, done in self._oks if sent > moment]
        return min(answered, default=None)

    def _play(self, users: list[str]) -> None:
        with httpx.Client(base_url=self.stack.base, timeout=REQUEST_TIMEOUT_S) as http:
            i = 0
            while not self._stop.is_set():
                self._post(http, users[i % len(users)], uuid.uuid4().hex)
                i += 1
                self._stop.wait(PACE_S)

    def _post(self, http: httpx.Client, user: str, key: str) -> None:
        """One increment, sent again with its key until a 200 (or given up: in doubt)."""
        headers = {"Authorization": f"Bearer {self.tokens[user]}", "Idempotency-Key": key}
        give_up = time.monotonic() + GIVE_UP_S
        while time.monotonic() < give_up:
            sent = time.monotonic()
            try:
                status = http.post(
                    "/api/v1/score", json={"user_id": user, "score_increase": 1}, headers=headers
                ).status_code
            except httpx.HTTPError:
                status = 0  # no answer: it may have been applied, the same key says so
            with self._lock:
                self.statuses[status] += 1
                if status == 200:
                    self.ledger.acknowledged[user] += 1
                    self._oks.append((sent, time.monotonic()))
                    return
            if status not in (0, 503):
                break  # an answer the contract does not allow here: the report shows it
            time.sleep(PACE_S)
        with self._lock:
            self.ledger.in_doubt[user] += 1


def probe_users(stack: Stack) -> list[str]:
    """PROBE_USERS users of partition 0 that have no wrk token (their totals are the
    probe's alone)."""
    schema, taken = stack.schema, set(stack.token_users)
    found: list[str] = []
    for i in reversed(range(stack.users)):
        user = user_id(i)
        if user not in taken and schema.for_user(user).index == 0:
            found.append(user)
            if len(found) == PROBE_USERS:
                return found
    raise ValueError(f"{stack.name}: fewer than {PROBE_USERS} users of partition 0 without token")


@contextlib.contextmanager
def probing(stacks: dict[str, Stack]) -> Iterator[list[Probe]]:
    """A probe on each stack, posting until the block ends."""
    probes = [Probe(label, stack) for label, stack in stacks.items()]
    with contextlib.ExitStack() as running:
        for p in probes:
            p.start()
            running.callback(p.stop)
        yield probes


def time_failovers(
    failover: Failover, stacks: dict[str, Stack], repetitions: int
) -> tuple[dict[str, dict[str, Any]], dict[str, UserLedger]]:
    """Kill the primary `repetitions` times under the probes' load; per stack: the seconds
    from each kill to its first acknowledged write (None: not within the deadline), the
    answers the probes got, and the probes' ledger."""
    error = ""
    with probing(stacks) as probes:
        recoveries: dict[str, list[float | None]] = {p.label: [] for p in probes}
        try:
            for _ in range(repetitions):
                for label, seconds in _repetition(failover, probes).items():
                    recoveries[label].append(seconds)
        except Exception as exc:  # reported; the probes' ledger is still checked
            error = f"{type(exc).__name__}: {exc}"[:1000]
    results = {p.label: _summary(recoveries[p.label], p, error) for p in probes}
    return results, {p.label: p.ledger for p in probes}


def _repetition(failover: Failover, probes: list[Probe]) -> dict[str, float | None]:
    """One kill: the seconds to each probe's first acknowledged write; then the killed node
    restarted (the next kill waits until it has rejoined)."""
    killed_at, victim = _kill_in_steady_state(failover, probes)
    with contextlib.suppress(ServerError):  # not recovered in time: None below
        wait_for(
            lambda: all(p.first_ok_after(killed_at) for p in probes),
            RECOVERY_DEADLINE_S,
            "a write acknowledged after the kill",
        )
    out: dict[str, float | None] = {}
    for p in probes:
        ok = p.first_ok_after(killed_at)
        out[p.label] = None if ok is None else round(ok - killed_at, 3)
    victim.start()  # as its supervisor would: it rejoins as a replica
    return out


def _kill_in_steady_state(failover: Failover, probes: list[Probe]) -> tuple[float, RedisServer]:
    """SIGKILL the primary once the deployment is whole, every probe is getting writes
    through and every persister beats; when it was gone."""
    wait_for(failover.whole, WHOLE_DEADLINE_S, "the deployment to be whole")
    before = {p.label: p.acknowledged() for p in probes}
    wait_for(
        lambda: all(p.acknowledged() > before[p.label] and _beating(p.stack) for p in probes),
        STEADY_DEADLINE_S,
        "writes and a persister before the kill",
    )
    victim = failover.primary()
    assert victim.process is not None
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()  # gone: a write acknowledged from now on went to another primary
    return time.monotonic(), victim


def _beating(stack: Stack) -> bool:
    """The stack's persister is past its start (its cron thread beats): a kill measures a
    failover, not a worker's start-up racing a dead node."""
    client = stack.client()
    try:
        return bool(client.zcard(PERSISTER_WORKERS))
    finally:
        client.close()


def _summary(recoveries: list[float | None], probe: Probe, error: str) -> dict[str, Any]:
    done = [s for s in recoveries if s is not None]
    return ({"error": error} if error else {}) | {
        "recovery_s": recoveries,
        "median_s": statistics.median(done) if done else None,
        "max_s": max(done, default=None),
        "unrecovered": len(recoveries) - len(done),
        "statuses": {str(k): v for k, v in sorted(probe.statuses.items())},
        "in_doubt": sum(probe.ledger.in_doubt.values()),
    }


def sentinel_primary(deployment: LocalSentinel) -> RedisServer:
    """The server the (first) sentinel names as the primary now."""
    port = _named_primary(deployment.watchers[0])
    return next(s for s in deployment.servers if s.port == port)


def _named_primary(sentinel: RedisServer) -> int:
    with redis.Redis(port=sentinel.port, socket_timeout=5) as c:
        _, port = c.sentinel_get_master_addr_by_name(MASTER_NAME)
    return int(port)


def sentinel_whole(deployment: LocalSentinel) -> bool:
    """Every sentinel names the same primary and sees every replica up; the primary has them
    all in sync."""
    named = {_named_primary(w) for w in deployment.watchers}
    if len(named) != 1:
        return False
    for watcher in deployment.watchers:
        with redis.Redis(port=watcher.port, socket_timeout=5) as c:
            replicas = c.sentinel_slaves(MASTER_NAME)
        if len(replicas) < deployment.replicas or any(
            r["is_sdown"] or r["is_disconnected"] for r in replicas
        ):
            return False
    with redis.Redis(port=named.pop(), socket_timeout=5) as c:
        info = c.info("replication")
    in_sync = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
    return sum(r.get("state") == "online" for r in in_sync) == deployment.replicas


def cluster_whole(deployment: LocalCluster) -> bool:
    """Every node up and in a healthy cluster, `primaries` primaries, every replica in sync."""
    primaries = 0
    for node in deployment.nodes:
        with redis.Redis(port=node.port, socket_timeout=5, decode_responses=True) as c:
            state: str = c.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            nodes: str = c.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
            replication = c.info("replication")
        flags = [line.split()[2] for line in nodes.splitlines() if line.strip()]
        if "cluster_state:ok" not in state or any("fail" in f for f in flags):
            return False
        if replication["role"] == "master":
            primaries += 1
        elif replication.get("master_link_status") != "up":
            return False
    return primaries == deployment.primaries
