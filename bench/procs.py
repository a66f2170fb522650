"""Processes the benchmark starts: HTTP servers, the persister worker, their memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.dev.servers import ROOT, free_port, wait_for


@dataclass
class Proc:
    """A process started in its own session (so its workers stop with it)."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    base: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to the process group, then SIGKILL after a grace period."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        except ProcessLookupError:
            pass

    def worker_pids(self) -> list[int]:
        """The pids of uvicorn's worker processes (the process itself if it has none)."""
        spawned = [
            pid for pid in children(self.pid) if b"spawn_main" in _cmdline(pid)
        ]  # not multiprocessing's resource tracker
        return spawned or [self.pid]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


def spawn(name: str, args: list[str], env: dict[str, str], log: Path) -> Proc:
    with open(log, "ab") as out:
        process = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    return Proc(name, process, log)


def http_server(name: str, args: list[str], env: dict[str, str], log: Path, ready: str) -> Proc:
    """Start an HTTP server (`args` get `--port P` appended); wait until `ready` answers 200."""
    port = free_port()
    proc = spawn(name, [*args, "--port", str(port)], env, log)
    proc.base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{proc.tail()}")
        return httpx.get(proc.base + ready, timeout=1).status_code == 200

    try:
        wait_for(up, 60, name)
    except BaseException:
        proc.stop()
        raise
    return proc


def uvicorn_args(app: str, workers: int) -> list[str]:
    """uvicorn with the production server settings of `score-service serve`."""
    return [
        sys.executable, "-m", "uvicorn", app, "--factory", "--workers", str(workers),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
        "--host", "127.0.0.1",
    ]  # fmt: skip


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of `pids`, summed (from /proc)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
