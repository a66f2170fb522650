"""The whole service on a real Redis Cluster (3 primaries, 3 replicas) and a real Sentinel
deployment (1 primary, 2 replicas, 3 sentinels), started by the suite: serve, workers and every
command, with three partitions and eight (spread over the primaries, drained by two workers),
checked against a client-side ledger."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from live_support import connect, recv_frame
from persist_support import cli
from support import (
    Servers,
    cannot_run,
    empty_postgres,
    make_env,
    start_service,
    start_worker,
    stop_process,
    users_in_every_partition,
)

from service.auth import mint
from service.dev.servers import RedisServer, ServerError, wait_for
from service.dev.tls import self_signed
from service.dev.topologies import LocalCluster, LocalSentinel
from service.settings import Settings
from service.streamids import order

Deployment = LocalCluster | LocalSentinel


# Over TLS: `system` tests (`make test-system`), as the embedded redis-server has no TLS
CASES = [
    pytest.param("cluster", 3, id="cluster, P=3"),
    pytest.param("cluster", 8, id="cluster, P=8"),
    pytest.param("sentinel", 3, id="sentinel, P=3"),
    pytest.param("cluster over TLS", 3, id="cluster over TLS, P=3", marks=pytest.mark.system),
    pytest.param("sentinel over TLS", 3, id="sentinel over TLS, P=3", marks=pytest.mark.system),
]


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Deployment]]:
    """The deployment the module's tests run on now, by kind: one at a time, kept from one
    test to the next of the same kind (the cases come grouped by kind)."""
    started: dict[str, Deployment] = {}
    yield started
    for deployment in started.values():
        deployment.stop()


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest,
    running: dict[str, Deployment],
    tmp_path_factory: pytest.TempPathFactory,
) -> Deployment:
    """A cluster or a Sentinel deployment (its kind: the test's parameter), over TLS when the
    kind says so (the clients, the replicas, the sentinels, the cluster bus)."""
    kind: str = request.param
    if kind in running:
        return running[kind]
    while running:
        running.popitem()[1].stop()
    where = tmp_path_factory.mktemp(kind.split(maxsplit=1)[0])
    tls = self_signed(where / "tls") if kind.endswith("TLS") else None
    started: Deployment = (LocalCluster if kind.startswith("cluster") else LocalSentinel)(
        where, tls=tls
    )
    try:
        started.start()
    except ServerError as exc:
        started.stop()
        if tls is not None and "tls" in str(exc).lower():
            cannot_run("the TLS deployment", f"this redis-server has no TLS ({exc})"[:300])
        raise
    running[kind] = started
    return started


def primaries(deployment: Deployment) -> list[RedisServer]:
    """The deployment's primaries, now."""
    found = []
    for node in deployment.nodes if isinstance(deployment, LocalCluster) else deployment.servers:
        with node.client(decode_responses=True) as c:
            if c.info("replication")["role"] == "master":
                found.append(node)
    return found


@pytest.fixture
def partitions(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def topo_env(
    deployment: Deployment, partitions: int, queue_server: RedisServer, servers: Servers
) -> dict[str, str]:
    """Clean stores, and the environment of a process of this deployment."""
    for server in primaries(deployment):
        with server.client() as c:
            c.flushall()
    empty_postgres(servers)
    extra = {"SCORE_QUEUE_URL": queue_server.url} if isinstance(deployment, LocalCluster) else {}
    return make_env(servers, REDIS_URL=deployment.url, SCORE_PARTITIONS=str(partitions), **extra)


def pg_scores(servers: Servers) -> dict[str, int]:
    with psycopg.connect(servers.postgres.url) as conn:
        rows = conn.execute("SELECT user_id, score FROM users").fetchall()
    return {str(user): int(str(score)) for user, score in rows}


@pytest.mark.parametrize(("deployment", "partitions"), CASES, indirect=True)
def test_every_part_works_and_the_totals_add_up(
    deployment: Deployment,
    partitions: int,
    topo_env: dict[str, str],
    servers: Servers,
    tmp_path: Path,
) -> None:
    """With eight partitions two workers drain them side by side (each partition under a lock
    of its own): the totals still add up exactly."""
    settings = Settings.from_env(topo_env)
    users = users_in_every_partition(partitions, 8)
    out = cli(topo_env, "users", "add", *users)
    assert out.returncode == 0, out.stderr
    svc = start_service(topo_env, tmp_path / "serve.log")
    workers = [
        start_worker(topo_env, tmp_path / f"worker{i}.log") for i in range(1 + (partitions > 3))
    ]
    ledger: Counter[str] = Counter()
    lock = threading.Lock()
    try:
        asyncio.run(_watch_a_change(svc.base, settings, users[0]))
        ledger[users[0]] += 1

        def player(mine: list[str]) -> None:
            with httpx.Client(base_url=svc.base, timeout=10) as http:
                for i in range(40):
                    user = mine[i % len(mine)]
                    resp = http.post(
                        "/api/v1/score",
                        json={"user_id": user, "score_increase": i + 1},
                        headers={"Authorization": f"Bearer {mint(settings, user)}"},
                    )
                    assert resp.status_code == 200, resp.text
                    with lock:
                        ledger[user] += i + 1

        threads = [threading.Thread(target=player, args=(users[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        # reads across partitions: the global top-N and exact ranks
        board = httpx.get(svc.base + "/api/v1/leaderboard?limit=10").json()
        best = sorted(ledger.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        assert [(e["user_id"], e["score"]) for e in board["top"]] == best
        for user in users[:6]:
            body = httpx.get(f"{svc.base}/api/v1/users/{user}").json()
            assert body["score"] == ledger[user]
            assert body["rank"] == 1 + sum(1 for s in ledger.values() if s > ledger[user])
        assert httpx.get(svc.base + "/readyz").status_code == 200
        metrics = httpx.get(svc.base + "/metrics").text
        assert 'score_persister_unpersisted_events{partition="2"}' in metrics

        # the worker drains every partition: Postgres equals the ledger
        wait_for(lambda: pg_scores(servers) == {u: ledger[u] for u in users}, 30, "the drain")
        for command in (["reconcile"], ["rebuild"], ["reconcile"]):
            out = cli(topo_env, *command)
            assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert httpx.get(f"{svc.base}/api/v1/users/{users[1]}").json()["score"] == ledger[users[1]]
        shown = cli(topo_env, "partitions")
        assert shown.returncode == 0, shown.stderr
        if isinstance(deployment, LocalCluster):  # spread evenly over the three primaries
            held = Counter(row.split()[-1] for row in shown.stdout.splitlines()[2:])
            assert sum(held.values()) == partitions, shown.stdout
            assert len(held) == 3 and max(held.values()) - min(held.values()) <= 1, shown.stdout
    finally:
        stop_process(svc.process)
        for worker in workers:
            stop_process(worker)


async def _watch_a_change(base: str, settings: Settings, user: str) -> None:
    """A live client gets the snapshot, then a frame with a newer version once `user` scores."""
    async with connect(base) as ws:
        first = await recv_frame(ws)
        async with httpx.AsyncClient(base_url=base) as http:
            resp = await http.post(
                "/api/v1/score",
                json={"user_id": user, "score_increase": 1},
                headers={"Authorization": f"Bearer {mint(settings, user)}"},
            )
            assert resp.status_code == 200, resp.text
        frame = await recv_frame(ws)
        while not any(e["user_id"] == user and e["score"] == 1 for e in frame["top"]):
            frame = await recv_frame(ws)
        assert order(frame["version"]) > order(first["version"]), (first, frame)


def test_a_cluster_cannot_hold_the_job_queue(servers: Servers) -> None:
    env = make_env(servers, REDIS_URL="redis+cluster://127.0.0.1:1")
    out = cli(env, "worker", "--check")
    assert out.returncode == 2 and "SCORE_QUEUE_URL" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
