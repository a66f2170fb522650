"""Throwaway Redis Cluster and Redis Sentinel deployments on one machine, made of
`redis-server` processes (servers.RedisServer), for `score-service dev --redis cluster|
sentinel`, the tests and the benchmark.

They are built with Redis's own commands (CLUSTER MEET / ADDSLOTS / REPLICATE, SENTINEL
MONITOR in each sentinel's file), so only `redis-server` is needed, not `redis-cli`. Every
node runs redis.conf plus the guide of its topology (deploy/), with shorter timeouts.
"""

from __future__ import annotations

import random
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from service.dev.servers import RedisServer, ServerError, free_port, redis_version, wait_for
from service.dev.tls import TlsFiles
from service.keys import slot_range
from service.shipped import DEPLOY_DIR

MASTER_NAME = "score"
"""The name the sentinels monitor the primary by (the path of the Sentinel REDIS_URL)."""
NODE_TIMEOUT_MS = 1000
"""Cluster node timeout and Sentinel's down-after: a dead primary is replaced within a few
seconds (production values are larger; see the README's "Deploying")."""
MAX_LAG_S = 2
"""min-replicas-max-lag (deploy/redis-replicated.conf says 5 beside a 5 s down-after)."""


def _command(client: redis.Redis, *args: str | int) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _client(server: RedisServer) -> redis.Redis:
    client: redis.Redis = server.client(socket_timeout=5, decode_responses=True)
    return client


def _url(scheme: str, servers: list[RedisServer], path: str, tls: TlsFiles | None) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    if tls is None:
        return f"redis+{scheme}://{hosts}{path}"
    return f"rediss+{scheme}://{hosts}{path}?{tls.url_query}"


