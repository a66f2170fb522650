"""Slow and idle HTTP clients cannot hold the service, with real sockets against a real
`score-service serve`: a body must arrive within SCORE_BODY_TIMEOUT_S (408, the connection
closed), and beyond SCORE_MAX_CONCURRENCY requests in flight a process answers 503 at once,
while live viewers are not counted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from http_support import Reply, read_reply, score_request
from live_support import WAIT_S, connect, recv_frame, running
from support import Servers, make_env

from service.auth import mint
from service.settings import Settings


def open_socket(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=WAIT_S)


def problem_of(reply: Reply | None, status: int) -> dict[str, object]:
    assert reply is not None, "the connection ended without a response"
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = json.loads(reply.body)
    assert body["status"] == status
    return body


def assert_closed(sock: socket.socket) -> None:
    """The server closed the connection (after its response): nothing more comes."""
    with contextlib.suppress(ConnectionResetError):  # a reset: closed with bytes unread
        assert sock.recv(1) == b""


@pytest.fixture
def slow_env(servers: Servers) -> dict[str, str]:
    return make_env(servers, SCORE_BODY_TIMEOUT_S="1")


@pytest.fixture
def player(add_users, slow_env: dict[str, str]) -> tuple[str, str]:
    (user,) = add_users(count=1)
    return user, mint(Settings.from_env(slow_env), user)


def test_a_body_that_stops_coming_gets_408_and_the_connection_closed(
    slow_env: dict[str, str], r, tmp_path: Path, player: tuple[str, str]
) -> None:
    user, token = player
    with running(slow_env, tmp_path / "serve.log") as svc, open_socket(svc.base) as sock:
        head, body = score_request("localhost", token, user, "slow-1", 5)
        sock.sendall(head + body[:10])  # and then nothing: the rest never comes
        detail = problem_of(read_reply(sock), 408)["detail"]
        assert "SCORE_BODY_TIMEOUT_S" in str(detail)
        assert_closed(sock)
        # nothing was applied
        assert httpx.get(f"{svc.base}/api/v1/users/{user}").json()["score"] == 0


def test_a_trickled_body_gets_408(
    slow_env: dict[str, str], r, tmp_path: Path, player: tuple[str, str]
) -> None:
    user, token = player
    with running(slow_env, tmp_path / "serve.log") as svc, open_socket(svc.base) as sock:
        head, body = score_request("localhost", token, user, "slow-2", 5)
        sock.sendall(head)
        stop = threading.Event()

        def trickle() -> None:  # a byte every 0.2 s: each read makes progress, the whole never
            for byte in body[:-1]:
                if stop.wait(0.2):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            problem_of(read_reply(sock), 408)
        finally:
            stop.set()
            sender.join()


def test_an_admin_body_that_stops_coming_gets_408(
    slow_env: dict[str, str], r, tmp_path: Path
) -> None:
    admin = mint(Settings.from_env(slow_env), "ops", admin=True)
    with running(slow_env, tmp_path / "serve.log") as svc, open_socket(svc.base) as sock:
        sock.sendall(
            b"POST /api/v1/admin/users HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Bearer " + admin.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"user_ids": ["a'
        )
        problem_of(read_reply(sock), 408)
        assert_closed(sock)


@pytest.fixture
def limited(servers: Servers, r, tmp_path: Path) -> Iterator[str]:
    env = make_env(servers, SCORE_MAX_CONCURRENCY="2", SCORE_BODY_TIMEOUT_S="60")
    with running(env, tmp_path / "serve.log") as svc:
        yield svc.base


async def test_requests_beyond_the_concurrency_limit_get_503_viewers_do_not_count(
    limited: str, add_users, settings: Settings
) -> None:
    user, other = add_users(count=2)
    token = mint(settings, user)
    # two requests in flight, held by their bodies
    held = [open_socket(limited) for _ in range(2)]
    bodies = []
    for i, sock in enumerate(held):
        head, body = score_request("localhost", token, user, f"held-{i}", 1)
        sock.sendall(head + body[:5])
        bodies.append(body[5:])
    try:
        async with httpx.AsyncClient(base_url=limited, timeout=WAIT_S) as http:
            # the process holds two: the burst beyond is refused at once, for any route
            async def refused() -> bool:
                reply = await http.get("/api/v1/leaderboard")
                return reply.status_code == 503

            async with asyncio.timeout(WAIT_S):
                while not await refused():  # the held requests may still be on their way in
                    pass
            reply = await http.post(
                "/api/v1/score",
                json={"user_id": other, "score_increase": 1},
                headers={"Authorization": f"Bearer {mint(settings, other)}"},
            )
            assert reply.status_code == 503
            assert reply.headers["retry-after"] == "1"
            assert reply.headers["content-type"] == "application/problem+json"
            assert "SCORE_MAX_CONCURRENCY" in reply.json()["detail"]
            # liveness and metrics still answer: an overloaded process is not a dead one
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
            # live viewers are limited on their own: a WebSocket and an SSE stream still open
            async with connect(limited) as ws:
                await recv_frame(ws)
            async with http.stream("GET", "/api/v1/leaderboard/stream") as stream:
                assert stream.status_code == 200
            # once a held request ends, a slot is free again
            held[0].sendall(bodies[0])
            assert (read_reply(held[0]) or Reply(0, {}, b"")).status == 200
            assert (await http.get("/api/v1/leaderboard")).status_code == 200
            held[1].sendall(bodies[1])
            assert (read_reply(held[1]) or Reply(0, {}, b"")).status == 200
            assert (await http.get(f"/api/v1/users/{user}")).json()["score"] == 2
    finally:
        for sock in held:
            sock.close()
