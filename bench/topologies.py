"""The topology scenario (issue 9): the write path side by side on one server, one server over
TLS, Sentinel without and with WAIT 1, and a 3-primary Cluster with three partitions; the
Redis CPU an update costs on each deployment's primaries and replicas, and what a cluster's
cost per primary means for its ceiling; then the time from a primary's SIGKILL to the first
acknowledged write, on Sentinel and on Cluster (bench/failover.py).

Every stack has the main stack's users and tokens, a Postgres database and a persister of its
own. The two Sentinel stacks share one deployment (databases 0 and 1): the same processes, so
what differs between them is WAIT alone. Every process here shares the machine's cores, so a
cluster cannot be faster in wall-clock terms; the Redis CPU each update costs on each primary
says what that primary could take with a core of its own.
"""

from __future__ import annotations

import contextlib
import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from bench import failover, scenarios, wrk
from bench.correctness import correctness
from bench.cpu import tree_seconds
from bench.ledger import Ledger, UserLedger, leaderboard_totals
from bench.progress import log
from bench.stack import Stack, build_stack
from service.dev.servers import RedisServer
from service.dev.tls import self_signed
from service.dev.topologies import LocalCluster, LocalSentinel
from service.keys import KeySchema

if TYPE_CHECKING:
    from bench.run import Run

CONNECTIONS = 64
CLUSTER_PARTITIONS = 3


@dataclass
class Deployed:
    """A stack on one topology, and the Redis processes it runs on."""

    label: str
    stack: Stack
    ledger: Ledger
    nodes: list[RedisServer]
    """The data nodes (primaries and replicas; roles change with failovers)."""
    sentinels: list[RedisServer] = field(default_factory=list)
    cluster: LocalCluster | None = None
    failover: failover.Failover | None = None
    """How its deployment fails over (shared by the stacks of one deployment)."""
    users: UserLedger | None = None
    """The failover probes' ledger, user by user."""
    may_lose: bool = False
    """A primary was killed while acknowledgements did not wait for a replica."""

    @property
    def target(self) -> scenarios.Target:
        waits = self.stack.settings.redis_min_replicas > 0
        return scenarios.Target(
            self.label, self.stack.base, self.stack.tokens_file, self.ledger, errors_in_doubt=waits
        )

    def describe(self) -> dict[str, Any]:
        settings, roles = self.stack.settings, _roles(self.nodes)
        return {
            "redis_url": self.stack.redis_url.split("://")[0] + "://",
            "partitions": settings.partitions,
            "min_replicas": settings.redis_min_replicas,
            "primaries": sum(r == "primary" for r in roles.values()),
            "replicas": sum(r == "replica" for r in roles.values()),
            "sentinels": len(self.sentinels),
        }


def run(r: Run) -> dict[str, Any]:
    """Start the deployments and their stacks, compare them, fail them over, check them."""
    with contextlib.ExitStack() as running:  # stopped in reverse order, whatever fails
        deployed: list[Deployed] = []
        not_started: dict[str, str] = {}
        for name, start in STARTS.items():
            try:
                deployed += start(r, running)
            except Exception as exc:  # recorded; the other topologies go on
                log(f"topology: {name} did not start: {exc!r}")
                not_started[name] = f"{type(exc).__name__}: {exc}"[:1000]
        out: dict[str, Any] = {
            "deployments": {d.label: d.describe() for d in deployed},
            "not_started": not_started,
        }
        log(f"topology: write path on {', '.join(d.label for d in deployed)}, side by side")
        out["throughput"] = compare(deployed, r.plan.duration_s, r.plan.rounds)
        log(f"topology: failovers, {r.plan.failovers} per deployment")
        out["failover"] = failovers(deployed, r.plan.failovers)
        out["correctness"] = {}
        for d in deployed:
            if d.stack is not r.main:  # checked at the end of the run, like every scenario's
                log(f"topology: correctness of {d.label}")
                verdicts = correctness(d.stack, d.ledger, may_lose=d.may_lose, users=d.users)
                out["correctness"] |= {f"{d.label}_{k}": v for k, v in verdicts.items()}
        return out


def _stack(r: Run, running: contextlib.ExitStack, name: str, url: str, **env: str) -> Stack:
    """A stack on `url` with the main stack's users and tokens."""
    stack = build_stack(name, r.root, r.pg, r.keys, users=r.plan.users,
                        token_users=r.plan.token_users, workers=r.plan.workers, redis_url=url,
                        extra_env=env, tokens_of=r.main)  # fmt: skip
    running.callback(stack.stop)
    return stack


def _server(r: Run, running: contextlib.ExitStack) -> list[Deployed]:
    """The main stack: one server, `redis://`."""
    assert r.main.redis is not None
    return [Deployed("server", r.main, r.ledger, [r.main.redis])]


