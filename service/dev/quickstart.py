"""`score-service dev`: the whole stack on one machine, for a first look and for demos.

Starts Redis and Postgres under `.data/` unless REDIS_URL / DATABASE_URL point elsewhere,
migrates, provisions demo users, runs the web process and the persister worker, and prints
a ready-to-paste curl. Whatever ends it stops everything it started: Ctrl-C, SIGTERM and
SIGHUP (a closed terminal, a dropped SSH session) stop them in order; if it dies (kill -9),
the kernel signals each of them (PR_SET_PDEATHSIG). One `dev` at a time uses a data
directory (a lock), and it stops what a dead one left there before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from service.dev.servers import PostgresServer, RedisServer, die_with_parent, free_port, wait_for
from service.dev.topologies import LocalCluster, LocalSentinel

DEMO_USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
              "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil"]  # fmt: skip


def _port(preferred: int) -> int:
    import socket

    with socket.socket() as s:
        # as the server will: connections of a previous run in TIME_WAIT do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


DEV_HS256_FILE = "dev-jwt-secret"
"""In the data directory (.data/): the HS256 secret of `dev`, which `score-service token` run
from the checkout in another shell finds too."""


def _dev_secret(data: Path) -> str:
    """A random HS256 secret kept in .data/, so tokens survive a restart of `dev`."""
    path = data / DEV_HS256_FILE
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


@contextlib.contextmanager
def _lock(data: Path) -> Iterator[None]:
    """Hold .data/dev.lock while we run: a second `dev` on the same data refuses to start.

    The kernel drops the lock when we end, however we end, so a lock never outlives us.
    """
    with open(data / "dev.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise SystemExit(
                f"another `score-service dev` (pid {lock.read().strip() or '?'}) uses {data}"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


@contextlib.contextmanager
def _servers(data: Path, env: dict[str, str], redis_kind: str) -> Iterator[None]:
    started: list[RedisServer | PostgresServer | LocalCluster | LocalSentinel] = []

    def start(server: RedisServer | PostgresServer) -> str:
        """Start `server` (after what a dead `dev` left running in its directory); its URL."""
        server.stop_leftover()
        started.append(server)
        return server.start().url

    try:
        if not env.get("REDIS_URL") and redis_kind != "server":
            where = data / f"redis-{redis_kind}"
            print(f"starting a Redis {redis_kind.title()} under", where, flush=True)
            # A fresh one each time: the service rebuilds it from Postgres, which keeps the data
            for leftover in where.glob("*/redis.pid"):
                RedisServer(leftover.parent).stop_leftover()
            shutil.rmtree(where, ignore_errors=True)
            deployment = LocalCluster(where) if redis_kind == "cluster" else LocalSentinel(where)
            started.append(deployment)
            env["REDIS_URL"] = deployment.start().url
            print(f"REDIS_URL={env['REDIS_URL']}", flush=True)
            if redis_kind == "cluster" and not env.get("SCORE_QUEUE_URL"):
                # RQ's queue cannot live on a cluster
                env["SCORE_QUEUE_URL"] = start(RedisServer(data / "redis-queue"))
        if not env.get("REDIS_URL"):
            print("starting Redis under", data / "redis", flush=True)
            env["REDIS_URL"] = start(RedisServer(data / "redis"))
        if not env.get("DATABASE_URL"):
            print("starting Postgres under", data / "postgres", flush=True)
            env["DATABASE_URL"] = start(PostgresServer(data / "postgres"))
        yield
    finally:
        for server in reversed(started):
            server.stop()


def _cli(env: dict[str, str], *args: str) -> str:
    exe = [sys.executable, "-m", "service.cli", *args]
    out = subprocess.run(
        exe, env=env, capture_output=True, text=True, check=False, preexec_fn=die_with_parent()
    )
    if out.returncode != 0:
        raise SystemExit(f"score-service {' '.join(args)} failed:\n{out.stderr}")
    return out.stdout.strip()


def _demo_traffic(base: str, tokens: dict[str, str], stop: threading.Event) -> None:
    """Random players scoring, a few times a second, so the live page moves."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per simulated score

    with httpx.Client(base_url=base, timeout=5) as client:
        while not stop.wait(random.uniform(0.1, 0.4)):  # noqa: S311 - not cryptography
            user = random.choice(list(tokens))  # noqa: S311
            with contextlib.suppress(httpx.HTTPError):
                client.post(
                    "/api/v1/score",
                    json={"user_id": user, "score_increase": random.randint(1, 50)},  # noqa: S311
                    headers={"Authorization": f"Bearer {tokens[user]}"},
                )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_dev(data: Path, *, port: int, demo: bool, redis_kind: str = "server") -> int:
    data = data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not any(
        env.get(k) for k in ("SCORE_JWT_SECRET", "SCORE_JWT_PUBLIC_KEY", "SCORE_JWT_JWKS_URL")
    ):
        env["SCORE_JWT_SECRET"] = _dev_secret(data)
    env.setdefault("SCORE_SHUTDOWN_GRACE_S", "0")  # no load balancer to wait for: Ctrl-C is quick
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    # stop as cleanly as on Ctrl-C: a process manager's SIGTERM, a closed terminal's SIGHUP
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    with _lock(data), _servers(data, env, redis_kind):
        try:
            print(_cli(env, "migrate"), flush=True)
            print(_cli(env, "users", "add", *DEMO_USERS), flush=True)
            http_port = _port(port)
            base = f"http://127.0.0.1:{http_port}"
            cli = [sys.executable, "-m", "service.cli"]
            # Sessions of their own: Ctrl-C reaches only us, and we stop them in order
            # (web and worker first, then the servers they use). If we die, they end too
            # (die_with_parent says why its preexec_fn is safe beside threads).
            arm = die_with_parent(signal.SIGTERM)
            for command in (["serve", "--port", str(http_port)], ["worker"]):
                process = subprocess.Popen(
                    [*cli, *command],
                    env=env,
                    start_new_session=True,
                    preexec_fn=arm,  # noqa: PLW1509
                )
                children.append(process)
            import httpx

            wait_for(
                lambda: httpx.get(base + "/readyz", timeout=1).status_code == 200, 60, "the service"
            )
            token = _cli(env, "token", "alice")
            print(
                f"\nscore-service is running at {base}/  (live leaderboard)\n\n"
                f"Try it:\n  curl -s -X POST {base}/api/v1/score \\\n"
                f"    -H 'Authorization: Bearer {token}' \\\n"
                f"    -H 'Content-Type: application/json' \\\n"
                f'    -d \'{{"user_id": "alice", "score_increase": 100}}\'\n'
                f"  curl -s {base}/api/v1/leaderboard\n\n"
                f"Demo users: {', '.join(DEMO_USERS)}; mint a token with `score-service token ID`"
                f" (SCORE_JWT_SECRET is in {data / 'dev-jwt-secret'}).\nCtrl-C stops everything.\n",
                flush=True,
            )
            if demo:
                tokens = {u: _cli(env, "token", u, "--ttl", "86400") for u in DEMO_USERS}
                threading.Thread(
                    target=_demo_traffic, args=(base, tokens, stop), daemon=True
                ).start()
                print("playing simulated traffic (--demo)", flush=True)
            while all(c.poll() is None for c in children):
                time.sleep(0.5)
            print("a child process exited; stopping", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            with contextlib.suppress(OSError):  # after a SIGHUP the terminal may be gone
                print("\nstopping...", flush=True)
            return 0
        finally:
            # a second Ctrl-C (or SIGTERM, SIGHUP) must not cut the orderly shutdown short
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            stop.set()
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
