"""SIGTERM under load, with real processes: `score-service serve --workers 2` drains (readyz
503 at once, requests served through the grace period, then new connections refused while the
requests in flight finish), and `score-service worker` stops after the batches it has read.

Every score update carries an Idempotency-Key (never reused). The client-side ledger holds the
updates answered 200; once the persister has caught up, Postgres's ledger must be exactly that:
an update the service took in was answered, and one it did not answer was not applied.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis
import websockets
from http_support import Cut, read_reply, score_request
from live_support import ws_url
from persist_support import keyed_rows, ledger, pg_scores, redis_totals, submit, unpersisted
from support import (
    Servers,
    make_env,
    start_service,
    start_worker,
    stop_process,
)
from websockets.sync.client import connect as ws_connect

from service.auth import mint
from service.dev.servers import wait_for
from service.keys import PERSISTER_GROUP, KeySchema
from service.settings import Settings

WAIT_S = 30.0
GRACE_S = "2"


@dataclass
class Load:
    """Players scoring over keep-alive connections from a few threads, each until the
    server refuses its connection. What every request became is recorded."""

    address: tuple[str, int]
    tokens: dict[str, str]
    drained: threading.Event  # set once /readyz was seen answering 503
    acked: list[tuple[str, str, int]] = field(default_factory=list)
    acked_while_draining: int = 0
    unanswered: list[tuple[str, bool]] = field(default_factory=list)  # (key, while draining)
    refused_while_draining: list[bool] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, thread: int) -> None:
        users = list(self.tokens)
        host = f"{self.address[0]}:{self.address[1]}"
        sock: socket.socket | None = None
        deadline = time.monotonic() + 2 * WAIT_S
        n = 0
        try:
            while time.monotonic() < deadline:
                if sock is None:
                    try:
                        sock = socket.create_connection(self.address, timeout=WAIT_S)
                    except (ConnectionRefusedError, ConnectionResetError):
                        # reset: taken into the backlog as the last listener closed
                        with self.lock:
                            self.refused_while_draining.append(self.drained.is_set())
                        return  # a real client goes to another instance
                user, key, delta = users[n % len(users)], f"{uuid.uuid4().hex}-{thread}", n % 7 + 1
                n += 1
                head, body = score_request(host, self.tokens[user], user, key, delta)
                draining = self.drained.is_set()
                try:
                    sock.sendall(head + body)
                    reply = read_reply(sock)
                except (BrokenPipeError, ConnectionResetError):
                    reply = None
                except Cut as cut:
                    self.failures.append(f"cut mid-response: {cut}")
                    return
                except TimeoutError:
                    self.failures.append("no response in time")
                    return
                if reply is None:
                    with self.lock:
                        self.unanswered.append((key, draining))
                    sock.close()
                    sock = None
                    continue
                if reply.status != 200:
                    self.failures.append(f"{reply.status}: {reply.body!r}")
                    return
                with self.lock:
                    self.acked.append((user, key, delta))
                    self.acked_while_draining += draining
                if reply.headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            self.failures.append("never refused")
        finally:
            if sock is not None:
                sock.close()


def poll_readyz(base: str, drained: threading.Event, stop: threading.Event) -> None:
    """Set `drained` once /readyz answers 503 (fresh connections: as a load balancer asks)."""
    while not stop.is_set():
        try:
            if httpx.get(base + "/readyz", timeout=5).status_code == 503:
                drained.set()
                return
        except httpx.TransportError:
            return
        stop.wait(0.02)


def watch_live(base: str, drained: threading.Event, closes: list[tuple[int | None, bool]]) -> None:
    """A live viewer: its first frame, then frames until the server closes the socket; the
    close code, and whether /readyz was seen answering 503 by then."""
    with ws_connect(ws_url(base), open_timeout=WAIT_S) as ws:
        ws.recv(timeout=WAIT_S)
        try:
            while True:
                ws.recv(timeout=2 * WAIT_S)
        except websockets.ConnectionClosed as closed:
            closes.append((closed.rcvd.code if closed.rcvd else None, drained.is_set()))


def sigterm_group(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the process and what it forked (as a process manager does); its exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    return process.wait(WAIT_S)


def assert_ledger_is(
    conn: psycopg.Connection[tuple[object, ...]],
    r: redis.Redis,
    settings: Settings,
    acked: list[tuple[str, str, int]],
    users: list[str],
) -> None:
    """Once the persister caught up: Postgres's ledger is `acked`, exactly; Redis agrees."""
    wait_for(
        lambda: unpersisted(settings, r) == 0 and len(ledger(conn, users)) >= len(acked),
        WAIT_S,
        "the persister to catch up",
    )
    rows = keyed_rows(conn, users)
    assert Counter((u, k, d) for u, k, d, _ in rows) == Counter(acked)
    totals = Counter({u: 0 for u in users})
    for u, _, d in acked:
        totals[u] += d
    assert pg_scores(conn, users) == dict(totals)
    assert redis_totals(settings, r, users) == dict(totals)


