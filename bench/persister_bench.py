"""The persister: drain rate from a backlog, and lag while the write path runs flat out."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import httpx
import psycopg
import redis

from bench import wrk
from bench.cpu import CpuMeter
from bench.ledger import Ledger
from bench.stack import Stack
from service.keys import KeySchema
from service.scripts import load, prepare_submit
from service.settings import Settings
from service.streamids import millis

PIPELINE = 1000
POLL_S = 0.05
DRAIN_POLL_S = 0.02
DRAIN_TIMEOUT_S = 120.0


def oldest_unpersisted(client: redis.Redis, stream: str) -> bytes | None:
    """The id of the oldest event no consumer group has acknowledged (None: all persisted).

    An event is unpersisted while it is pending in a group (delivered, not yet XACKed after
    COMMIT) or not yet delivered (after the group's last-delivered id)."""
    groups: list[dict[str, Any]] = client.xinfo_groups(stream) if client.exists(stream) else []
    if not groups:
        first = client.xrange(stream, count=1)
        return first[0][0] if first else None
    oldest: bytes | None = None
    for group in groups:
        candidates: list[bytes] = []
        if group["pending"]:
            summary = client.xpending(stream, group["name"])
            candidates.append(summary["min"])
        after = client.xrange(stream, min=b"(" + group["last-delivered-id"], count=1)
        if after:
            candidates.append(after[0][0])
        for c in candidates:
            if oldest is None or millis(c) < millis(oldest):
                oldest = c
    return oldest


def unpersisted_age_ms(client: redis.Redis, stream: str) -> float:
    """Age of the oldest unpersisted event on Redis's clock; 0 when everything is persisted."""
    oldest = oldest_unpersisted(client, stream)
    if oldest is None:
        return 0.0
    seconds, micros = client.time()
    return max(0.0, seconds * 1000 + micros / 1000 - millis(oldest))


def make_backlog(stack: Stack, events: int, ledger: Ledger) -> None:
    """`events` increments by direct EVALSHA (pipelined), each acknowledged by Redis."""
    client = stack.client()
    settings = Settings.from_env(stack.env)
    schema = KeySchema(1)
    script = client.register_script(load("submit_score").body)
    users = stack.token_users
    try:
        for start in range(0, events, PIPELINE):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(events, start + PIPELINE)):
                call = prepare_submit(settings, schema, users[i % len(users)], 1)
                script(keys=call.keys, args=call.args, client=pipe)
            replies = pipe.execute()
            ledger.add(sum(1 for r in replies if r[0] == 0), 0)
        # The flag says a flush was already requested: clear it so the next request asks.
        client.delete(schema.all()[0].flush_flag)
    finally:
        client.close()


def post_one(stack: Stack, ledger: Ledger) -> None:
    """One score through the service: it requests a flush from the persister."""
    user = stack.token_users[0]
    token = stack.tokens_file.read_text().split("\n", 1)[0].split()[1]
    reply = httpx.post(
        stack.base + "/api/v1/score",
        json={"user_id": user, "score_increase": 1},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    reply.raise_for_status()
    ledger.add(1, 0)


def _count(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute("SELECT count(*) FROM score_events").fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


def wait_drained(stack: Stack, timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Poll until no event is left unpersisted, in any partition; False on timeout."""
    client = stack.client()
    streams = [p.events for p in stack.schema.all()]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if all(oldest_unpersisted(client, s) is None for s in streams):
                return True
            time.sleep(POLL_S)
        return False
    finally:
        client.close()


def unpersisted_count(client: redis.Redis, stream: str) -> int:
    """Events not yet acknowledged by the persister's group (pending + never delivered)."""
    groups: list[dict[str, Any]] = client.xinfo_groups(stream) if client.exists(stream) else []
    if not groups:
        return int(client.xlen(stream))
    counts = [int(g["pending"]) + int(g["lag"] if g.get("lag") is not None else 0) for g in groups]
    return max(counts)


def drain_rate(
    stack: Stack, backlog: int, ledger: Ledger, trees: dict[str, int]
) -> dict[str, object]:
    """Stop the persister, build a backlog, start it again and time the drain.

    Progress is read from the consumer group (cheap): polling Postgres with count(*) would
    load the database the persister writes to. The rate counts from the first acknowledged
    batch to the last, so the worker's start-up is left out (and reported apart)."""
    if not wait_drained(stack):
        return {"error": "the persister did not catch up before the backlog was built"}
    stack.stop_worker()
    make_backlog(stack, backlog, ledger)
    post_one(stack, ledger)
    stream = KeySchema(1).all()[0].events
    client = stack.client()
    try:
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            before = _count(conn)
        initial = unpersisted_count(client, stream)
        spawned = time.monotonic()
        stack.start_worker()
        first: tuple[float, int] | None = None
        meter: CpuMeter | None = None
        deadline = spawned + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            left = unpersisted_count(client, stream)
            now = time.monotonic()
            if first is None and left < initial:
                first = (now, left)
                meter = CpuMeter(trees | {"persister": stack.worker.pid if stack.worker else 0})
                meter.start()
            if left == 0 and oldest_unpersisted(client, stream) is None:
                break
            time.sleep(DRAIN_POLL_S)
        else:
            return {"error": f"not drained within {DRAIN_TIMEOUT_S:.0f}s"}
        end = time.monotonic()
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            drained = _count(conn) - before
    finally:
        client.close()
    steady = first[1] / (end - first[0]) if first and end > first[0] else 0.0
    return {
        "backlog": initial,
        "committed_to_postgres": drained,
        "seconds_from_start": end - spawned,
        "events_per_s_including_startup": initial / (end - spawned),
        "events_per_s": steady,
        "cpu_us_per_event": meter.per_request_us(first[1]) if meter and first else {},
    }


def lag_under_load(
    stack: Stack, connections: int, duration_s: float, ledger: Ledger
) -> dict[str, object]:
    """Sample the oldest unpersisted event's age while wrk runs the write path at its max."""
    client = stack.client()
    stream = KeySchema(1).all()[0].events
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(unpersisted_age_ms(client, stream))
            stop.wait(POLL_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = wrk.run("ours+persister", stack.base, stack.tokens_file, connections, duration_s)
    finally:
        stop.set()
        sampler.join()
        client.close()
    ledger.add(result.ok, connections + result.timeouts + result.socket_errors)
    ordered = sorted(samples)
    return {
        "write": result.as_dict(),
        "samples": len(samples),
        "lag_p50_ms": statistics.median(ordered) if ordered else 0.0,
        "lag_p99_ms": ordered[int(0.99 * (len(ordered) - 1))] if ordered else 0.0,
        "lag_max_ms": ordered[-1] if ordered else 0.0,
    }
