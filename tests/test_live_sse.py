"""GET /api/v1/leaderboard/stream (Server-Sent Events) against a real `score-service serve`.

The same frames as the WebSocket, each event's id its version; Last-Event-ID is honoured
(an up-to-date client is not sent the state it has); SIGTERM ends the stream.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
from live_support import (
    WAIT_S,
    connect,
    frames_until,
    post_score,
    recv_frame,
    running,
    score_of,
    sse,
)
from persist_support import cli
from support import Servers, make_env

from service.auth import mint
from service.keys import KeySchema
from service.settings import Settings
from service.streamids import order


async def test_snapshot_then_updates_same_frames_as_websocket(service, add_users, token) -> None:
    alice, bob = add_users(count=2)
    async with httpx.AsyncClient(base_url=service.base) as http:
        await post_score(http, token(alice), alice, 3)
        rest = (await http.get("/api/v1/leaderboard")).json()
        async with sse(service.base) as stream, connect(service.base) as ws:
            assert stream.response.headers["cache-control"].startswith("no-cache")

            # a whole top-N first; the process may lag the REST read a moment, never lead it
            def caught_up(frame: dict) -> bool:
                return order(frame["version"]) >= order(rest["version"])

            sse_frames = await frames_until(stream.next_frame, caught_up)
            ws_frames = await frames_until(lambda: recv_frame(ws), caught_up)
            assert {e["user_id"] for e in sse_frames[0]["top"]} == {alice, bob}
            assert sse_frames[-1] == ws_frames[-1] == rest

            await post_score(http, token(bob), bob, 9)
            update = await stream.next_frame()
            assert update == await recv_frame(ws)
            assert order(update["version"]) > order(rest["version"])
            assert update["top"][:2] == [
                {"rank": 1, "user_id": bob, "score": 9},
                {"rank": 2, "user_id": alice, "score": 3},
            ]


async def test_last_event_id_is_honoured(service, add_users, token) -> None:
    (player,) = add_users(count=1)
    async with httpx.AsyncClient(base_url=service.base) as http:
        await post_score(http, token(player), player, 1)
        current = (await http.get("/api/v1/leaderboard")).json()

        # reconnecting with the current version: nothing is resent, the next change comes first
        async with sse(service.base, {"Last-Event-ID": current["version"]}) as stream:
            await post_score(http, token(player), player, 1)
            first = await stream.next_frame()
            assert order(first["version"]) > order(current["version"])
            assert first["top"][0]["score"] == 2

        # reconnecting with an older version (or none, or garbage): the snapshot first
        for last_seen in (current["version"], "0-0", "not-a-version"):
            async with sse(service.base, {"Last-Event-ID": last_seen}) as stream:
                snapshot = await stream.next_frame()
                assert snapshot == (await http.get("/api/v1/leaderboard")).json()
                assert snapshot["top"][0]["score"] == 2


async def test_versions_only_grow_across_many_changes(service, add_users, token) -> None:
    players = add_users(count=3)
    async with httpx.AsyncClient(base_url=service.base) as http, sse(service.base) as stream:
        await stream.next_frame()
        total = 0
        for i in range(20):
            total = await post_score(http, token(players[0]), players[0], i + 1)
        frames = await frames_until(stream.next_frame, lambda f: f["top"][0]["score"] == total)
        versions = [order(f["version"]) for f in frames]
        assert versions == sorted(set(versions))  # strictly growing


async def test_sigterm_ends_the_stream(servers: Servers, r, tmp_path: Path) -> None:
    with running(make_env(servers), tmp_path / "serve.log") as svc:
        async with sse(svc.base) as stream:
            await stream.next_frame()
            svc.process.send_signal(signal.SIGTERM)
            assert await stream.next_event() is None  # the response ends: EventSource reconnects
        assert svc.process.wait(WAIT_S) is not None
        log = svc.log.read_text()
        assert "Application shutdown complete" in log
        assert "timeout graceful shutdown exceeded" not in log  # ended, not cancelled


async def test_two_instances_agree_and_a_client_moving_between_them_misses_no_change(
    servers: Servers, r, tmp_path: Path
) -> None:
    """Several `serve` instances behind one address, three partitions: a client that resumes
    on the other instance with its Last-Event-ID gets the change made since, whichever
    partition and instance it went through, and both instances send the same frame."""
    env = make_env(servers, SCORE_PARTITIONS="3")
    settings = Settings.from_env(env)
    schema = KeySchema(3)
    users: dict[int, str] = {}
    while len(users) < 3:  # one user in each partition
        user = f"u-{uuid.uuid4().hex[:8]}"
        users.setdefault(schema.for_user(user).index, user)
    assert cli(env, "users", "add", *users.values()).returncode == 0
    with running(env, tmp_path / "a.log") as a, running(env, tmp_path / "b.log") as b:
        async with (
            httpx.AsyncClient(base_url=a.base) as via_a,
            httpx.AsyncClient(base_url=b.base) as via_b,
        ):
            last = (await via_a.get("/api/v1/leaderboard")).json()["version"]
            for step, partition in enumerate((0, 1, 2, 1, 0, 2)):
                user = users[partition]
                http, other = (via_a, b) if step % 2 else (via_b, a)
                total = await post_score(http, mint(settings, user), user, step + 1)
                async with sse(other.base, {"Last-Event-ID": last}) as stream:
                    frames = await frames_until(
                        stream.next_frame, lambda f, u=user, t=total: score_of(f, u) == t
                    )
                assert order(frames[0]["version"]) > order(last)  # nothing older, no skip
                last = frames[-1]["version"]
                async with sse(a.base) as on_a, sse(b.base) as on_b:
                    done = lambda f: order(f["version"]) >= order(last)  # noqa: E731
                    assert (await frames_until(on_a.next_frame, done))[-1] == (
                        await frames_until(on_b.next_frame, done)
                    )[-1]