def test_sigterm_under_load_loses_no_accepted_request(
    servers: Servers, r: redis.Redis, pg, add_users, tmp_path: Path
) -> None:
    env = make_env(servers, SCORE_SHUTDOWN_GRACE_S=GRACE_S, SCORE_BODY_TIMEOUT_S="60")
    settings = Settings.from_env(env)
    users = add_users(count=4)
    tokens = {u: mint(settings, u, ttl_s=3600) for u in users}
    worker = start_worker(env, tmp_path / "worker.log")
    svc = start_service(env, tmp_path / "serve.log", "--workers", "2")
    host, port = svc.base.removeprefix("http://").split(":")
    address = (host, int(port))
    drained, stop = threading.Event(), threading.Event()
    load = Load(address, tokens, drained)
    threads = [threading.Thread(target=load.run, args=(i,)) for i in range(4)]
    poller = threading.Thread(target=poll_readyz, args=(svc.base, drained, stop))
    slow = socket.create_connection(address, timeout=WAIT_S)
    closes: list[tuple[int | None, bool]] = []
    viewer = threading.Thread(target=watch_live, args=(svc.base, drained, closes))
    try:
        viewer.start()
        for thread in threads:
            thread.start()
        wait_for(lambda: len(load.acked) >= 100 or bool(load.failures), WAIT_S, "load")
        # a request in flight across the whole drain: its head and half its body now
        slow_key = f"slow-{uuid.uuid4().hex}"
        head, body = score_request(f"{host}:{port}", tokens[users[0]], users[0], slow_key, 1000)
        slow.sendall(head + body[:5])
        poller.start()
        svc.process.send_signal(signal.SIGTERM)

        wait_for(drained.is_set, WAIT_S, "/readyz to answer 503")
        wait_for(lambda: bool(load.refused_while_draining), WAIT_S, "a refused connection")
        # new connections are refused now, and the request in flight is still served
        slow.sendall(body[5:])
        reply = read_reply(slow)
        assert reply is not None and reply.status == 200, reply
        load.acked.append((users[0], slow_key, 1000))

        for thread in [*threads, viewer]:
            thread.join(2 * WAIT_S)
        assert svc.process.wait(WAIT_S) == 0, svc.log.read_text()[-3000:]
    finally:
        stop.set()
        slow.close()
        stop_process(svc.process)
    assert not load.failures, load.failures
    # every client was refused in the end, and only once the service said it was draining;
    # during the grace period requests were still served
    assert load.refused_while_draining == [True] * len(threads)
    assert load.acked_while_draining > 0
    # the live viewer was told to go away, once the load balancer had been told
    assert closes == [(1001, True)]
    # a request that got no answer at all (sent as the listener closed, never taken in) is
    # allowed only then; the ledger below proves it was not applied
    assert all(draining for _, draining in load.unanswered), load.unanswered
    print(
        f"acked {len(load.acked)} ({load.acked_while_draining} while draining), "
        f"unanswered {len(load.unanswered)}, refused {len(load.refused_while_draining)}"
    )
    try:
        assert_ledger_is(pg, r, settings, load.acked, users)
    finally:
        assert sigterm_group(worker) == 0


BACKLOG = 10_000


def test_sigterm_during_a_flush_persists_the_batch_read_and_stops(
    servers: Servers, r: redis.Redis, pg, add_users, tmp_path: Path
) -> None:
    # Small batches: the backlog takes a thousand transactions, and SIGTERM comes in the middle.
    env = make_env(servers, SCORE_PERSIST_BATCH="10")
    settings = Settings.from_env(env)
    users = add_users(count=4)
    acked = []
    for n in range(BACKLOG):
        user, key, delta = users[n % len(users)], f"k-{n}", n % 5 + 1
        assert submit(settings, r, user, delta, key).total > 0
        acked.append((user, key, delta))

    first = start_worker(env, tmp_path / "first.log")
    try:
        # its signal handlers are in place once it says so: a SIGTERM before would just kill it
        started = "persister worker:"
        wait_for(lambda: started in (tmp_path / "first.log").read_text(), WAIT_S, "the worker")
        wait_for(lambda: len(ledger(pg, users)) > 0, WAIT_S, "the worker to persist")
        assert sigterm_group(first) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # it stopped in the middle of the backlog, and what it read is committed and acknowledged
    persisted = len(ledger(pg, users))
    assert 0 < persisted < BACKLOG
    assert r.xpending(settings_events(settings), PERSISTER_GROUP)["pending"] == 0
    assert unpersisted(settings, r) == BACKLOG - persisted

    second = start_worker(env, tmp_path / "second.log")
    try:
        assert_ledger_is(pg, r, settings, acked, users)
    finally:
        assert sigterm_group(second) == 0


def settings_events(settings: Settings) -> str:
    return KeySchema(settings.partitions).all()[0].events
