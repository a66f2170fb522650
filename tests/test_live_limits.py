"""The live leaderboard under load and abuse: connection limits, Origin allowlist, slow and
dead clients, oversized messages, and Redis missing when a client arrives."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
import websockets
from live_support import (
    WAIT_S,
    connect,
    frames_until,
    metric,
    post_score,
    recv_frame,
    running,
    score_of,
    server_socket,
)
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from support import ROOT, Servers, make_env, stop_process

from service.app import create_app
from service.dev.servers import RedisServer, free_port, wait_for, wait_for_async
from service.keys import KeySchema
from service.live.endpoints import address_key
from service.scripts import SyncScripts, publish_top
from service.settings import ConfigError, Settings
from service.users import provision_sync


async def assert_closed_with(ws: websockets.ClientConnection, code: int) -> str:
    """Read until the server closes `ws`; its close code must be `code`. The reason."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(WAIT_S):
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None, "closed without a close frame"
    assert closed.value.rcvd.code == code, closed.value.rcvd
    return closed.value.rcvd.reason


@pytest.mark.parametrize(
    ("variable", "reason"),
    [
        ("SCORE_LIVE_MAX_PER_CLIENT", "from your address"),
        ("SCORE_LIVE_MAX_CONNECTIONS", "on this server"),
    ],
)
async def test_connections_over_a_limit_are_told_to_retry_later(
    servers: Servers, r, tmp_path: Path, variable: str, reason: str
) -> None:
    with running(make_env(servers, **{variable: "2"}), tmp_path / "serve.log") as svc:
        async with connect(svc.base) as first, connect(svc.base) as second:
            await recv_frame(first)
            await recv_frame(second)
            async with connect(svc.base) as third:
                assert reason in await assert_closed_with(third, 1013)
            async with httpx.AsyncClient(base_url=svc.base) as http:
                refused = await http.get("/api/v1/leaderboard/stream")
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.headers["content-type"] == "application/problem+json"
                assert reason in refused.json()["detail"]
        # the slots are given back when clients leave
        async with asyncio.timeout(WAIT_S):
            while True:
                async with connect(svc.base) as again:
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await recv_frame(again)
                        break


async def test_an_origin_allowlist_refuses_other_origins(
    servers: Servers, r, tmp_path: Path
) -> None:
    env = make_env(servers, SCORE_LIVE_ALLOWED_ORIGINS="https://good.example, https://also.example")
    with running(env, tmp_path / "serve.log") as svc:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(svc.base, origin="https://evil.example")
        assert refused.value.response.status_code == 403

        for origin in ("https://good.example", "https://also.example", svc.base, None):
            async with connect(svc.base, origin=origin) as ws:
                await recv_frame(ws)

        async with httpx.AsyncClient(base_url=svc.base) as http:
            evil = await http.get(
                "/api/v1/leaderboard/stream", headers={"Origin": "https://evil.example"}
            )
            assert evil.status_code == 403
            assert evil.headers["content-type"] == "application/problem+json"
            async with http.stream(
                "GET", "/api/v1/leaderboard/stream", headers={"Origin": "https://good.example"}
            ) as good:
                assert good.status_code == 200
                assert good.headers["access-control-allow-origin"] == "https://good.example"
            embed = await http.get("/embed")
            assert (
                "frame-ancestors 'self' https://good.example https://also.example"
                in (embed.headers["content-security-policy"])
            )


