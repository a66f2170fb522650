"""WS /api/v1/leaderboard/ws against a real `score-service serve` (uvicorn, uvloop).

A snapshot on connect, then one frame per change, conflated per tick, versions only growing;
every worker process's clients see every change; Redis restarting mid-stream; SIGTERM.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import websockets
from live_support import (
    WAIT_S,
    connect,
    frames_until,
    post_score,
    process_serving,
    recv_frame,
    running,
    score_of,
    worker_pids,
)
from support import Servers, make_env

from service.dev.servers import RedisServer
from service.keys import KeySchema
from service.scripts import load, prepare_submit
from service.settings import Settings
from service.streamids import order
from service.users import provision_sync


async def test_snapshot_on_connect_then_one_frame_per_change(service, add_users, token) -> None:
    alice, bob = add_users(count=2)
    async with httpx.AsyncClient(base_url=service.base) as http:
        await post_score(http, token(bob), bob, 5)
        rest = (await http.get("/api/v1/leaderboard")).json()
        async with connect(service.base) as ws:
            # The first frame is a whole top-N. The process may be a moment behind the REST
            # read (it follows Redis), never ahead; then the REST version comes as a frame,
            # the same: a page can load by REST and follow the stream without a gap.
            frames = await frames_until(
                lambda: recv_frame(ws), lambda f: order(f["version"]) >= order(rest["version"])
            )
            assert {e["user_id"] for e in frames[0]["top"]} == {alice, bob}
            assert frames[-1] == rest
            assert rest["top"][0] == {"rank": 1, "user_id": bob, "score": 5}

            await post_score(http, token(alice), alice, 7)
            update = await recv_frame(ws)
            assert order(update["version"]) > order(rest["version"])
            assert update["top"][:2] == [
                {"rank": 1, "user_id": alice, "score": 7},
                {"rank": 2, "user_id": bob, "score": 5},
            ]
            assert update == (await http.get("/api/v1/leaderboard")).json()
            # Under uvicorn the frames were written pre-framed to the transport (the fast
            # path); falling back to per-client ASGI sends would still be correct, but slow.
            metrics = (await http.get("/metrics")).text
            assert 'score_live_ws_clients_total{path="direct"} 1.0' in metrics
            assert 'path="asgi"' not in metrics


async def test_a_burst_is_conflated_and_ends_on_the_final_state(
    servers: Servers, r, add_users, token, tmp_path: Path
) -> None:
    tick_s = 0.5
    env = make_env(servers, SCORE_LIVE_TICK_MS=str(int(tick_s * 1000)))
    (player,) = add_users(count=1)
    changes = 30
    with running(env, tmp_path / "serve.log") as svc:
        async with httpx.AsyncClient(base_url=svc.base) as http, connect(svc.base) as ws:
            await recv_frame(ws)
            started = time.monotonic()
            for _ in range(changes):
                final = await post_score(http, token(player), player, 1)
            frames = await frames_until(
                lambda: recv_frame(ws), lambda f: score_of(f, player) == final
            )
            elapsed = time.monotonic() - started
            # at most one frame per tick: the first change goes out at once, then one a tick
            assert len(frames) <= 1 + math.ceil(elapsed / tick_s), (len(frames), elapsed)
            assert len(frames) < changes
            assert frames[-1] == (await http.get("/api/v1/leaderboard")).json()


async def test_changes_made_at_once_become_one_frame(
    service, r, add_users, token, settings
) -> None:
    players = add_users(count=5)
    submit = r.register_script(load("submit_score").body)
    async with httpx.AsyncClient(base_url=service.base) as http, connect(service.base) as ws:
        snapshot = await recv_frame(ws)
        # 25 increments in one MULTI/EXEC: the top stream gets 25 entries at one instant
        pipe = r.pipeline(transaction=True)
        for i in range(25):
            call = prepare_submit(settings, KeySchema(1), players[i % 5], i + 1)
            submit(keys=call.keys, args=call.args, client=pipe)
        pipe.execute()
        burst = await recv_frame(ws)
        assert burst == (await http.get("/api/v1/leaderboard")).json()
        assert order(burst["version"]) > order(snapshot["version"])
        # nothing in between: the next frame is the next change
        await post_score(http, token(players[0]), players[0], 1000)
        marker = await recv_frame(ws)
        assert marker["top"][0]["user_id"] == players[0]
        assert order(marker["version"]) > order(burst["version"])


async def test_every_client_of_every_worker_sees_a_change(
    servers: Servers, r, add_users, token, tmp_path: Path
) -> None:
    (player,) = add_users(count=1)
    with running(make_env(servers), tmp_path / "serve.log", "--workers", "2") as svc:
        port = int(svc.base.rsplit(":", 1)[1])
        workers = worker_pids(svc.process.pid)
        assert len(workers) >= 2
        async with httpx.AsyncClient(base_url=svc.base) as http:
            clients: list[websockets.ClientConnection] = []
            served_by: set[int | None] = set()
            try:
                # the kernel spreads connections over the workers; open until both have some
                while len(served_by - {None}) < 2 and len(clients) < 40:
                    ws = await connect(svc.base)
                    clients.append(ws)
                    await recv_frame(ws)
                    served_by.add(process_serving(ws.local_address[1], port, workers))
                assert len(served_by - {None}) >= 2, "the connections all went to one worker"
                new_score = await post_score(http, token(player), player, 42)
                for ws in clients:
                    frames = await frames_until(
                        lambda ws=ws: recv_frame(ws), lambda f: score_of(f, player) == new_score
                    )
                    assert frames[-1]["top"][0] == {"rank": 1, "user_id": player, "score": 42}
            finally:
                await asyncio.gather(*(ws.close() for ws in clients))


async def test_redis_restart_mid_stream(servers: Servers, pg, tmp_path: Path, token) -> None:
    own = RedisServer(tmp_path / "redis").start()  # this test restarts it: not the shared one
    alice, bob = (f"rr-{uuid.uuid4().hex[:8]}" for _ in range(2))
    try:
        env = make_env(servers, REDIS_URL=own.url)
        settings = Settings.from_env(env)
        client = redis.Redis.from_url(own.url)
        provision_sync(pg, client, KeySchema(1), settings.top_n, [alice, bob])
        client.close()
        with running(env, tmp_path / "serve.log") as svc:
            async with httpx.AsyncClient(base_url=svc.base) as http, connect(svc.base) as ws:
                await recv_frame(ws)
                await post_score(http, token(alice), alice, 10)
                before = await recv_frame(ws)

                own.stop()  # AOF: nothing acknowledged is lost
                # connected clients stay connected; new ones get the last known state
                async with connect(svc.base) as late:
                    assert await recv_frame(late) == before
                    own.start()
                    await post_score(http, token(bob), bob, 20)
                    for client_ws in (ws, late):
                        frames = await frames_until(
                            lambda c=client_ws: recv_frame(c),
                            lambda f: score_of(f, bob) == 20,
                        )
                        assert frames[-1]["top"][0] == {"rank": 1, "user_id": bob, "score": 20}
                        assert order(frames[-1]["version"]) > order(before["version"])
    finally:
        own.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_closes_clients_with_going_away(
    servers: Servers, r, tmp_path: Path, workers: int
) -> None:
    with running(make_env(servers), tmp_path / "serve.log", "--workers", str(workers)) as svc:
        async with connect(svc.base) as ws:
            await recv_frame(ws)
            svc.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT_S)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        assert svc.process.wait(WAIT_S) is not None


def test_a_plain_get_of_the_socket_says_how_to_connect(client) -> None:
    resp = client.get("/api/v1/leaderboard/ws")
    assert resp.status_code == 426
    assert resp.headers["upgrade"] == "websocket"
    assert resp.headers["content-type"] == "application/problem+json"
    assert "WebSocket" in resp.json()["detail"]