@dataclass
class LocalCluster:
    """A Redis Cluster: `primaries` primaries with `replicas` replicas each, the slots split in
    equal contiguous ranges (as `redis-cli --cluster create` makes them)."""

    directory: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = NODE_TIMEOUT_MS
    tls: TlsFiles | None = None
    """TLS only, between the nodes too (a redis-server built with TLS)."""
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return _url("cluster", self.nodes, "", self.tls)

    def start(self) -> LocalCluster:
        count = self.primaries * (1 + self.replicas)
        for i in range(count):
            node = RedisServer(
                self.directory / f"node{i}",
                port=_cluster_port(),
                overlays=[DEPLOY_DIR / "redis-cluster.conf"],
                extra=["--cluster-node-timeout", str(self.node_timeout_ms)]
                + (["--tls-cluster", "yes"] if self.tls else []),
                tls=self.tls,
            )
            self.nodes.append(node)
            node.start()
        clients = [_client(n) for n in self.nodes]
        try:
            self._form(clients)
        finally:
            for c in clients:
                c.close()
        return self

    def _form(self, clients: list[redis.Redis]) -> None:
        first = self.nodes[0].port
        for c in clients[1:]:
            _command(c, "CLUSTER", "MEET", "127.0.0.1", first)
        for i, c in enumerate(clients[: self.primaries]):
            low, high = slot_range(i, self.primaries)
            _command(c, "CLUSTER", "ADDSLOTS", *range(low, high))
        ids = [_command(c, "CLUSTER", "MYID") for c in clients]

        def everyone_met() -> bool:
            return all(len(_nodes(c)) == len(clients) for c in clients)

        wait_for(everyone_met, 30, "the cluster's nodes to meet")
        for j, c in enumerate(clients[self.primaries :]):
            _command(c, "CLUSTER", "REPLICATE", ids[j % self.primaries])

        def formed() -> bool:
            return all(
                "cluster_state:ok" in _command(c, "CLUSTER", "INFO")
                and not any("fail" in flags for flags in _nodes(c))
                for c in clients
            ) and all(
                c.info("replication").get("master_link_status") == "up"
                for c in clients[self.primaries :]
            )

        wait_for(formed, 60, "the cluster to form")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for node in self.nodes:
            node.stop(sig)

    def owner(self, slot: int) -> RedisServer:
        """The primary that serves `slot` now, as the first node that answers sees it."""
        for node in self.nodes:
            try:
                with _client(node) as c:
                    slots = _command(c, "CLUSTER", "SLOTS")
            except redis.ConnectionError:  # a node that is down
                continue
            for low, high, primary, *_ in slots:
                if low <= slot <= high:
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise ServerError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, to: RedisServer) -> int:
        """Reshard `slot` to the primary `to` while clients go on (the steps `redis-cli
        --cluster reshard` takes: IMPORTING, MIGRATING, MIGRATE in batches, then NODE on
        every primary); the number of keys moved."""
        source = self.owner(slot)
        with _client(source) as src, _client(to) as dst:
            src_id, dst_id = _command(src, "CLUSTER", "MYID"), _command(dst, "CLUSTER", "MYID")
            _command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            _command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while keys := _command(src, "CLUSTER", "GETKEYSINSLOT", slot, 100):
                _command(src, "MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
            for node in self.nodes:
                with _client(node) as c:
                    if c.info("replication")["role"] == "master":
                        _command(c, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too: Redis refuses a
    cluster port above 55535."""
    for _ in range(100):
        port = random.randrange(20000, 55535)  # noqa: S311 - a port, not a secret
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise ServerError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _nodes(client: redis.Redis) -> list[str]:
    """The flags of every node `client`'s node knows (CLUSTER NODES, one line each)."""
    text: str = _command(client, "CLUSTER", "NODES")
    return [line.split()[2] for line in text.splitlines() if line.strip()]


@dataclass
class LocalSentinel:
    """One primary with `replicas` replicas, watched by `sentinels` sentinels (quorum: a
    majority of them)."""

    directory: Path
    replicas: int = 2
    sentinels: int = 3
    down_after_ms: int = NODE_TIMEOUT_MS
    tls: TlsFiles | None = None
    """TLS only: the clients, the replicas and the sentinels (a redis-server built with TLS)."""
    own_addresses: bool = False
    """Each process on a loopback address of its own (127.0.0.10, .11, ...: all of 127/8 is
    loopback), which it also connects from: a test's proxy can then tell them apart and cut
    some off (tests/fault_proxy.py, isolate). Each listens on 127.0.0.1 too."""
    front: Callable[[RedisServer], int] | None = None
    """The port the replicas and sentinels reach the primary through (a test's proxy), given
    the started primary; None: its own."""
    servers: list[RedisServer] = field(default_factory=list)
    """The primary first, then its replicas (as started: a failover changes who is which)."""
    watchers: list[RedisServer] = field(default_factory=list)
    addresses: dict[int, str] = field(default_factory=dict)
    """The address of each process by its port (with own_addresses)."""

    @property
    def url(self) -> str:
        return _url("sentinel", self.watchers, f"/{MASTER_NAME}/0", self.tls)

    def start(self) -> LocalSentinel:
        replicated = [DEPLOY_DIR / "redis-replicated.conf"]
        lag = ["--min-replicas-max-lag", str(MAX_LAG_S)]
        primary = self._server("redis0", overlays=replicated, extra=lag)
        seen_at = primary.port if self.front is None else self.front(primary)
        for i in range(self.replicas):
            follow = ["--replicaof", "127.0.0.1", str(seen_at)]
            self._server(f"redis{i + 1}", overlays=replicated, extra=[*lag, *follow])
        monitor = f"sentinel monitor {MASTER_NAME} 127.0.0.1 {seen_at} {self.sentinels // 2 + 1}"
        guide = (DEPLOY_DIR / "sentinel.conf").read_text()
        guide = re.sub(r"^sentinel monitor .*$", monitor, guide, flags=re.M)
        for i in range(self.sentinels):
            where = self.directory / f"sentinel{i}"
            where.mkdir(parents=True, exist_ok=True)
            conf = where / "sentinel.conf"  # a copy of its own: a sentinel rewrites it
            conf.write_text(
                f"{guide}\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER_NAME} {self.down_after_ms * 5}\n"
            )
            watcher = self._server(where.name, config=conf, extra=["--sentinel"])
            self.watchers.append(watcher)
        self._wait_watching(primary)
        return self

    def _server(
        self,
        name: str,
        *,
        config: Path | None = None,
        overlays: list[Path] | None = None,
        extra: list[str],
    ) -> RedisServer:
        port = free_port()
        if self.own_addresses:
            address = f"127.0.0.{10 + len(self.addresses)}"
            self.addresses[port] = address
            # protected mode accepts 127.0.0.1 only: the others are loopback too. Redis 6.2
            # connects from its first bind address; 7 from bind-source-addr.
            extra = [*extra, "--bind", address, "127.0.0.1", "--protected-mode", "no"]
            if redis_version() >= (7,):
                extra += ["--bind-source-addr", address]
        server = RedisServer(
            self.directory / name, port=port, extra=extra, overlays=overlays or [], tls=self.tls
        )
        if config is not None:
            server.config = config
        server.start()
        if config is None:
            self.servers.append(server)
        return server

    def _wait_watching(self, primary: RedisServer) -> None:
        clients = [_client(w) for w in self.watchers]
        clients.append(_client(primary))

        def watching() -> bool:
            for c in clients[:-1]:
                state = _command(c, "SENTINEL", "MASTER", MASTER_NAME)
                if isinstance(state, list):  # RESP2 without redis-py's parser: pairs
                    state = dict(zip(state[::2], state[1::2], strict=True))
                if int(state["num-slaves"]) < self.replicas:
                    return False
                if int(state["num-other-sentinels"]) < self.sentinels - 1:
                    return False
            # min-replicas-to-write: writes are refused until a replica is in sync
            info = clients[-1].info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
            in_sync: int = sum(r["state"] == "online" for r in online)
            return in_sync >= self.replicas

        try:
            wait_for(watching, 60, "the sentinels to see every replica and each other")
        finally:
            for c in clients:
                c.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for server in self.watchers + self.servers:
            server.stop(sig)