async def test_any_origin_is_welcome_by_default(service) -> None:
    async with connect(service.base, origin="https://anywhere.example") as ws:
        await recv_frame(ws)
    async with (
        httpx.AsyncClient(base_url=service.base) as http,
        http.stream(
            "GET", "/api/v1/leaderboard/stream", headers={"Origin": "https://anywhere.example"}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "*"


def slow_socket(base: str) -> socket.socket:
    """A TCP connection with a tiny receive buffer: the server's sends pile up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = base.removeprefix("http://").split(":")
    sock.connect((host, int(port)))
    return sock


def big_top(servers: Servers, r: redis.Redis, env: dict[str, str]) -> list[str]:
    """SCORE_TOP_N players with long ids, provisioned: frames of some 70 KB, which fill a
    client's buffers in a moment."""
    settings = Settings.from_env(env)
    users = [f"slow-{i:03d}-" + "x" * 110 for i in range(settings.top_n)]
    with psycopg.connect(servers.postgres.url) as conn:
        provision_sync(conn, r, KeySchema(1), settings.top_n, users)
    return users


@contextlib.contextmanager
def churning(r: redis.Redis, env: dict[str, str], users: list[str]) -> Iterator[None]:
    """Changes of the top-N one after another, as fast as Redis goes (in a thread)."""
    top_n = Settings.from_env(env).top_n
    keys = KeySchema(1).all()[0]
    scripts = SyncScripts(r)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            r.zincrby(keys.leaderboard, -1, users[i % len(users)])
            scripts.run(publish_top(keys, top_n))
            i += 1

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        yield
    finally:
        stop.set()
        churner.join()


async def test_a_slow_client_is_closed_while_a_fast_one_keeps_receiving(
    servers: Servers, r, tmp_path: Path, token
) -> None:
    # Big frames, a short tick and a short send timeout: the slow client falls behind at once.
    env = make_env(
        servers, SCORE_TOP_N="500", SCORE_LIVE_TICK_MS="20", SCORE_LIVE_SEND_TIMEOUT_MS="1500"
    )
    users = big_top(servers, r, env)
    keys = KeySchema(1).all()[0]
    with running(env, tmp_path / "serve.log") as svc:
        received: list[str] = []  # the fast client's frames
        arrived = asyncio.Event()

        async def read_fast(ws: websockets.ClientConnection) -> None:
            async for message in ws:
                received.append(message)
                del received[:-1]  # only the newest matters here
                arrived.set()

        async with (
            connect(svc.base, max_size=None) as fast,
            connect(svc.base, max_size=None, max_queue=1, sock=slow_socket(svc.base)) as slow,
        ):
            await recv_frame(fast)
            reader = asyncio.create_task(read_fast(fast))
            with churning(r, env, users):

                async def closed_one() -> bool:
                    return await asyncio.to_thread(slow_closes, svc.base) >= 1

                await wait_for_async(closed_one, 60, "the server to close the slow client")
            # the slow client, reading again, finds the documented close after its backlog
            assert "too slow" in await assert_closed_with(slow, 4001)
            # the fast one was never held back, and still follows: it gets the next change
            version = SyncScripts(r).run(publish_top(keys, len(users)))
            async with asyncio.timeout(WAIT_S):
                while True:
                    arrived.clear()
                    if json.loads(received[-1])["version"] == version:
                        break
                    await arrived.wait()
            assert not reader.done()
            reader.cancel()


def test_a_client_that_never_reads_does_not_keep_its_connection(
    servers: Servers, r, tmp_path: Path
) -> None:
    # The server gives up on a client that stops reading (4001, or no pong in time), but a
    # socket's close waits for its unsent bytes, and TCP keeps probing a peer that is alive
    # yet never reads: the connection must still go (here within 2 x 1 s of data waiting).
    env = make_env(
        servers,
        SCORE_TOP_N="500",
        SCORE_LIVE_TICK_MS="20",
        SCORE_LIVE_SEND_TIMEOUT_MS="500",
        SCORE_LIVE_PING_INTERVAL_MS="1000",
    )
    users = big_top(servers, r, env)
    with running(env, tmp_path / "serve.log") as svc, churning(r, env, users):
        host, port = svc.base.removeprefix("http://").split(":")
        with slow_socket(svc.base) as sock:
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                f"GET /api/v1/leaderboard/ws HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )  # and never read anything
            ends = (int(port), sock.getsockname()[1])
            wait_for(lambda: server_socket(*ends) not in (None, "0"), WAIT_S, "the connection")
            wait_for(lambda: server_socket(*ends) is None, WAIT_S, "the connection to go")


def slow_closes(base: str) -> float:
    return metric(base, "score_live_closed_total", reason="slow")


async def test_oversized_messages_close_the_socket_small_ones_are_ignored(
    servers: Servers, r, tmp_path: Path, add_users, token
) -> None:
    (player,) = add_users(count=1)
    with running(
        make_env(servers, SCORE_LIVE_MAX_MESSAGE_BYTES="64"), tmp_path / "serve.log"
    ) as svc:
        async with httpx.AsyncClient(base_url=svc.base) as http, connect(svc.base) as ws:
            await recv_frame(ws)
            await ws.send("hello")  # clients need send nothing; a small message is ignored
            total = await post_score(http, token(player), player, 5)
            await frames_until(lambda: recv_frame(ws), lambda f: score_of(f, player) == total)
            await ws.send("x" * 1000)
            await assert_closed_with(ws, 1009)


async def raw_socket(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket handshake by hand: a peer that will never answer a ping."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /api/v1/leaderboard/ws HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_server_frames(reader: asyncio.StreamReader) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every frame the server sends until it closes the connection."""
    frames: list[tuple[int, bytes]] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                first, second = await reader.readexactly(2)
            except asyncio.IncompleteReadError:
                return frames
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await reader.readexactly(8))
            frames.append((first & 0x0F, await reader.readexactly(length)))


async def test_protocol_pings_close_dead_peers_and_keep_live_ones(
    servers: Servers, r, tmp_path: Path, add_users, token
) -> None:
    (player,) = add_users(count=1)
    with running(
        make_env(servers, SCORE_LIVE_PING_INTERVAL_MS="300"), tmp_path / "serve.log"
    ) as svc:
        async with httpx.AsyncClient(base_url=svc.base) as http, connect(svc.base) as alive:
            await recv_frame(alive)
            reader, writer = await raw_socket(svc.base)
            frames = await read_server_frames(reader)  # until the server hangs up
            writer.close()
            opcodes = [op for op, _ in frames]
            assert opcodes[0] == 0x1  # the snapshot
            assert 0x9 in opcodes  # a ping, never answered
            assert opcodes[-1] == 0x8 and struct.unpack("!H", frames[-1][1][:2])[0] == 1011
            # the client that answers pings is still served
            total = await post_score(http, token(player), player, 3)
            await frames_until(lambda: recv_frame(alive), lambda f: score_of(f, player) == total)


def test_without_redis_new_clients_are_told_to_retry_then_served(
    servers: Servers, tmp_path: Path
) -> None:
    own = RedisServer(tmp_path / "redis", port=free_port())  # not started yet
    settings = Settings.from_env(make_env(servers, REDIS_URL=own.url))
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            with (
                client.websocket_connect("/api/v1/leaderboard/ws") as ws,
                pytest.raises(WebSocketDisconnect) as refused,
            ):
                ws.receive_text()
            assert refused.value.code == 1013
            stream = client.get("/api/v1/leaderboard/stream")
            assert stream.status_code == 503
            assert stream.headers["retry-after"] == "1"

            own.start()

            def served() -> bool:
                with client.websocket_connect("/api/v1/leaderboard/ws") as ws:
                    frame = ws.receive_json()
                    return frame["type"] == "leaderboard" and frame["top"] == []

            wait_for(served, WAIT_S, "a snapshot once Redis is up")
    finally:
        own.stop()


VIEWERS = 300


async def test_300_viewers_from_one_address_are_served_by_default(
    servers: Servers, r, tmp_path: Path
) -> None:
    # One office NAT, or one load balancer not configured as a trusted proxy: every viewer
    # comes from the same address.
    with running(make_env(servers), tmp_path / "serve.log") as svc:
        async with contextlib.AsyncExitStack() as stack:
            viewers = await asyncio.gather(
                *(stack.enter_async_context(connect(svc.base)) for _ in range(VIEWERS))
            )
            frames = await asyncio.gather(*(recv_frame(ws) for ws in viewers))
        assert len(frames) == VIEWERS
        assert all(frame["type"] == "leaderboard" for frame in frames)


async def refused_or_served(base: str, forwarded_for: str | None) -> websockets.ClientConnection:
    """A viewer whose first frame has arrived; ConnectionClosed (1013) if it was refused."""
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    ws = await connect(base, additional_headers=headers)
    try:
        await recv_frame(ws)
    except websockets.ConnectionClosed:
        await ws.close()
        raise
    return ws


async def assert_refused_per_address(base: str, forwarded_for: str) -> None:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await refused_or_served(base, forwarded_for)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert "from your address" in closed.value.rcvd.reason


async def test_x_forwarded_for_is_honoured_only_from_a_trusted_proxy(
    servers: Servers, r, tmp_path: Path
) -> None:
    limited = make_env(servers, SCORE_LIVE_MAX_PER_CLIENT="1")
    # Not trusted (not even 127.0.0.1, uvicorn's default): a client cannot claim to be
    # someone else to get around its limit.
    with running(limited, tmp_path / "untrusted.log") as svc:
        first = await refused_or_served(svc.base, "198.51.100.1")
        await assert_refused_per_address(svc.base, "198.51.100.2")
        await first.close()
    # Behind a trusted proxy: each real client has its own count...
    trusted = limited | {"SCORE_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1"}
    with running(trusted, tmp_path / "trusted.log") as svc:
        first = await refused_or_served(svc.base, "198.51.100.1")
        second = await refused_or_served(svc.base, "198.51.100.2")
        # ...and the same client twice is the same client
        await assert_refused_per_address(svc.base, "198.51.100.1")
        # IPv6 clients are counted per /64: one network, one count
        ipv6 = await refused_or_served(svc.base, "2001:db8:1:2::1")
        await assert_refused_per_address(svc.base, "2001:db8:1:2:ffff::7")
        other_network = await refused_or_served(svc.base, "2001:db8:1:3::1")
        for ws in (first, second, ipv6, other_network):
            await ws.close()


def test_the_per_address_key_counts_ipv6_by_its_64() -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:ffff:ffff:fffe")
    assert address_key("2001:db8::1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"  # an IPv4 client of a dual stack
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::1") == "::/64"


def serve_on_ipv6_loopback(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`score-service serve --host ::1`, ready; the process and its base URL."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "::1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
    base = f"http://[::1]:{port}"
    try:
        wait_for(lambda: httpx.get(base + "/readyz", timeout=1).status_code == 200, 30, "serve")
    except BaseException:
        stop_process(process)
        raise
    return process, base


async def test_a_viewer_over_ipv6_loopback_is_served(servers: Servers, r, tmp_path: Path) -> None:
    process, base = serve_on_ipv6_loopback(make_env(servers), tmp_path / "serve.log")
    try:
        async with connect(base) as ws:
            await recv_frame(ws)
        assert metric(base, "score_live_closed_total", reason="per_client") == 0
    finally:
        stop_process(process)


@pytest.mark.parametrize("value", ["10.0.0.0/33", "proxy.example", "10.0.0.1, nope"])
def test_trusted_proxies_must_be_addresses_or_networks(servers: Servers, value: str) -> None:
    with pytest.raises(ConfigError, match="SCORE_TRUSTED_PROXIES"):
        Settings.from_env(make_env(servers, SCORE_TRUSTED_PROXIES=value))


def test_trusted_proxies_are_read_as_a_list(servers: Servers) -> None:
    settings = Settings.from_env(make_env(servers, SCORE_TRUSTED_PROXIES=" 10.0.0.0/8, ::1 ,"))
    assert settings.trusted_proxies == ("10.0.0.0/8", "::1")
