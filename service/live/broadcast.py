"""One process's live leaderboard: follow the top streams once, fan frames out to its clients.

One task tails the partitions' top streams (XREAD BLOCK, on a Redis connection of its own)
and keeps the merged top-N in memory; a second publishes the newest state to every
subscriber, at most once per tick (SCORE_LIVE_TICK_MS). Each frame is encoded once and shared
by all clients (`service.live.frames`); how it reaches one client is `service.live.subscribers`'s
business: written straight to its transport, or handed to its own task. Either way a client
holds only the newest frame it has not been sent: a burst costs a slow client skipped frames,
never a growing queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from typing import Any

from prometheus_client import Counter as Metric
from prometheus_client import Gauge
from redis.backoff import ExponentialBackoff

from service import streamids
from service.connections import async_redis, failed_again
from service.keys import KeySchema
from service.leaderboard import build
from service.live.frames import Frame, encode_frame
from service.live.subscribers import Ending, Subscriber
from service.settings import Settings
from service.tops import Tops, read_tops

log = logging.getLogger(__name__)

BLOCK_MS = 5_000  # XREAD BLOCK: how long one wait for a change lasts (then re-read anyway)
BACKOFF = ExponentialBackoff(cap=2.0, base=0.1)
"""Reconnecting to Redis: 0.1 s, doubling, at most 2 s."""

# One series per live worker process (label pid: `serve --workers N`); a worker's go when it
# ends (service.health.forget_dead_processes)
CONNECTED = Gauge(
    "score_live_connections",
    "Live leaderboard clients of this process",
    multiprocess_mode="liveall",
)
PUBLISHED = Metric("score_live_frames", "Leaderboard frames published to this process's clients")
CLOSED = Metric("score_live_closed", "Live clients closed or refused by the server", ["reason"])
WS_CLIENTS = Metric(
    "score_live_ws_clients",
    "WebSocket clients accepted, by send path: direct (pre-framed bytes to the transport) or asgi",
    ["path"],
)
FOLLOWING = Gauge(
    "score_live_following",
    "1 while this process follows the top streams",
    multiprocess_mode="liveall",
)

TRY_AGAIN_LATER = 1013  # WebSocket close code: a limit is reached, or no state is known yet
GOING_AWAY = Ending(1001, "the server is shutting down; reconnect", "going_away")
TOO_MANY = Ending(TRY_AGAIN_LATER, "too many live clients on this server; retry later", "max")
TOO_MANY_HERE = Ending(
    TRY_AGAIN_LATER, "too many live connections from your address; retry later", "per_client"
)


class Refused(Exception):
    """A client the server cannot take now; `ending` says why, and how to close it."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending


