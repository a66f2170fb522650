"""Which Redis deployment REDIS_URL names, and clients for it.

- `redis://`, `rediss://`, `unix://`: one Redis server;
- `redis+sentinel://[:pw@]h1:26379,h2:26379/<master>[/db]`: Sentinel, the primary found, and
  followed across failovers;
- `redis+cluster://[:pw@]h1:6379,h2:6379`: Cluster, slots discovered, MOVED/ASK followed.

`rediss+sentinel://` and `rediss+cluster://` are the TLS forms. Query parameters are
redis-py's own (`ssl_cert_reqs`, `ssl_ca_certs`, `socket_timeout`...), and for Sentinel
`sentinel_username` / `sentinel_password` when the sentinels require their own auth (the
URL's credentials are the data nodes').

The clients are redis-py's own (Sentinel's master_for, RedisCluster): nothing here replaces
them, it only builds them the same way for every process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.connection import parse_url
from redis.exceptions import RedisClusterException

Kind = Literal["server", "sentinel", "cluster"]
P = ParamSpec("P")
R = TypeVar("R")

SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "unix": ("server", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")


class BadRedisUrl(ValueError):
    """REDIS_URL does not name a deployment; the message never echoes the URL (it may carry
    a password)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """A parsed REDIS_URL."""

    kind: Kind
    tls: bool
    url: str
    """As given (one server: what redis-py's from_url takes)."""
    hosts: tuple[tuple[str, int], ...] = ()
    """Sentinels or cluster seed nodes."""
    master: str = ""
    """Sentinel: the name of the monitored primary."""
    options: dict[str, Any] = field(default_factory=dict)
    """Connection options from the URL (credentials, db, TLS settings)."""
    sentinel_options: dict[str, Any] = field(default_factory=dict)


@cache
def parse(url: str, name: str = "REDIS_URL") -> RedisTarget:
    """The deployment a Redis URL names (BadRedisUrl when it names none); `name` is the
    variable it comes from, for the message."""
    try:
        return _parse(url)
    except BadRedisUrl as exc:
        raise BadRedisUrl(str(exc).replace("REDIS_URL", name)) from None


def _parse(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise BadRedisUrl(
            f"REDIS_URL must be a URL with scheme {' or '.join(SCHEMES)}, "
            f"got scheme {(scheme if sep else '') or 'none'!r}"
        )
    kind, tls = SCHEMES[scheme]
    if kind == "server":
        return RedisTarget(kind, tls, url)
    # Split by hand: urllib refuses a bracketed IPv6 host inside a list of hosts
    rest, _, query_text = rest.partition("?")
    netloc, _, path_text = rest.partition("/")
    credentials, _, host_list = netloc.rpartition("@")
    hosts = tuple(_host(h, kind) for h in host_list.split(",") if h.strip())
    if not hosts:
        raise BadRedisUrl(f"REDIS_URL ({scheme}) must name at least one host:port")
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    sentinel_auth = {k: query.pop(k) for k in _SENTINEL_AUTH if k in query}
    path = [unquote(p) for p in path_text.split("/") if p]
    master, db = "", "0"
    if kind == "sentinel":
        if not path or len(path) > 2:
            raise BadRedisUrl(
                "REDIS_URL (Sentinel) must end in /<master-name> or /<master-name>/<db>"
            )
        master = path[0]
        db = path[1] if len(path) == 2 else "0"
    elif path:
        raise BadRedisUrl("REDIS_URL (Cluster) takes no path: a cluster has only database 0")
    if not db.isdigit():
        raise BadRedisUrl(f"REDIS_URL: the database must be a number, got {db!r}")
    # redis-py parses credentials and its query options: give it a one-host URL to parse
    one = f"{'rediss' if tls else 'redis'}://{credentials + '@' if credentials else ''}x/{db}"
    if query:
        one += "?" + urlencode(query)
    try:
        options = parse_url(one)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise BadRedisUrl(f"REDIS_URL: {exc}") from exc
    options.pop("host", None)
    options.pop("port", None)
    options.pop("connection_class", None)  # SSL is chosen per topology below
    if kind == "cluster":
        options.pop("db", None)
    sentinel_options = {k.removeprefix("sentinel_"): v for k, v in sentinel_auth.items()}
    return RedisTarget(kind, tls, url, hosts, master, options, sentinel_options)


def _host(text: str, kind: Kind) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        default = 26379 if kind == "sentinel" else 6379
        raise BadRedisUrl(
            f"REDIS_URL: each host must be host:port (e.g. redis-1:{default}), got {text!r}"
        )
    return host.strip("[]"), int(port)


def async_client(target: RedisTarget, **options: Any) -> Any:
    """An asyncio client for `target`: aioredis.Redis (one server, Sentinel's primary) or
    redis.asyncio.RedisCluster. `options` are connection options (timeouts, retry)."""
    if target.kind == "server":
        return aioredis.Redis.from_url(target.url, **options)
    merged = target.options | options | _tls(target)
    if target.kind == "sentinel":
        asyncio_sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, options)
        )
        return asyncio_sentinel.master_for(target.master, **merged)
    nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in target.hosts]
    return _AsyncCluster(startup_nodes=nodes, **merged)


def sync_client(target: RedisTarget, **options: Any) -> Any:
    """A blocking client for `target`: redis.Redis or redis.cluster.RedisCluster."""
    if target.kind == "server":
        return redis.Redis.from_url(target.url, **options)
    merged = target.options | options | _tls(target)
    if target.kind == "sentinel":
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=_sentinel_kwargs(target, options)
        )
        return sentinel.master_for(target.master, **merged)  # type: ignore[no-untyped-call]
    nodes = [
        redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
        for h, p in target.hosts
    ]
    # the blocking client reads the slot map in its constructor
    client = _unreachable(redis.cluster.RedisCluster)(startup_nodes=nodes, **merged)
    manager = client.nodes_manager
    manager.initialize = _unreachable(manager.initialize)  # type: ignore[method-assign]
    return client


class ClusterUnreachable(redis.ConnectionError):
    """No node of the cluster gave a slot map that covers every slot. redis-py raises
    RedisClusterException then, which is no RedisError: every caller here treats an
    unreachable Redis as a ConnectionError (503, wait and try again), so the cluster's
    clients say it that way too. (The blocking client's NodesManager is wrapped, as the
    client calls it from many places; the asyncio one has __slots__, and its client
    reaches it through `initialize`.)"""


def _unreachable(read_slot_map: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(read_slot_map)
    def reading(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return read_slot_map(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc

    return reading


class _AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """The asyncio RedisCluster, saying ClusterUnreachable when no node gives a slot map (it
    reads one before its first command, and again after a failed node)."""

    async def initialize(self, *args: Any, **kwargs: Any) -> _AsyncCluster:
        try:
            await super().initialize(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnreachable(str(exc)) from exc
        return self


def _tls(target: RedisTarget) -> dict[str, Any]:
    return {"ssl": True} if target.tls else {}


def _sentinel_kwargs(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    """What the connections to the sentinels get: the timeouts, TLS and the URL's TLS
    settings, and only the sentinels' own credentials (not the data nodes')."""
    kept = {k: v for k, v in options.items() if k.startswith("socket_")}
    tls = {k: v for k, v in target.options.items() if k.startswith("ssl")}
    return kept | tls | _tls(target) | target.sentinel_options
