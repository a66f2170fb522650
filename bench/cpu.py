"""CPU time per request, process by process: where a request's cost goes across the stack
(service workers, Redis, the persister, Postgres, the load generator)."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path

from bench.procs import children

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """User + system time of `pid`, and of its children that have exited (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command: state is fields[0]; utime, stime, cutime, cstime are 11-14
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def tree_seconds(pid: int) -> float:
    """A process and its live descendants (and the exited ones they waited for)."""
    return cpu_seconds(pid) + sum(tree_seconds(c) for c in children(pid))


def children_seconds() -> float:
    """This process's waited-for children (wrk, redis-benchmark)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds of named process trees between `start()` and `stop()`."""

    def __init__(self, trees: dict[str, int]) -> None:
        self._probes: dict[str, Callable[[], float]] = {
            name: (lambda pid=pid: tree_seconds(pid)) for name, pid in trees.items()
        }
        self._probes["load generator"] = children_seconds
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: probe() for name, probe in self._probes.items()}

    def per_request_us(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request since start(), by process, and their total."""
        used = {name: probe() - self._before[name] for name, probe in self._probes.items()}
        out = {name: round(1e6 * s / max(1, requests), 1) for name, s in used.items()}
        out["total"] = round(sum(out.values()), 1)
        return out
