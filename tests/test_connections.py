"""service/connections.py: no client re-sends a write whose reply was lost, on any scheme.

A reply is lost after Redis ran the command (tests/fault_proxy.py resets the connection as
the reply arrives; the next connection passes again). The call fails, and the command ran
exactly once: one event and one increment for a submit, over TCP, TLS and a Unix socket alike
(one code path: the auto-pipeline), and one count for the persister's failure counter.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import ssl
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import redis.exceptions
import uvloop
from fault_proxy import FaultProxy, Mode
from support import Servers

from persister.events import Event
from persister.stream import EventStream
from service.batching import AutoPipeline
from service.connections import async_redis, sync_redis
from service.dev.servers import RedisServer
from service.dev.tls import self_signed
from service.dev.topologies import LocalSentinel
from service.keys import KeySchema
from service.scripts import Scripts, Status, prepare_submit
from service.settings import Settings
from service.users import provision_sync


class OneLostReply(FaultProxy):
    """A FaultProxy that, once armed, loses the replies on the connections open now, and lets
    every connection opened after the first loss pass: a retry on a new connection would be
    heard. Optionally listening on a Unix socket."""

    def __init__(
        self,
        host: str,
        port: int,
        unix_path: Path | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host, port, tls)
        self.unix_path = unix_path

    def start(self) -> OneLostReply:
        if self.unix_path is None:
            super().start()
            return self
        self._thread.start()
        self._server = self._call(asyncio.start_unix_server(self._handle, str(self.unix_path)))
        return self

    def arm(self) -> None:
        self.dropped_replies = 0
        self.set(Mode.DROP_REPLIES)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is Mode.DROP_REPLIES and self.dropped_replies:
            self.mode = Mode.PASS
        await super()._handle(reader, writer)


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[RedisServer, ssl.SSLContext, Path]]:
    """A throwaway Redis, and a TLS context with a self-signed certificate for 127.0.0.1 (the
    proxy in front of it terminates TLS: any redis-server will do, built with TLS or not)."""
    directory = Path(tempfile.mkdtemp(prefix="score-tls-"))
    tls = self_signed(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    server = RedisServer(directory / "redis").start()
    try:
        yield server, context, tls.cert
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _proxied(
    scheme: str, tls: tuple[RedisServer, ssl.SSLContext, Path], directory: Path
) -> tuple[OneLostReply, str]:
    """A proxy in front of the Redis, and the REDIS_URL of `scheme` through it."""
    server, context, cert = tls
    if scheme == "unix":
        path = directory / "redis.sock"
        return OneLostReply("127.0.0.1", server.port, path).start(), f"unix://{path}?db=0"
    if scheme == "rediss":
        proxy = OneLostReply("127.0.0.1", server.port, tls=context).start()
        return proxy, f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
    proxy = OneLostReply("127.0.0.1", server.port).start()
    return proxy, f"redis://127.0.0.1:{proxy.port}/0"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a Unix socket path has at most 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="sc-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("scheme", ["redis", "unix", "rediss"])
def test_a_submit_whose_reply_is_lost_fails_and_counts_once(
    scheme: str,
    tls_redis: tuple[RedisServer, ssl.SSLContext, Path],
    servers: Servers,
    short_dir: Path,
) -> None:
    server = tls_redis[0]
    direct = redis.Redis.from_url(server.url)
    direct.flushall()
    settings = Settings(redis_url=server.url, jwt_secret="s" * 40)
    schema = KeySchema(settings.partitions)
    direct.mset(dict.fromkeys(schema.ready_markers, "1"))  # as after a first rebuild
    user = f"u-{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.postgres.url) as conn:
        provision_sync(conn, direct, schema, settings.top_n, [user])
    events = schema.for_user(user).events
    proxy, url = _proxied(scheme, tls_redis, short_dir)

    async def submit_twice() -> tuple[Any, Any, bool]:
        client = async_redis(Settings(redis_url=url, jwt_secret="s" * 40))
        try:
            scripts = Scripts(client)
            first = await scripts.submit(prepare_submit(settings, schema, user, 100))
            proxy.arm()
            try:
                lost: Any = await scripts.submit(prepare_submit(settings, schema, user, 100))
            except redis.exceptions.ConnectionError as exc:
                lost = exc
            pipelined = AutoPipeline.for_client(client, 0.5) is not None
            return first, lost, pipelined
        finally:
            await client.aclose()

    try:
        first, lost, pipelined = asyncio.run(submit_twice())
    finally:
        proxy.stop()
    assert (first.status, first.total) == (Status.OK, 100)
    assert proxy.dropped_replies >= 1
    # the service answers 503 for a ConnectionError; a re-sent script would have answered
    # 200 with new_score 200
    assert isinstance(lost, redis.exceptions.ConnectionError), lost
    assert direct.xlen(events) == 2  # the first submit's event, and the lost one's: ran once
    assert direct.zscore(schema.for_user(user).leaderboard, user) == -200
    assert pipelined  # every scheme takes the same path
    direct.close()


def test_a_lost_reply_to_the_failure_counter_counts_once(
    settings: Settings, r: redis.Redis, servers: Servers
) -> None:
    proxy = OneLostReply("127.0.0.1", servers.redis.port).start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    client = sync_redis(Settings(redis_url=url, jwt_secret="s" * 40))
    try:
        stream = EventStream(client, KeySchema(settings.partitions).all()[0], "consumer-1")
        event = Event(stream_id="1-0", event_id=str(uuid.uuid4()), user_id="u", delta=1)
        assert stream.record_failure(event) == 1
        proxy.arm()
        with pytest.raises(redis.exceptions.ConnectionError):
            stream.record_failure(event)
        assert proxy.dropped_replies >= 1
        assert r.hget(stream.keys.persist_failures, event.event_id) == b"2"
        assert stream.record_failure(event) == 3
    finally:
        client.close()
        proxy.stop()


def test_no_client_that_writes_retries_and_a_reading_one_may() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", jwt_secret="s" * 40)
    sync_client = sync_redis(settings)
    async_client = async_redis(settings)
    reader = async_redis(settings, reads_only=True)
    retries = [
        c.connection_pool.make_connection().retry.get_retries()
        for c in (sync_client, async_client, reader)
    ]
    assert retries == [0, 0, 1]
    sync_client.close()


def test_a_transport_closed_under_uvloop_is_a_connection_error(servers: Servers) -> None:
    """Seen in the chaos soak: under uvloop (as `serve` runs), a write to a transport that a
    reset closed raises RuntimeError("... the handler is closed"), which redis-py let through as
    a 500. It is a broken connection: ConnectionError (503), and the next call reconnects."""

    async def scenario() -> bytes:
        client = async_redis(Settings(redis_url=servers.redis.url, jwt_secret="s" * 40))
        try:
            assert await client.ping()
            conn = await client.connection_pool.get_connection()
            conn._writer.transport.abort()  # the reset, as the loop sees it
            with pytest.raises(redis.exceptions.ConnectionError):
                await conn.send_command("PING")
            await client.connection_pool.release(conn)
            return await client.echo("again")
        finally:
            await client.aclose()

    assert uvloop.run(scenario()) == b"again"


class _Interrupted(Exception):
    """What RQ's SIGTERM handler raises inside a blocking read (StopRequested)."""


def test_a_sentinel_read_cut_short_leaves_no_reply_for_the_next_command(tmp_path: Path) -> None:
    """redis-py's blocking Sentinel connection would stay in the pool after a read cut short by
    an exception, and the next command on it would wait for the cut one's reply (a worker's
    SIGTERM during its idle BLPOP: the goodbye hung for minutes)."""
    deployment = LocalSentinel(tmp_path / "sentinel", replicas=1, sentinels=1).start()
    settings = Settings(redis_url=deployment.url, jwt_secret="s" * 40)
    client = sync_redis(settings, socket_timeout=30)
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Interrupted()))
    try:
        client.set("k", "v")
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Interrupted):
            client.blpop(["empty"], timeout=20)
        assert client.get("k") == b"v"  # its own reply, not BLPOP's (nil, 20 s later)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        client.close()
        deployment.stop()
