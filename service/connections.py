"""Redis and Postgres clients with the timeouts the hot path needs.

The hot path fails closed and fast: a Redis that is down or hung costs a request at most
about a second (then 503 with Retry-After), never a hang.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.exceptions
import redis.retry
import redis.sentinel
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
from redis.backoff import NoBackoff
from redis.utils import SENTINEL

from service import topology
from service.settings import ConfigError, Settings

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 0.25
SAFE_EVICTION_POLICY = "noeviction"


# No client ever re-sends a command by itself. A command whose reply was lost (a connection
# reset after Redis ran it) may have run: re-sent blindly, a script would count an increment
# twice, a HINCRBY twice, a RENAME against the renamed key. Such a call fails with
# ConnectionError; whoever made it decides (the hot path answers 503, and the client's retry
# is made safe by its Idempotency-Key). Checking out a connection is not sending: the pool
# replaces a pooled connection that Redis closed (a restart) before it is used.
# A client that only reads may retry: `reads_only`.
NO_RETRY = 0


def async_redis(
    settings: Settings, *, reads_only: bool = False, **overrides: Any
) -> aioredis.Redis:
    """An asyncio client with bounded timeouts, which never re-sends a command (see above).

    `reads_only`: a client that only reads, and may send a read again once after a broken
    connection (the asyncio client needs its own Retry class: given the blocking one, it
    silently never retries)."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "retry": redis.asyncio.retry.Retry(NoBackoff(), _retries(reads_only), _RETRIED),
        "health_check_interval": 0,
    }
    client = topology.async_client(settings.redis, **(options | overrides))
    _closed_transport_safe(client)
    client_: aioredis.Redis = client
    return client_


