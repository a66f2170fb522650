"""The hot path's metrics, counted in the process and handed to prometheus_client in bulk.

With `serve --workers N` every metric value lives in a file that all workers map
(prometheus_client's multiprocess mode): each `inc` or `observe` takes a lock, checks the
process id (a system call) and packs a value into the map, and an accepted update made five
of them, 8% of a worker's time (`python -m bench.profile`). A Tally keeps its counts in plain
numbers and adds them to its metric at `flush()`: once a second (`keep_flushing`, run by the
app), and before this process renders /metrics, so a scrape never sees less than the process
had counted a second earlier, and a process's own requests are in its own scrape at once.

Histograms are added to bucket by bucket, through the child's `_buckets` and `_sum`
(prometheus_client has no call that observes a value many times): the version is bounded in
pyproject.toml, and tests/test_metrics.py reads the result back.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import Any

FLUSH_S = 1.0

_tallies: list[CountTally | HistogramTally] = []


class CountTally:
    """A Counter child's increments, added at flush()."""

    def __init__(self, child: Any) -> None:
        self._child = child
        self._count = 0
        _tallies.append(self)

    def inc(self) -> None:
        self._count += 1

    def flush(self) -> None:
        if self._count:
            count, self._count = self._count, 0
            self._child.inc(count)


class HistogramTally:
    """A Histogram child's observations, added at flush()."""

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self._buckets = child._buckets
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        _tallies.append(self)

    def observe(self, amount: float) -> None:
        # the first bucket whose bound is >= amount: Histogram.observe's own choice
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        if not any(self._counts):
            return
        counts, total = self._counts, self._sum
        self._counts, self._sum = [0] * len(self._bounds), 0.0
        for bucket, count in zip(self._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._child._sum.inc(total)


def flush() -> None:
    """Hand every tally's counts to its metric."""
    for tally in _tallies:
        tally.flush()


async def keep_flushing() -> None:
    """flush() every FLUSH_S, until cancelled (then once more)."""
    try:
        while True:
            await asyncio.sleep(FLUSH_S)
            flush()
    finally:
        flush()
