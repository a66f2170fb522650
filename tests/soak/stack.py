"""The soak's stack: Redis (AOF, appendfsync always) and Postgres of its own, a fault proxy
between the service and Redis and one between the persister and Postgres, `score-service serve
--workers 2` and `score-service worker`, all real processes in sessions of their own.

Every process the stack starts is stopped by `close()`, whatever state the faults left it in
(stopped with SIGSTOP, killed, restarted).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis
from fault_proxy import FaultProxy, Mode

from persister.schema import migrate
from service.dev.servers import PostgresServer, RedisServer, ServerError, free_port, wait_for
from service.keys import KeySchema
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "soak-secret-" + "s" * 40
START_S = 60.0


def base_env(redis_url: str, database_url: str, partitions: int) -> dict[str, str]:
    """The environment of the soak's processes (none of the caller's SCORE_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORE_")}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        SCORE_JWT_SECRET=SECRET,
        # a limit no player reaches: a 429 would hide what the soak looks for
        SCORE_RATE_LIMIT="100000/s",
        SCORE_RATE_BURST="100000",
        SCORE_PARTITIONS=str(partitions),
    )
    return env


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _signal_group(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


@dataclass
class Stack:
    """The processes under test and the handles the fault driver needs."""

    directory: Path
    partitions: int
    redis: RedisServer
    postgres: PostgresServer
    redis_proxy: FaultProxy  # the service -> Redis
    pg_proxy: FaultProxy  # the persister -> Postgres
    env: dict[str, str]  # direct to both stores: operators' CLI commands
    service_env: dict[str, str]
    worker_env: dict[str, str]
    settings: Settings
    base: str = ""
    serve: subprocess.Popen[bytes] | None = None
    persister: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exited_by_themselves: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, directory: Path, partitions: int) -> Stack:
        directory.mkdir(parents=True, exist_ok=True)
        redis_server = RedisServer(directory / "redis").start()
        postgres = PostgresServer(directory / "postgres", fsync=False)
        try:
            postgres.start()
            with psycopg.connect(postgres.url) as conn:
                migrate(conn)
            redis_proxy = FaultProxy("127.0.0.1", redis_server.port).start()
            pg_proxy = FaultProxy("127.0.0.1", postgres.port).start()
        except BaseException:
            postgres.stop()
            redis_server.stop()
            raise
        env = base_env(redis_server.url, postgres.url, partitions)
        service_env = {**env, "REDIS_URL": f"redis://127.0.0.1:{redis_proxy.port}/0"}
        worker_env = {
            **env,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_proxy.port}/score_service",
        }
        stack = cls(
            directory, partitions, redis_server, postgres, redis_proxy, pg_proxy,
            env, service_env, worker_env, Settings.from_env(env),
        )  # fmt: skip
        try:
            stack.start_service()
            stack.start_persister()
        except BaseException:
            stack.close()
            raise
        return stack

    def schema(self) -> KeySchema:
        return KeySchema(self.partitions)

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=5, socket_connect_timeout=2)

    def _spawn(self, args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
        with open(self.directory / log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            )  # fmt: skip
        self.started.append(process)
        return process

    def start_service(self) -> None:
        """`score-service serve --workers 2`, ready (its /readyz answers 200)."""
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        process = self._spawn(
            ["serve", "--port", str(port), "--workers", "2"], self.service_env, "serve.log"
        )
        self.serve = process

        def ready() -> bool:
            if process.poll() is not None:
                raise ServerError("serve exited: " + self.log_tail("serve.log"))
            return httpx.get(self.base + "/readyz", timeout=2).status_code == 200

        wait_for(ready, START_S, "score-service serve")

    def start_persister(self) -> None:
        self.persister = self._spawn(["worker"], self.worker_env, "worker.log")

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.directory / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def last_words(self, name: str) -> str:
        """The last ERROR line and the last line of a process's log: why it exited."""
        lines = [line for line in self.log_tail(name, 20000).splitlines() if line.strip()]
        errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
        return " | ".join(dict.fromkeys([*errors[-1:], *lines[-1:]]))[:600]

    def service_workers(self) -> list[int]:
        """The pids of uvicorn's worker processes (children of the supervisor that run the
        app; not multiprocessing's resource tracker)."""
        if self.serve is None:
            return []
        return [pid for pid in _children(self.serve.pid) if "spawn_main" in _cmdline(pid)]

    # --- faults -------------------------------------------------------------------------

    def kill_persister(self) -> None:
        """kill -9 of the worker (its process group: the worker forks nothing, but whatever it
        might fork goes with it)."""
        if self.persister is not None:
            _signal_group(self.persister, signal.SIGKILL)
            self.persister.wait(10)

    def signal_persister(self, sig: int) -> None:
        _signal_group(self.persister, sig)

    def kill_redis(self) -> None:
        self.redis.stop(signal.SIGKILL)

    def start_redis(self) -> None:
        """Redis again on the same port and directory: it loads its AOF."""
        self.redis.start()

    def signal_redis(self, sig: int) -> None:
        if self.redis.process is not None and self.redis.process.poll() is None:
            self.redis.process.send_signal(sig)

    def kill_postgres(self) -> None:
        """kill -9 of the postmaster and its backends (its own process group)."""
        process = self.postgres.process
        if process is not None:
            _signal_group(process, signal.SIGKILL)
            process.wait(10)
        self.postgres.stop()  # forgets the dead process, closes its log

    def start_postgres(self) -> None:
        """Postgres again on the same port and data directory (crash recovery). A backend
        of the killed server may hold the shared memory a moment: retried."""
        deadline = time.monotonic() + START_S
        while True:
            try:
                self.postgres.start()
                return
            except ServerError:
                self.postgres.stop()
                if time.monotonic() > deadline:
                    raise

    def signal_postgres(self, sig: int) -> None:
        _signal_group(self.postgres.process, sig)

    def heal(self) -> None:
        """Everything running and reachable again: SIGCONT to all, proxies passing, the
        stores restarted if down."""
        for proxy in (self.redis_proxy, self.pg_proxy):
            proxy.set(Mode.PASS)
        self.signal_redis(signal.SIGCONT)
        self.signal_postgres(signal.SIGCONT)
        self.signal_persister(signal.SIGCONT)
        for pid in self.service_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.redis.process is None or self.redis.process.poll() is not None:
            self.redis.stop()  # forgets the dead process
            self.start_redis()
        if self.postgres.process is None or self.postgres.process.poll() is not None:
            self.postgres.stop()
            self.start_postgres()

    def check_alive(self) -> None:
        """Record the service or persister exiting by itself (a guarantee broken: every
        process rides out any outage), and start it again so the soak goes on."""
        if self.serve is not None and self.serve.poll() is not None:
            self.exited_by_themselves.append(
                f"score-service serve exited by itself (code {self.serve.returncode}): "
                + self.last_words("serve.log")
            )
            self.start_service()
        if self.persister is not None and self.persister.poll() is not None:
            self.exited_by_themselves.append(
                f"score-service worker exited by itself (code {self.persister.returncode}): "
                + self.last_words("worker.log")
            )
            self.start_persister()

    def close(self) -> None:
        """Stop every process the stack started, whatever state it is in."""
        for process in self.started:
            _signal_group(process, signal.SIGCONT)
            _signal_group(process, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(5)
        # uvicorn's workers are in the serve process's group: make sure none outlived it
        for process in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for proxy in (self.redis_proxy, self.pg_proxy):
            with contextlib.suppress(Exception):
                proxy.stop()
        self.signal_postgres(signal.SIGCONT)
        self.signal_redis(signal.SIGCONT)
        self.postgres.stop()
        self.redis.stop()

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