def _closed_transport_safe(client: Any) -> None:
    """Swap the client's connection class for its _ClosedTransportIsConnectionError form: in
    its pool (one server, Sentinel), or in every cluster node's."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        pool.connection_class = _safe(pool.connection_class)
        return
    nodes = client.nodes_manager
    nodes.connection_kwargs["connection_class"] = _safe(
        nodes.connection_kwargs.get("connection_class", aioredis.Connection)
    )
    for node in nodes.startup_nodes.values():
        node.connection_class = _safe(node.connection_class)


def _safe(connection_class: type[Any]) -> type[Any]:
    return _CLOSED_TRANSPORT_SAFE.get(connection_class, connection_class)


class _ClosedTransportIsConnectionError(AbstractConnection):
    """Under uvloop, a write to a transport that a reset closed meanwhile (even inside the
    connect handshake) raises RuntimeError("... the handler is closed"), which redis-py does not
    expect: it would surface as a 500. It is a broken connection, so redis-py's own OSError
    path (disconnect, then ConnectionError: a 503) takes it."""

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        try:
            await super()._send_packed_command(command)
        except RuntimeError as exc:
            raise ConnectionResetError(str(exc)) from exc


class _SafeConnection(_ClosedTransportIsConnectionError, aioredis.Connection):
    pass


class _SafeSSLConnection(_ClosedTransportIsConnectionError, aioredis.SSLConnection):
    pass


class _SafeUnixConnection(_ClosedTransportIsConnectionError, aioredis.UnixDomainSocketConnection):
    pass


class _SafeSentinelConnection(_ClosedTransportIsConnectionError, SentinelManagedConnection):
    pass


class _SafeSentinelSSLConnection(_ClosedTransportIsConnectionError, SentinelManagedSSLConnection):
    pass


_CLOSED_TRANSPORT_SAFE: dict[type[Any], type[Any]] = {
    aioredis.Connection: _SafeConnection,
    aioredis.SSLConnection: _SafeSSLConnection,
    aioredis.UnixDomainSocketConnection: _SafeUnixConnection,
    SentinelManagedConnection: _SafeSentinelConnection,
    SentinelManagedSSLConnection: _SafeSentinelSSLConnection,
}


def sync_redis(settings: Settings, **overrides: Any) -> redis.Redis:
    """A blocking client with bounded timeouts (CLI, persister), which never re-sends a
    command (see above)."""
    return _blocking(settings.redis, overrides)


def queue_redis(settings: Settings, **overrides: Any) -> redis.Redis:
    """The same, to the Redis of the persister's RQ job queue (SCORE_QUEUE_URL, by default
    REDIS_URL's deployment; never a cluster: RQ's commands span keys of many slots)."""
    return _blocking(settings.queue_redis, overrides)


def _blocking(target: topology.RedisTarget, overrides: dict[str, Any]) -> redis.Redis:
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "retry": redis.retry.Retry(NoBackoff(), NO_RETRY, _RETRIED),
        "health_check_interval": 0,
    }
    client: redis.Redis = topology.sync_client(target, **(options | overrides))
    pool = getattr(client, "connection_pool", None)  # a cluster has one per node, none here
    if pool is not None:
        pool.connection_class = _DISCONNECTS_ON_ERROR.get(
            pool.connection_class, pool.connection_class
        )
    return client


class _DisconnectOnError(redis.sentinel.SentinelManagedConnection):
    """redis-py's blocking Sentinel connection, unlike every other, keeps a connection whose
    read was interrupted (`disconnect_on_error` defaults to False there): the next command on
    it reads the interrupted one's reply. Seen: RQ's SIGTERM (StopRequested) inside its BLPOP
    left the connection in the pool, and the worker's goodbye waited minutes for BLPOP's reply.
    Here it is dropped, as every other connection class does."""

    def read_response(
        self,
        disable_decoding: bool = False,
        *,
        timeout: float | object = SENTINEL,
        disconnect_on_error: bool | None = True,
        push_request: bool | None = False,
    ) -> Any:
        return super().read_response(
            disable_decoding,
            timeout=timeout,
            disconnect_on_error=disconnect_on_error,
            push_request=push_request,
        )


class _DisconnectOnErrorSSL(_DisconnectOnError, redis.sentinel.SentinelManagedSSLConnection):
    pass


_DISCONNECTS_ON_ERROR: dict[type[Any], type[Any]] = {
    redis.sentinel.SentinelManagedConnection: _DisconnectOnError,
    redis.sentinel.SentinelManagedSSLConnection: _DisconnectOnErrorSSL,
}


# A read sent again after a broken connection: after a failover, the first use of a pooled
# connection fails and a fresh one succeeds. Timeouts are not retried: a hung Redis costs
# one socket timeout, not two.
_RETRIED = (redis.exceptions.ConnectionError,)


def _retries(reads_only: bool) -> int:
    return 1 if reads_only else NO_RETRY


MAX_DOUBLINGS = 16
"""Failures are counted up to this for a backoff: its cap is reached long before, and redis-py's
backoffs compute base * 2**failures, which no longer fits a float past ~1000 (a long outage)."""


def failed_again(failures: int) -> int:
    """The count of consecutive failures after one more (bounded, see MAX_DOUBLINGS)."""
    return min(failures + 1, MAX_DOUBLINGS)


def eviction_problem(info: dict[str, Any]) -> str | None:
    """Why a Redis with this `INFO memory` could lose our keys, or None if it cannot."""
    policy = info.get("maxmemory_policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy != SAFE_EVICTION_POLICY:
        return (
            f"Redis maxmemory-policy is {policy!r}: it could evict leaderboard, rate-limit or "
            f"idempotency keys. Set 'maxmemory-policy {SAFE_EVICTION_POLICY}' (see redis.conf)"
        )
    return None


def check_redis(client: redis.Redis) -> None:
    """Refuse a Redis that could evict our keys (ConfigError)."""
    problem = eviction_problem(client.info("memory"))
    if problem:
        raise ConfigError(problem)


def refuse_evicting_redis(settings: Settings) -> None:
    """Before serving (`serve`, and the app's startup: it may run under another server):
    ConfigError for a Redis that could evict our keys.

    A Redis that is not reachable yet is not refused: the service starts, reports
    "unavailable" on /readyz and answers 503 until Redis is up.
    """
    try:
        # inside: a cluster's client reads the slot map as it is made
        with contextlib.closing(
            sync_redis(settings, socket_timeout=2.0, socket_connect_timeout=1.0)
        ) as client:
            check_redis(client)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        log.warning("Redis is not reachable yet (%s); /readyz will say so until it is", exc)
