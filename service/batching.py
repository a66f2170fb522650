"""Auto-pipelining: the Redis calls that one process's requests make in the same turn of the
event loop go out in one write on one connection, and their replies come back in one read.

redis-py's asyncio client spends more per command than Redis does running our script: a
pool checkout behind a lock, a write and a drain per command, `wait_for` and a timer per
read. Here a call costs a packed command (hiredis, in C) and a future; everything else is
paid once per batch. Each call still gets its own reply or its own error: Redis answers a
pipeline in order, and an error reply is one call's exception, never the batch's.

Failure rules, the same as the plain client's: a call that cannot reach Redis, or whose reply
has not come `timeout` seconds after it was written (2 x `timeout` while Redis goes on
answering earlier calls; each plus a 20 ms second look), fails with ConnectionError or
TimeoutError (the hot path answers 503). A call is never sent twice: after a write, a broken
connection fails the calls waiting on it; calls not yet written wait for the next connection.

The connection is borrowed from the client's own pool, so `Redis.aclose()` closes it with the
rest; it speaks through the connection's stream reader and writer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import Counter
from redis._parsers.base import BaseParser
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException

from service.topology import ClusterUnreachable

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16
_ASKING = hiredis.pack_command(("ASKING",))
REDIRECTS = Counter(
    "score_redis_redirects",
    "Hot-path calls sent again after a Redis Cluster's MOVED, ASK or TRYAGAIN (none ran them)",
    ["reply"],
)
MAX_REDIRECTS = 5
"""A call follows at most this many MOVED/ASK/TRYAGAIN replies (none of which ran it)."""
LOOK_AGAIN_S = 0.02
_STALE_PRIMARY = re.compile(r"\b(READONLY|NOREPLICAS)\b")
"""Error replies (whole, or inside a script's ERR on Redis 6.2) of a primary that is no longer
one, or cut off from its replicas."""
# redis-py's connections over asyncio streams (`_reader`, `_writer`), one per URL scheme
_STREAM_CONNECTIONS = (
    aioredis.Connection,
    aioredis.SSLConnection,
    aioredis.UnixDomainSocketConnection,
)


class NotReplicated(redis.exceptions.RedisError):
    """WAIT did not see the call's batch on enough replicas in time: it ran on the primary,
    and a failover now could lose it. The client is told so (503): its retry with the same
    Idempotency-Key is safe."""


@dataclass(frozen=True, slots=True)
class Replication:
    """SCORE_REDIS_MIN_REPLICAS and SCORE_REDIS_WAIT_MS: a batch's replies are given only
    once `WAIT replicas wait_ms` confirms them (replicas 0: at once, no WAIT)."""

    replicas: int = 0
    wait_ms: int = 500


NO_WAIT = Replication()
"""Replies are given as they come (SCORE_REDIS_MIN_REPLICAS=0)."""


class AutoPipeline:
    """Batches the calls of the coroutines of one event loop onto one Redis connection."""

    def __init__(self, client: Any, timeout: float, replication: Replication = NO_WAIT) -> None:
        """`client`: anything with a `connection_pool` that lends redis-py asyncio
        connections (a Redis client; a cluster node's, see _NodeClient)."""
        self._pool = client.connection_pool
        self._replication = replication
        # WAIT answers after up to wait_ms: the deadline of a call grows by as much
        self._timeout = timeout + (replication.wait_ms / 1000 if replication.replicas else 0)
        self._queued: list[tuple[bytes, asyncio.Future[Any]]] = []  # not yet written
        # written calls: when, their future, and for a WAIT the replicas it must count
        self._waiting: collections.deque[tuple[float, asyncio.Future[Any], int]] = (
            collections.deque()
        )
        self._conn: Any = None  # the borrowed redis.asyncio.Connection
        self._connecting: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_reply = 0.0  # loop time of the last data read from Redis
        self._looked_again = False
        self._looked_at = 0.0
        self.node: Any = None  # the cluster node it serves (ClusterAutoPipeline)

    @classmethod
    def for_client(
        cls, client: Any, timeout: float, replication: Replication = NO_WAIT
    ) -> AutoPipeline | None:
        """An AutoPipeline over `client`, or None when it cannot work with it (a fake, or a
        connection class of another library): use the client directly.

        TCP, TLS and Unix sockets alike, and Sentinel's pool (which connects to the primary
        the sentinels name): the pool opens the connection (with its TLS handshake, AUTH and
        SELECT), and every scheme speaks through asyncio streams."""
        pool = getattr(client, "connection_pool", None)
        if type(client) is not aioredis.Redis or not isinstance(pool, aioredis.ConnectionPool):
            return None
        if not issubclass(pool.connection_class, _STREAM_CONNECTIONS):
            return None
        return cls(client, timeout, replication)

    def execute(
        self, *args: str | bytes | int | float, asking: bool = False
    ) -> asyncio.Future[Any]:
        """Queue one command: a future of its reply, or of the exception its error reply maps
        to. A future, not a coroutine: on the hot path every level of coroutines between the
        request's task and this future is run again when the reply comes.

        `asking`: preceded by ASKING, in the same write (a cluster's slot being migrated)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if asking:  # its reply ("OK") goes to a future nobody waits for
            self._queued.append((_ASKING, loop.create_future()))
        self._queued.append((hiredis.pack_command(args), future))  # type: ignore[arg-type]
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queued:
            return
        writer = getattr(self._conn, "_writer", None) if self._conn is not None else None
        if writer is None or writer.is_closing():
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return
        batch, self._queued = self._queued, []
        loop = asyncio.get_running_loop()
        written = loop.time()
        if self._replication.replicas:
            batch = _confirmed(batch, self._replication)
            self._waiting.extend((written, future, 0) for _, future in batch[:-1])
            self._waiting.append((written, batch[-1][1], self._replication.replicas))
        else:
            self._waiting.extend((written, future, 0) for _, future in batch)
        writer.write(b"".join(packed for packed, _ in batch))
        if self._watchdog is None:
            self._watchdog = loop.call_at(written + self._timeout, self._check_deadline)

    async def _connect(self) -> None:
        try:
            conn = await self._pool.get_connection()
        except Exception as exc:  # every queued call gets the reason
            self._connecting = None
            if not isinstance(exc, redis.exceptions.RedisError):
                # a connection reset during the handshake can surface as uvloop's RuntimeError
                # ("the handler is closed"): still Redis being unreachable, a 503, never a 500
                exc = redis.exceptions.ConnectionError(f"cannot connect to Redis: {exc!r}")
            self._fail_queued(exc)
            return
        self._connecting = None
        stream = getattr(conn, "_reader", None)
        if stream is None:  # a redis-py without the stream attributes: give up loudly
            await self._pool.release(conn)
            self._fail_queued(redis.exceptions.ConnectionError("cannot pipeline on this client"))
            return
        self._conn = conn
        self._reader = asyncio.get_running_loop().create_task(self._read(conn, stream))
        self._flush()

    async def _read(self, conn: Any, stream: asyncio.StreamReader) -> None:
        parser = hiredis.Reader(replyError=redis.exceptions.ResponseError)
        waiting = self._waiting
        error: Exception = redis.exceptions.ConnectionError("Redis closed the connection")
        stale = ""
        try:
            while True:
                data = await stream.read(READ_CHUNK)
                if not data:
                    break
                self._last_reply = asyncio.get_running_loop().time()
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    _, future, confirms = waiting.popleft()
                    if isinstance(reply, redis.exceptions.ResponseError):
                        if _STALE_PRIMARY.search(str(reply)):
                            stale = str(reply)
                        if not future.done():  # else: timed out meanwhile
                            future.set_exception(_error(str(reply)))
                        continue
                    if confirms and reply < confirms:
                        stale = f"WAIT {confirms}: {reply}"
                    if not future.done():
                        future.set_result(reply)
                if stale:
                    # A primary demoted by a failover (READONLY: nothing ran), or one cut off
                    # from its replicas (NOREPLICAS, or WAIT short): maybe no longer the one
                    # the sentinels name. Drop the connection: a new one asks them again.
                    error = redis.exceptions.ConnectionError(f"not a healthy primary: {stale}")
                    break
        except (OSError, hiredis.ProtocolError, IndexError) as exc:
            error = redis.exceptions.ConnectionError(f"Error while reading from Redis: {exc!r}")
        finally:
            await self._drop(conn, error)

    async def _drop(self, conn: Any, error: Exception) -> None:
        """Forget a broken connection: fail what was written on it, give it back to the pool."""
        if self._conn is conn:
            self._conn = None
            self._fail_waiting(error)
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)
            if self._queued and not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if self._looked_again and self._last_reply > self._looked_at:
            self._looked_again = False  # Redis answered meanwhile
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        written, _, _ = self._waiting[0]
        # The oldest call gets `timeout`, and a second one while Redis keeps answering: a
        # busy process reads late (its timers can fire before it reads what has arrived),
        # which is no reason to answer 503.
        deadline = written + self._timeout
        if now - self._last_reply < self._timeout:
            deadline = min(written + 2 * self._timeout, self._last_reply + self._timeout)
        if deadline > now:
            self._watchdog = loop.call_at(deadline, self._check_deadline)
            return
        if not self._looked_again:
            # A process that was not scheduled for a while runs its timers before it reads
            # its sockets: read what has arrived before blaming Redis.
            self._looked_again, self._looked_at = True, now
            self._watchdog = loop.call_at(now + LOOK_AGAIN_S, self._check_deadline)
            return
        # Redis is hung or gone. The stream can no longer be trusted to line up replies with
        # calls, so drop the connection.
        self._looked_again = False
        conn = self._conn
        self._fail_waiting(redis.exceptions.TimeoutError("Timeout reading from Redis"))
        if conn is not None and self._reader is not None:
            self._reader.cancel()

    def _fail_waiting(self, error: Exception) -> None:
        while self._waiting:
            _, future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(_copy(error))

    def _fail_queued(self, error: Exception) -> None:
        batch, self._queued = self._queued, []
        for _, future in batch:
            if not future.done():
                future.set_exception(_copy(error))


def _confirmed(
    batch: list[tuple[bytes, asyncio.Future[Any]]], replication: Replication
) -> list[tuple[bytes, asyncio.Future[Any]]]:
    """`batch` followed by its WAIT: each call's reply goes to a stand-in, and reaches the
    caller only once WAIT has answered (replies come in order: WAIT's is last)."""
    loop = asyncio.get_running_loop()
    held = [(packed, loop.create_future(), caller) for packed, caller in batch]
    wait: asyncio.Future[Any] = loop.create_future()
    n, ms = replication.replicas, replication.wait_ms

    def settle(done: asyncio.Future[Any]) -> None:
        acked = None if done.exception() else int(done.result())
        for _, stand_in, caller in held:
            if caller.done():
                continue
            if stand_in.exception() is not None:  # refused, or lost: as it is
                caller.set_exception(_copy(stand_in.exception()))  # type: ignore[arg-type]
            elif acked is None:
                caller.set_exception(
                    redis.exceptions.ConnectionError("the connection broke before WAIT answered")
                )
            elif acked < n:
                caller.set_exception(
                    NotReplicated(f"confirmed by {acked} of {n} replica(s) within {ms} ms")
                )
            else:
                caller.set_result(stand_in.result())

    wait.add_done_callback(settle)
    return [(packed, stand_in) for packed, stand_in, _ in held] + [
        (hiredis.pack_command(("WAIT", n, ms)), wait)  # type: ignore[arg-type]
    ]


def _error(message: str) -> Exception:
    """The redis-py exception for an error reply (NOSCRIPT, OOM, LOADING, READONLY...)."""
    error: Exception = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def _copy(error: Exception) -> Exception:
    """A fresh exception per call: one raised instance must not collect every call's traceback."""
    return type(error)(*error.args)


class ClusterAutoPipeline:
    """One AutoPipeline per primary of a Redis Cluster: a call goes to the primary that holds
    its first key's slot, in that primary's batch.

    MOVED (the slot has moved: the slot map is read again), ASK (the key is being migrated:
    ASKING then the call, at the node named) and TRYAGAIN (a migration under way) are
    followed: each says the call did not run, so sending it again is safe. Every other
    failure is the AutoPipeline's own: sent once, never again.
    """

    def __init__(self, client: Any, timeout: float, replication: Replication = NO_WAIT) -> None:
        self._client = client
        self._timeout = timeout
        self._replication = replication
        self._pipelines: dict[str, AutoPipeline] = {}
        self._stale = False  # a node failed: read the slot map again before the next call
        self._refreshing = asyncio.Lock()

    async def execute(self, *args: str | bytes | int | float) -> Any:
        """Run one EVAL, EVALSHA or FCALL with at least one key (its first key, args[3],
        routes it)."""
        if args[0] not in ("EVAL", "EVALSHA", "FCALL") or not int(args[2]):
            raise ValueError("ClusterAutoPipeline runs EVAL/EVALSHA/FCALL calls with keys only")
        slot = key_slot(str(args[3]).encode())
        asking_at: str | None = None
        nodes = self._client.nodes_manager
        if self._stale or not nodes.slots_cache:
            await self._refresh()
        for _ in range(MAX_REDIRECTS):
            node = nodes.get_node(node_name=asking_at) if asking_at else None
            if node is None:
                node = nodes.get_node_from_slot(slot)
            try:
                return await self._for(node).execute(*args, asking=asking_at is not None)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                # the node may be dead and its slots taken over by a replica (a failover):
                # the next call reads the map again; this one may have run, so it fails
                self._stale = True
                raise
            except redis.exceptions.MovedError:
                REDIRECTS.labels("moved").inc()
                self._stale = True  # the calls that met the same move read the map once
                await self._refresh()
                asking_at = None
            except redis.exceptions.AskError as exc:
                REDIRECTS.labels("ask").inc()
                asking_at = f"{exc.host}:{exc.port}"
                if nodes.get_node(node_name=asking_at) is None:
                    self._stale = True
                    await self._refresh()
            except redis.exceptions.TryAgainError:
                REDIRECTS.labels("tryagain").inc()
                await asyncio.sleep(LOOK_AGAIN_S)
                asking_at = None
        raise redis.exceptions.ClusterError(f"still redirected after {MAX_REDIRECTS} tries")

    async def _refresh(self) -> None:
        """Read the slot map again, once for all the calls that wait for it."""
        async with self._refreshing:
            if self._stale or not self._client.nodes_manager.slots_cache:
                self._stale = False
                try:
                    await self._client.nodes_manager.initialize()
                except (redis.exceptions.RedisError, RedisClusterException) as exc:
                    self._stale = True  # no node answered: the next call tries again
                    if isinstance(exc, RedisClusterException):  # no RedisError: say it as one
                        raise ClusterUnreachable(str(exc)) from exc
                    raise

    def _for(self, node: Any) -> AutoPipeline:
        pipeline = self._pipelines.get(node.name)
        if pipeline is None or pipeline.node is not node:
            pipeline = AutoPipeline(_NodeClient(node), self._timeout, self._replication)
            pipeline.node = node
            self._pipelines[node.name] = pipeline
        return pipeline


class _NodeClient:
    """A cluster node's connections, in the shape AutoPipeline borrows them in."""

    def __init__(self, node: Any) -> None:
        self.connection_pool = self
        self._node = node

    async def get_connection(self) -> Any:
        conn = self._node.acquire_connection()
        if not conn.is_connected:
            try:
                await conn.connect()
            except BaseException:
                self._node.release(conn)
                raise
        return conn

    async def release(self, conn: Any) -> None:
        self._node.release(conn)


def auto_pipeline(
    client: Any, timeout: float, replication: Replication = NO_WAIT
) -> AutoPipeline | ClusterAutoPipeline | None:
    """The auto-pipeline for `client` (one server, Sentinel or Cluster); None for a client
    it cannot work with (a fake)."""
    if isinstance(client, RedisCluster):
        return ClusterAutoPipeline(client, timeout, replication)
    return AutoPipeline.for_client(client, timeout, replication)