def _tls(r: Run, running: contextlib.ExitStack) -> list[Deployed]:
    """One server over TLS (`rediss://`, a throwaway CA)."""
    server = RedisServer(r.root / "tls" / "redis", tls=self_signed(r.root / "tls"))
    running.callback(server.stop)
    server.start()
    return [Deployed("tls", _stack(r, running, "tls", server.url), Ledger(), [server])]


def _sentinel(r: Run, running: contextlib.ExitStack) -> list[Deployed]:
    """1 primary, 2 replicas, 3 sentinels; a stack without WAIT on database 0, one with
    WAIT 1 on database 1."""
    deployment = LocalSentinel(r.root / "sentinel")
    running.callback(deployment.stop)
    deployment.start()
    way = failover.of_sentinel(deployment)
    url = deployment.url.removesuffix("/0")
    return [
        Deployed(label, _stack(r, running, label, f"{url}/{db}", SCORE_REDIS_MIN_REPLICAS=wait),
                 Ledger(), deployment.servers, deployment.watchers, failover=way)
        for label, db, wait in (("sentinel", 0, "0"), ("sentinel_wait1", 1, "1"))
    ]  # fmt: skip


def _cluster(r: Run, running: contextlib.ExitStack) -> list[Deployed]:
    """3 primaries, 3 replicas, one partition on each primary; RQ's queue on a server apart."""
    queue = RedisServer(r.root / "cluster-queue")
    running.callback(queue.stop)
    queue.start()
    deployment = LocalCluster(r.root / "cluster")
    running.callback(deployment.stop)
    deployment.start()
    stack = _stack(r, running, "cluster", deployment.url,
                   SCORE_PARTITIONS=str(CLUSTER_PARTITIONS), SCORE_QUEUE_URL=queue.url)  # fmt: skip
    slot = KeySchema(CLUSTER_PARTITIONS).partition(0).slot
    way = failover.of_cluster(deployment, slot)
    return [
        Deployed("cluster", stack, Ledger(), deployment.nodes, cluster=deployment, failover=way)
    ]


STARTS: dict[str, Callable[[Run, contextlib.ExitStack], list[Deployed]]] = {
    "server": _server,
    "tls": _tls,
    "sentinel": _sentinel,
    "cluster": _cluster,
}


# ---- throughput and CPU per update ------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One wrk run on one deployment, with the CPU its processes spent meanwhile."""

    result: wrk.WrkResult
    cpu_s: dict[str, float]
    """By process: `redis <port>` for each data node, sentinels, service workers, persister."""
    roles: dict[int, str]
    """port -> primary | replica, at the start of the run."""
    owners: dict[int, int]
    """partition -> the port of the primary that holds it."""
    applied: list[int]
    """Increments applied, by partition (from the leaderboards)."""


def compare(deployed: list[Deployed], duration_s: float, rounds: int) -> dict[str, Any]:
    """Every deployment at 64 connections, interleaved round by round; medians."""
    for d in deployed:
        scenarios.warm(d.target)
    runs: dict[str, list[Measured]] = defaultdict(list)
    for _ in range(rounds):
        for d in deployed:
            runs[d.label].append(measure(d, duration_s))
    out: dict[str, Any] = {d.label: summarise(runs[d.label]) for d in deployed}
    out["ratios"] = _ratios(runs)
    return out


def measure(d: Deployed, duration_s: float) -> Measured:
    roles = _roles(d.nodes)
    schema = d.stack.schema
    client = d.stack.client()
    try:
        before, cpu_before = _partition_totals(client, schema), _cpu(d)
        result = scenarios.load(d.target, CONNECTIONS, duration_s)
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in _cpu(d).items()}
        applied = [a - b for a, b in zip(_partition_totals(client, schema), before, strict=True)]
    finally:
        client.close()
    return Measured(result, cpu, roles, _owners(d, roles), applied)


def _roles(nodes: list[RedisServer]) -> dict[int, str]:
    out = {}
    for node in nodes:
        with node.client(socket_timeout=5) as c:
            master = c.info("replication")["role"] == "master"
        out[node.port] = "primary" if master else "replica"
    return out


def _owners(d: Deployed, roles: dict[int, str]) -> dict[int, int]:
    parts = d.stack.schema.all()
    if d.cluster is not None:
        return {p.index: d.cluster.owner(p.slot).port for p in parts}
    (primary,) = (port for port, role in roles.items() if role == "primary")
    return {p.index: primary for p in parts}


def _partition_totals(client: redis.Redis, schema: KeySchema) -> list[int]:
    return [sum(leaderboard_totals(client, p.leaderboard).values()) for p in schema.all()]