class Broadcaster:
    """The live leaderboard of one process: its state, its subscribers and its limits."""

    def __init__(self, settings: Settings, schema: KeySchema) -> None:
        self.settings = settings
        self.schema = schema
        self.latest: Frame | None = None
        self.going_away = False
        self._subscribers: set[Subscriber] = set()
        self._behind: set[Subscriber] = set()  # clients still holding an unsent frame
        self._per_address: Counter[str] = Counter()
        self._tasks: list[asyncio.Task[None]] = []
        self._seen: dict[str, str] = {}  # top stream -> the newest id read_tops found

    async def start(self) -> None:
        """Start following Redis (in the background: Redis may be down) and publishing."""
        self._changed = asyncio.Event()
        self._has_state = asyncio.Event()
        self._bell = asyncio.Event()  # a doorbell rang: a top stream has a new entry
        self._stopping = False
        self._idle = asyncio.Event()  # set while no client is connected
        self._idle.set()
        # A connection of its own: its reads block for BLOCK_MS, longer than the hot path's
        # socket timeout allows. It only reads, so it may send a read again.
        self._redis = async_redis(
            self.settings, reads_only=True, socket_timeout=BLOCK_MS / 1000 + 5
        )
        self._tasks = [
            asyncio.create_task(self._follow(), name="live-follow"),
            asyncio.create_task(self._fan_out(), name="live-fan-out"),
            asyncio.create_task(self._keepalive(), name="live-keepalive"),
        ]

    async def stop(self) -> None:
        """Stop following and publishing; close the Redis connection."""
        # The follower ends by itself (cancelled while it waited for its doorbells, it could
        # miss the cancellation on Python 3.11 and hang the shutdown); the others are cancelled
        self._stopping = True
        self._bell.set()
        follower, *others = self._tasks
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await asyncio.gather(follower, return_exceptions=True)
        await self._redis.aclose()

    # Subscribers

    def admit(self, sub: Subscriber) -> Subscriber:
        """Take `sub` (a new client), holding the current state if there is one; Refused when a
        limit is reached or the server is shutting down."""
        s = self.settings
        if self.going_away:
            raise Refused(GOING_AWAY)
        if len(self._subscribers) >= s.live_max_connections:
            raise Refused(TOO_MANY)
        if self._per_address[sub.address] >= s.live_max_per_client:
            raise Refused(TOO_MANY_HERE)
        self._subscribers.add(sub)
        self._per_address[sub.address] += 1
        self._idle.clear()
        CONNECTED.inc()
        if self.latest is not None:
            # the snapshot: a new client is whole from its first frame
            sub.offer(self.latest, asyncio.get_running_loop().time())
        return sub

    def release(self, sub: Subscriber) -> None:
        """Forget a subscriber whose connection ended (gives its slots back)."""
        self._subscribers.discard(sub)
        self._behind.discard(sub)
        self._per_address[sub.address] -= 1
        if self._per_address[sub.address] <= 0:
            del self._per_address[sub.address]
        CONNECTED.dec()
        if not self._subscribers:
            self._idle.set()

    async def wait_for_state(self, wait_s: float) -> bool:
        """True once a leaderboard is known (waiting at most `wait_s` seconds for one)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._has_state.wait()
        return self.latest is not None

    async def go_away(self, ending: Ending, wait_s: float) -> None:
        """End every client with `ending`, refuse new ones, and wait (bounded) until they left."""
        self.going_away = True
        for sub in self._subscribers:
            sub.end(ending)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._idle.wait()

    # Following Redis

    async def _follow(self) -> None:
        """Keep `latest` equal to Redis's newest top-N.

        XREAD is only the doorbell: whatever a burst appended, the state is then read whole by
        `read_tops`, the very read behind GET /api/v1/leaderboard, so a frame and a REST body
        of the same version are the same. The cost of a wake-up does not grow with the burst,
        and a Redis outage, restart, rebuild or failover needs no special case. Each partition
        has a doorbell of its own: on a Redis Cluster one XREAD of several partitions' streams
        would be refused (CROSSSLOT), and a primary's failover stops only its own.
        """
        parts = self.schema.all()
        bell = self._bell
        doorbells: list[asyncio.Task[None]] = []
        failures = 0
        try:
            while not self._stopping:
                bell.clear()
                try:
                    tops = await read_tops(self._redis, self.schema, self.settings.top_n)
                except Exception as exc:  # Redis down, restarting, loading, failing over:
                    if self._stopping:  # clients keep the last state
                        break
                    if not failures:
                        log.warning("live leaderboard: lost Redis (%s); retrying", exc)
                    FOLLOWING.set(0)
                    failures = failed_again(failures)
                    await asyncio.sleep(BACKOFF.compute(failures))
                    continue
                if failures:
                    log.info("live leaderboard: following Redis again")
                    failures = 0
                FOLLOWING.set(1)
                self._seen.update((p.top, v) for p, v in zip(parts, tops.versions, strict=True))
                self._update(tops)
                if not doorbells:
                    doorbells = [
                        asyncio.create_task(self._doorbell(p.top, bell), name=f"live-{p.tag}")
                        for p in parts
                    ]
                # re-read anyway after BLOCK_MS; a timer rings the bell rather than a timeout
                # cancelling the wait (one cancellation too many hung the shutdown on 3.11)
                ring = asyncio.get_running_loop().call_later(BLOCK_MS / 1000, bell.set)
                try:
                    await bell.wait()
                finally:
                    ring.cancel()
        finally:
            for task in doorbells:
                task.cancel()
            await asyncio.gather(*doorbells, return_exceptions=True)
            FOLLOWING.set(0)

    async def _doorbell(self, top: str, bell: asyncio.Event) -> None:
        """Ring `bell` whenever the top stream `top` has an entry past the last one seen."""
        failures = 0
        position = self._seen[top]
        while not self._stopping:
            seen = self._seen[top]
            if streamids.order(seen) > streamids.order(position):
                position = seen  # read_tops has caught up past it: skip what it read
            try:
                found: Any = await self._redis.xread({top: position}, count=1, block=BLOCK_MS)
            except Exception:  # the follower's read reports it; ring, so that it tries
                bell.set()
                failures = failed_again(failures)
                await asyncio.sleep(BACKOFF.compute(failures))
                continue
            failures = 0
            if found:
                position = _text(found[0][1][0][0])
                bell.set()

    def _update(self, tops: Tops) -> None:
        frame = encode_frame(build(tops.versions, tops.rows, self.settings.top_n))
        latest = self.latest
        if latest is not None:
            if frame.order < latest.order:
                # Redis went back in time (restored from an older copy): keep the newer state
                # until a newer version arrives, so that versions only grow.
                return
            if frame.order == latest.order and frame.text == latest.text:
                return
        self.latest = frame
        self._has_state.set()
        self._changed.set()

    # Publishing

    async def _fan_out(self) -> None:
        """Publish the newest state at most once per tick; the first change of a quiet spell
        goes out at once, the rest of a burst is folded into the next tick.

        A client that was behind (its earlier frame not taken yet) holds the newest frame back;
        it is offered again each tick until it has it, or until it is too slow. Waiting for it
        never delays the others: a change still goes out as soon as it is due.
        """
        tick = self.settings.live_tick_ms / 1000
        loop = asyncio.get_running_loop()
        while True:
            if self._behind:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await self._changed.wait()
            else:
                await self._changed.wait()
            frame = self.latest
            if frame is None:
                self._changed.clear()
                continue
            now = loop.time()
            if not self._changed.is_set():  # a tick passed: only the ones behind, again
                self._behind = {sub for sub in self._behind if sub.offer(frame, now)}
                continue
            self._changed.clear()
            PUBLISHED.inc()
            self._behind = {sub for sub in self._subscribers if sub.offer(frame, now)}
            await asyncio.sleep(tick)

    async def _keepalive(self) -> None:
        """Ask idle subscribers to show they are alive (SSE comments; WebSocket pings are the
        server's protocol pings)."""
        while True:
            await asyncio.sleep(self.settings.live_ping_interval_s)
            for sub in self._subscribers:
                sub.ping()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
