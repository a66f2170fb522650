"""A primary killed (SIGKILL) while players post, on a real Sentinel deployment and a real
Redis Cluster, and a primary cut off from its replicas and sentinels by a network partition,
with SCORE_REDIS_MIN_REPLICAS=1: the service answers only 200 or 503, writes come back by
themselves, and after the drain Postgres equals the client-side ledger exactly and Redis
equals Postgres."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import psycopg
import pytest
import redis
from fault_proxy import FaultProxy
from persist_support import cli
from players import Players
from support import (
    Servers,
    empty_postgres,
    make_env,
    start_service,
    start_worker,
    stop_process,
    users_in_every_partition,
)

from service.connections import sync_redis
from service.dev.servers import RedisServer, wait_for
from service.dev.topologies import MASTER_NAME, LocalCluster, LocalSentinel
from service.keys import KeySchema
from service.persister_lag import read_lags_sync
from service.settings import Settings
from service.shipped import REDIS_CONF

PARTITIONS = 3
RECOVERY_DEADLINE_S = 30.0
"""Writes must come back by themselves within this (measured in `make bench`; the README
gives the numbers)."""


def _report_losses(
    env: dict[str, str], settings: Settings, servers: Servers, expected: dict[str, int]
) -> None:
    """Without WAIT: what the failover took, said, never hidden and never invented."""
    client = sync_redis(settings)
    try:
        parts = KeySchema(PARTITIONS).all()
        wait_for(
            lambda: sum(lag.unpersisted for lag in read_lags_sync(client, parts)) == 0,
            60,
            "the drain",
        )
        in_redis = {
            u: -int(client.zscore(KeySchema(PARTITIONS).for_user(u).leaderboard, u) or 0)
            for u in expected
        }
    finally:
        client.close()
    in_postgres = _pg_scores(servers)
    assert all(in_postgres[u] <= expected[u] for u in expected)  # nothing invented
    lost = sum(expected.values()) - sum(in_postgres.values())
    print(f"\nSCORE_REDIS_MIN_REPLICAS=0: {lost} acknowledged points lost by the failover")
    out = cli(env, "reconcile")
    differ = {u for u in expected if in_redis[u] != in_postgres[u]}
    assert all(u in out.stdout for u in differ), out.stdout  # reconcile names each of them
    assert out.returncode == (1 if differ else 0), out.stdout + out.stderr


def _pg_scores(servers: Servers) -> dict[str, int]:
    with psycopg.connect(servers.postgres.url) as conn:
        rows = conn.execute("SELECT user_id, score FROM users").fetchall()
    return {str(user): int(str(score)) for user, score in rows}


@pytest.mark.parametrize(
    ("kind", "replicas"),
    [("sentinel", 1), ("cluster", 1), ("sentinel", 0)],
    ids=["sentinel", "cluster", "sentinel, unreplicated acknowledgements"],
)
def test_a_primary_killed_under_load_loses_no_acknowledged_increment(
    kind: str, replicas: int, queue_server: RedisServer, servers: Servers, tmp_path: Path
) -> None:
    """With SCORE_REDIS_MIN_REPLICAS=0 a dead primary may take acknowledged increments with
    it (asynchronous replication): the test then reports how many, and checks that nothing is
    invented and that reconcile names every user whose stores disagree."""
    shipped = REDIS_CONF.read_text()
    deployment = (LocalCluster if kind == "cluster" else LocalSentinel)(tmp_path / kind).start()
    empty_postgres(servers)
    extra = {"SCORE_QUEUE_URL": queue_server.url} if kind == "cluster" else {}
    env = make_env(
        servers,
        REDIS_URL=deployment.url,
        SCORE_PARTITIONS=str(PARTITIONS),
        SCORE_REDIS_MIN_REPLICAS=str(replicas),
        **extra,
    )
    settings = Settings.from_env(env)
    users = users_in_every_partition(PARTITIONS, 10)
    assert cli(env, "users", "add", *users).returncode == 0
    svc = start_service(env, tmp_path / "serve.log")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with Players(svc.base, settings, users) as players:
            wait_for(lambda: players.acknowledged() > 300, 30, "traffic")
            if isinstance(deployment, LocalCluster):
                victim = deployment.owner(KeySchema(PARTITIONS).partition(0).slot)
            else:
                victim = deployment.servers[0]
            assert victim.process is not None
            victim.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            if isinstance(deployment, LocalCluster):
                # The replica that took over has no replica of its own: with one replica per
                # primary, WAIT 1 fails until the dead node is back, as its supervisor
                # (systemd, Kubernetes) would restart it, and rejoins as the new replica.
                slot = KeySchema(PARTITIONS).partition(0).slot
                wait_for(lambda: deployment.owner(slot) is not victim, 30, "the failover")
                victim.start()
            wait_for(
                lambda: (
                    players.last_acknowledged_at() > killed_at + 1 and players.acknowledged() > 0
                ),
                RECOVERY_DEADLINE_S,
                "writes to succeed again after the kill",
            )
            after = players.acknowledged()
            wait_for(lambda: players.acknowledged() > after + 300, 30, "traffic after")
        assert set(players.statuses) <= {200, 503}, players.statuses
        assert players.statuses[503] > 0  # the kill was felt: else the test proves nothing

        expected = {u: players.ledger[u] for u in users}
        if replicas:
            wait_for(lambda: _pg_scores(servers) == expected, 60, "Postgres = the ledger")
            out = cli(env, "reconcile")
            assert out.returncode == 0, out.stdout + out.stderr  # Redis = Postgres
        else:
            _report_losses(env, settings, servers, expected)
        assert REDIS_CONF.read_text() == shipped  # the sentinels rewrote copies, not it
    finally:
        stop_process(svc.process)
        stop_process(worker)
        deployment.stop()


def _primary_port(deployment: LocalSentinel) -> int:
    """The port of the primary the sentinels name now."""
    with redis.Redis(port=deployment.watchers[0].port, decode_responses=True) as sentinel:
        _, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)  # type: ignore[no-untyped-call]
    return int(port)


def test_a_primary_cut_off_from_its_replicas_and_sentinels_keeps_every_acknowledged_increment(
    servers: Servers, tmp_path: Path
) -> None:
    """The dangerous partition: the service still reaches the old primary, its replicas and
    the sentinels do not (a proxy in front of it cuts their addresses off). The sentinels
    promote a replica; whatever the old primary takes meanwhile is thrown away when the
    partition heals and it rejoins as a replica. With SCORE_REDIS_MIN_REPLICAS=1 none of it
    was acknowledged (WAIT came short: 503), and the service leaves the old primary for the
    one the sentinels name without waiting for the partition to heal."""
    proxies: list[FaultProxy] = []

    def through_a_proxy(primary: RedisServer) -> int:
        proxies.append(FaultProxy("127.0.0.1", primary.port).start())
        return proxies[0].port

    deployment = LocalSentinel(tmp_path / "sentinel", own_addresses=True, front=through_a_proxy)
    empty_postgres(servers)
    users = users_in_every_partition(PARTITIONS, 10)
    with contextlib.ExitStack() as running:  # stopped in reverse order, whatever fails
        running.callback(lambda: [p.stop() for p in proxies])
        running.callback(deployment.stop)
        deployment.start()
        (proxy,) = proxies
        env = make_env(
            servers,
            REDIS_URL=deployment.url,
            SCORE_PARTITIONS=str(PARTITIONS),
            SCORE_REDIS_MIN_REPLICAS="1",
        )
        old = deployment.servers[0]
        assert cli(env, "users", "add", *users).returncode == 0
        svc = start_service(env, tmp_path / "serve.log")
        running.callback(stop_process, svc.process)
        running.callback(stop_process, start_worker(env, tmp_path / "worker.log"))
        with Players(svc.base, Settings.from_env(env), users) as players:
            wait_for(lambda: players.acknowledged() > 300, 30, "traffic")
            others = deployment.servers[1:] + deployment.watchers
            proxy.isolate(deployment.addresses[s.port] for s in others)
            cut_at = time.monotonic()
            wait_for(lambda: _primary_port(deployment) != proxy.port, 30, "a new primary")
            wait_for(
                lambda: players.last_acknowledged_at() > cut_at + 1,
                RECOVERY_DEADLINE_S,
                "writes to succeed on the new primary while the old one is cut off",
            )
            after = players.acknowledged()
            wait_for(lambda: players.acknowledged() > after + 300, 30, "traffic meanwhile")
            proxy.heal()
            with redis.Redis(port=old.port, decode_responses=True) as c:
                wait_for(
                    lambda: c.info("replication")["role"] == "slave",
                    30,
                    "the old primary to rejoin as a replica",
                )
            after = players.acknowledged()
            wait_for(lambda: players.acknowledged() > after + 300, 30, "traffic after")
        assert set(players.statuses) <= {200, 503}, players.statuses
        assert players.statuses[503] > 0  # the partition was felt: else the test proves nothing

        expected = {u: players.ledger[u] for u in users}
        wait_for(lambda: _pg_scores(servers) == expected, 60, "Postgres = the ledger")
        out = cli(env, "reconcile")
        assert out.returncode == 0, out.stdout + out.stderr  # Redis = Postgres