def _cpu(d: Deployed) -> dict[str, float]:
    """CPU seconds so far of each data node, the sentinels, the service and its persister."""
    out = {f"redis {n.port}": tree_seconds(n.process.pid) for n in d.nodes if n.process}
    if d.sentinels:
        out["sentinels"] = sum(tree_seconds(s.process.pid) for s in d.sentinels if s.process)
    if d.stack.serve is not None:
        out["service workers"] = tree_seconds(d.stack.serve.pid)
    if d.stack.worker is not None:
        out["persister"] = tree_seconds(d.stack.worker.pid)
    return out


def summarise(runs: list[Measured]) -> dict[str, Any]:
    """Medians over rounds: wrk's numbers, CPU per applied update by role, and per primary
    what its cost means: 1e6 / (its microseconds per update) updates/s with a core of its
    own (Redis runs commands on one thread), and for the deployment the rate at which the
    first primary saturates, given each one's share of the updates."""
    per_round = [_per_update(m) for m in runs]
    roles = {k for r in per_round for k in r["cpu_us_per_update"]}
    ports = {port for r in per_round for port in r["primaries"]}
    primaries = []
    for port in sorted(ports):
        seen = [r["primaries"][port] for r in per_round if port in r["primaries"]]
        us = statistics.median(p["cpu_us_per_update"] for p in seen)
        primaries.append({
            "port": port,
            "partitions": seen[-1]["partitions"],
            "share": statistics.median(p["share"] for p in seen),
            "cpu_us_per_update": us,
            "ceiling_per_s": 1e6 / us if us else None,
        })  # fmt: skip
    loaded = [p for p in primaries if p["share"] and p["ceiling_per_s"]]
    return scenarios.summarise([m.result for m in runs]) | {
        "updates_applied": sum(sum(m.applied) for m in runs),
        "cpu_us_per_update": {
            role: statistics.median(r["cpu_us_per_update"].get(role, 0.0) for r in per_round)
            for role in sorted(roles)
        },
        "primaries": primaries,
        "ceiling_per_s": min((p["ceiling_per_s"] / p["share"] for p in loaded), default=None),
    }


def _per_update(m: Measured) -> dict[str, Any]:
    """One run's CPU per applied update: by role (primaries, replicas summed), and for each
    primary over the updates of the partitions it holds."""
    updates = max(1, sum(m.applied))
    by_role: dict[str, float] = defaultdict(float)
    for name, seconds in m.cpu_s.items():
        by_role[_role(name, m.roles)] += seconds
    primaries = {}
    for port in {p for p, role in m.roles.items() if role == "primary"}:
        held = [i for i, owner in m.owners.items() if owner == port]
        mine = sum(m.applied[i] for i in held)
        primaries[port] = {
            "partitions": held,
            "share": mine / updates,
            "cpu_us_per_update": 1e6 * m.cpu_s[f"redis {port}"] / max(1, mine),
        }
    return {
        "cpu_us_per_update": {k: 1e6 * v / updates for k, v in by_role.items()},
        "primaries": primaries,
    }


def _role(process: str, roles: dict[int, str]) -> str:
    """`redis <port>` -> primaries | replicas; other processes keep their name."""
    if not process.startswith("redis "):
        return process
    return "primaries" if roles.get(int(process.split()[1])) == "primary" else "replicas"


def _ratios(runs: dict[str, list[Measured]]) -> dict[str, float]:
    """Throughput of one deployment over another's, round by round (median): what TLS,
    Sentinel, WAIT 1 and Cluster cost or give against the one they change."""
    pairs = {"tls/server": ("tls", "server"), "sentinel/server": ("sentinel", "server"),
             "sentinel_wait1/sentinel": ("sentinel_wait1", "sentinel"),
             "cluster/server": ("cluster", "server")}  # fmt: skip
    return {
        name: scenarios.ratio([m.result for m in runs[a]], [m.result for m in runs[b]])
        for name, (a, b) in pairs.items()
        if runs.get(a) and runs.get(b)
    }


# ---- failover ---------------------------------------------------------------------------------


def failovers(deployed: list[Deployed], repetitions: int) -> dict[str, Any]:
    """Each deployment that fails over, `repetitions` times, all its stacks probed at once;
    the probes' increments join each stack's ledger."""
    groups: dict[int, list[Deployed]] = defaultdict(list)
    for d in deployed:
        if d.failover is not None:
            groups[id(d.failover)].append(d)
    out: dict[str, Any] = {}
    for group in groups.values():
        way = group[0].failover
        assert way is not None
        for d in group:
            d.may_lose = d.stack.settings.redis_min_replicas == 0
        results, ledgers = failover.time_failovers(
            way, {d.label: d.stack for d in group}, repetitions
        )
        for d in group:
            d.users = ledgers[d.label]
            d.ledger.add(sum(d.users.acknowledged.values()), sum(d.users.in_doubt.values()))
            out[d.label] = results[d.label] | {"min_replicas": d.stack.settings.redis_min_replicas}
    return out
