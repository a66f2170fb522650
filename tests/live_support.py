"""Helpers for the live leaderboard tests: WebSocket and SSE clients, frames, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import websockets
from support import Service, start_service, stop_process

from service.dev.servers import wait_for_async
from service.streamids import order

Frame = dict[str, Any]
WAIT_S = 15.0  # deadline for anything the tests wait for


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://", 1) + "/api/v1/leaderboard/ws"


@contextlib.contextmanager
def running(env: dict[str, str], log: Path, *args: str) -> Iterator[Service]:
    """`score-service serve` with `env`, stopped on exit."""
    svc = start_service(env, log, *args)
    try:
        yield svc
    finally:
        stop_process(svc.process)


def connect(base: str, **kwargs: Any) -> websockets.asyncio.client.connect:
    return websockets.connect(ws_url(base), open_timeout=WAIT_S, **kwargs)


async def recv_frame(ws: websockets.ClientConnection, wait_s: float = WAIT_S) -> Frame:
    """The next frame (within `wait_s`); it must be a leaderboard frame."""
    frame: Frame = json.loads(await asyncio.wait_for(ws.recv(), wait_s))
    assert frame["type"] == "leaderboard", frame
    return frame


async def frames_until(
    next_frame: Callable[[], Any], done: Callable[[Frame], bool], wait_s: float = WAIT_S
) -> list[Frame]:
    """Frames from `next_frame()` up to and including the first for which `done` holds;
    asserts that versions never go back."""
    frames: list[Frame] = []
    async with asyncio.timeout(wait_s):
        while True:
            frame = await next_frame()
            if frames:
                assert order(frame["version"]) >= order(frames[-1]["version"]), frames
            frames.append(frame)
            if done(frame):
                return frames


def score_of(frame: Frame, user_id: str) -> int | None:
    return next((e["score"] for e in frame["top"] if e["user_id"] == user_id), None)


async def post_score(http: httpx.AsyncClient, token: str, user_id: str, increase: int) -> int:
    """POST /api/v1/score (retried while the service answers 503); the new score."""
    answers: list[httpx.Response] = []

    async def answered() -> bool:
        answers.append(
            await http.post(
                "/api/v1/score",
                json={"user_id": user_id, "score_increase": increase},
                headers={"Authorization": f"Bearer {token}"},
            )
        )
        return answers[-1].status_code != 503

    await wait_for_async(answered, WAIT_S, "an answer other than 503")
    r = answers[-1]
    assert r.status_code == 200, r.text
    new_score: int = r.json()["new_score"]
    return new_score


class SseClient:
    """Events of GET /api/v1/leaderboard/stream, parsed."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next_event(self, wait_s: float = WAIT_S) -> dict[str, str] | None:
        """The next event ({"id", "data"}), skipping comments and `retry:`; None at the end."""
        event: dict[str, str] = {}
        async with asyncio.timeout(wait_s):
            async for line in self._lines:
                if line == "":
                    if "data" in event:
                        return event
                    event = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    event[name] = value.removeprefix(" ")
        return None

    async def next_frame(self, wait_s: float = WAIT_S) -> Frame:
        event = await self.next_event(wait_s)
        assert event is not None, "the stream ended"
        frame: Frame = json.loads(event["data"])
        assert frame["type"] == "leaderboard" and event["id"] == frame["version"], event
        return frame


@contextlib.asynccontextmanager
async def sse(base: str, headers: dict[str, str] | None = None) -> AsyncIterator[SseClient]:
    async with (
        httpx.AsyncClient(base_url=base, timeout=WAIT_S) as http,
        http.stream("GET", "/api/v1/leaderboard/stream", headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseClient(response)


def metric(base: str, name: str, **labels: str) -> float:
    """A sample of the service process's /metrics (0 if absent)."""
    text = httpx.get(base + "/metrics", timeout=5).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == want:
            return float(value)
    return 0.0


def worker_pids(parent: int) -> list[int]:
    """The processes `parent` started (uvicorn's workers)."""
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        return [int(p) for p in f.read().split()]


def server_socket(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the TCP connection from `client_port` ("0" once no
    process holds it); None if the kernel has no such connection any more."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (
                server_port,
                client_port,
            ):
                return fields[9]
    return None


def process_serving(client_port: int, server_port: int, pids: list[int]) -> int | None:
    """Which of `pids` holds the server side of the TCP connection from `client_port`."""
    inode = server_socket(server_port, client_port)
    if inode is None:
        return None
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == f"socket:[{inode}]":
                    return pid
    return None
