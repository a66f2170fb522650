"""`score-service dev`: the whole stack on one machine, for a first look and for demos.

Starts Redis and Postgres under `.data/` unless REDIS_URL / DATABASE_URL point elsewhere,
migrates, provisions demo users, runs the web process and the persister worker, and prints
a ready-to-paste curl. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from service.devservers import PostgresServer, RedisServer, free_port, wait_for

DEMO_USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan",
              "judy", "mallory", "niaj", "olivia", "peggy", "rupert", "sybil"]  # fmt: skip


def _port(preferred: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def _dev_secret(data: Path) -> str:
    """A random HS256 secret kept in .data/, so tokens survive a restart of `dev`."""
    path = data / "dev-jwt-secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


@contextlib.contextmanager
def _servers(data: Path, env: dict[str, str]) -> Iterator[None]:
    started: list[RedisServer | PostgresServer] = []
    try:
        if not env.get("REDIS_URL"):
            print("starting Redis under", data / "redis", flush=True)
            r = RedisServer(data / "redis").start()
            started.append(r)
            env["REDIS_URL"] = r.url
        if not env.get("DATABASE_URL"):
            print("starting Postgres under", data / "postgres", flush=True)
            pg = PostgresServer(data / "postgres").start()
            started.append(pg)
            env["DATABASE_URL"] = pg.url
        yield
    finally:
        for server in reversed(started):
            server.stop()


def _cli(env: dict[str, str], *args: str) -> str:
    exe = [sys.executable, "-m", "service.cli", *args]
    out = subprocess.run(exe, env=env, capture_output=True, text=True, check=False)
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


def run_dev(data: Path, *, port: int, demo: bool) -> int:
    data = data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not any(
        env.get(k) for k in ("SCORE_JWT_SECRET", "SCORE_JWT_PUBLIC_KEY", "SCORE_JWT_JWKS_URL")
    ):
        env["SCORE_JWT_SECRET"] = _dev_secret(data)
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, _interrupt)  # stop as cleanly as on Ctrl-C
    with _servers(data, env):
        try:
            print(_cli(env, "migrate"), flush=True)
            print(_cli(env, "users", "add", *DEMO_USERS), flush=True)
            http_port = _port(port)
            base = f"http://127.0.0.1:{http_port}"
            cli = [sys.executable, "-m", "service.cli"]
            # Sessions of their own: Ctrl-C reaches only us, and we stop them in order
            # (web and worker first, then the servers they use).
            for command in (["serve", "--port", str(http_port)], ["worker"]):
                children.append(subprocess.Popen([*cli, *command], env=env, start_new_session=True))
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
            print("\nstopping...", flush=True)
            return 0
        finally:
            # a second Ctrl-C must not cut the orderly shutdown short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stop.set()
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()
