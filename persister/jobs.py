"""The persister's RQ jobs, and how the service asks for them.

- `flush(partition)`: requested by the hot path when its Lua call set the partition's flush
  flag (only when no flush was pending), so while one flush runs, new events pile up for it.
- `sweep()`: every few seconds (RQ's cron, run by `score-service worker`), so that no event
  waits longer than that even when no request arrives, a lost request or a killed worker
  included.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

import redis
from rq import Queue

from persister.flush import FLUSH_BUDGET_S, Drained, Persister
from service.connections import queue_redis
from service.keys import PartitionKeys
from service.persister_lag import read_lags_sync
from service.settings import Settings

log = logging.getLogger(__name__)

QUEUE = "score-persister"
JOB_TIMEOUT_S = int(FLUSH_BUDGET_S) + 60
"""A flush ends on its own within its budget plus one batch; RQ kills it after this."""
FAILURE_TTL_S = 7 * 24 * 3600
REPORT_EVERY_S = 60.0
"""How often the sweep logs the lag of every partition (and forgets dead consumers)."""
DEAD_CONSUMER_IDLE_MS = 3600 * 1000
LAGGING_S = 30.0
"""A sweep that finds an event older than this logs a warning."""


SUMMARY_EVERY_S = 10.0
"""The worker logs what it persisted at most this often (INFO); each flush at DEBUG."""


class _Every:
    """`due()` is True at most once per `seconds` (in this process)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.last = -seconds

    def due(self) -> bool:
        now = self.clock()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


class FlushLog:
    """What the worker's flushes did, in the log: each flush at DEBUG, and at INFO a summary
    (events, batches, rate, lag) at most every `every_s`, so a busy worker writes a line every
    few seconds, not several a second. Warnings (Postgres away, dead letters, a lag past
    LAGGING_S) are logged as they happen."""

    def __init__(
        self, every_s: float = SUMMARY_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._due = _Every(every_s, clock)
        self._clock = clock
        self._since = clock()
        self._events = self._new = self._batches = self._dead = 0

    def drained(self, p: Persister, done: Drained | None) -> None:
        """Log one flush (if it did anything), and the summary when it is due."""
        if done is not None and (done.events or done.dead or done.waiting_for_postgres):
            _log_drained(p, done)
            self._events += done.events
            self._new += done.new
            self._batches += done.batches
            self._dead += done.dead
        self.summarize(p)

    def summarize(self, p: Persister) -> None:
        """Log the summary if one is due and there is something to say."""
        if not (self._events or self._dead) or not self._due.due():
            return
        now = self._clock()
        seconds = max(now - self._since, 1e-3)
        lags = read_lags_sync(p.redis, p.parts)
        oldest = max((lag.oldest_age_s for lag in lags), default=0.0)
        log.log(
            logging.WARNING if oldest > LAGGING_S else logging.INFO,
            "persisted %d events (%d new) in %d batches in the last %.0fs, %.0f events/s%s; "
            "%d waiting in Redis, the oldest for %.1fs",
            self._events, self._new, self._batches, seconds, self._events / seconds,
            f"; {self._dead} dead-lettered" if self._dead else "",
            sum(lag.unpersisted for lag in lags), oldest,
        )  # fmt: skip
        self._since = now
        self._events = self._new = self._batches = self._dead = 0


_report = _Every(REPORT_EVERY_S)
_flush_log = FlushLog()


@functools.cache
def persister() -> Persister:
    """This process's Persister, configured from the environment."""
    return Persister(Settings.for_stores())


def flush(partition: int) -> None:
    """RQ job: persist the partition's waiting events."""
    if partition >= persister().settings.partitions:
        # asked for by a service before `partitions set` dropped the partition: it was drained
        log.warning("partition %d is not in this worker's layout: flush skipped", partition)
        return
    _flush_log.drained(persister(), persister().drain(partition))


def sweep() -> None:
    """RQ job, periodic: persist every partition's waiting events (skipping a partition that
    a flush is draining right now), and report the lag now and then."""
    p = persister()
    for partition in range(p.settings.partitions):
        _flush_log.drained(p, p.drain(partition, wait_s=0))
    if _report.due():
        _log_lags(p, p.parts, report=True)
        for partition in range(p.settings.partitions):
            p.stream(partition).forget_idle_consumers(DEAD_CONSUMER_IDLE_MS)


def _log_drained(p: Persister, done: Drained) -> None:
    """Log what a flush did (DEBUG; a dead letter at WARNING), and the lag if it grows."""
    rate = done.events / done.seconds if done.seconds > 0 else 0.0
    log.log(
        logging.WARNING if done.dead else logging.DEBUG,
        "partition %d: persisted %d events (%d new, %d already in the ledger) in %d batches, "
        "%.2fs, %.0f events/s%s%s",
        done.partition, done.events, done.new, done.events - done.new, done.batches,
        done.seconds, rate,
        f"; {done.dead} dead-lettered" if done.dead else "",
        "; Postgres unavailable, events wait in Redis" if done.waiting_for_postgres else "",
    )  # fmt: skip
    if log.isEnabledFor(logging.DEBUG):  # a round trip to Redis: only when it is written
        _log_lags(p, [p.parts[done.partition]], report=False)


def _log_lags(p: Persister, parts: list[PartitionKeys], *, report: bool) -> None:
    """Log the lag of `parts`: at INFO if `report`, else at DEBUG when events wait; at
    WARNING whenever the oldest waits longer than LAGGING_S."""
    for lag in read_lags_sync(p.redis, parts):
        if lag.oldest_age_s > LAGGING_S:
            level = logging.WARNING
        elif report:
            level = logging.INFO
        elif lag.unpersisted:
            level = logging.DEBUG
        else:
            continue
        log.log(
            level,
            "partition %d lag: %d events not yet in Postgres (%d pending), oldest %.1fs; "
            "%d persisted in all, %d dead letters",
            lag.partition, lag.unpersisted, lag.pending, lag.oldest_age_s, lag.persisted,
            lag.dead_letters,
        )  # fmt: skip


def enqueue_flush(rq_queue: Queue, partition: int) -> None:
    """Put a flush job for `partition` on the persister's queue."""
    rq_queue.enqueue(
        flush,
        partition,
        job_timeout=JOB_TIMEOUT_S,
        result_ttl=0,
        failure_ttl=FAILURE_TTL_S,
        description=f"flush partition {partition}",
    )


class FlushRequester:
    """The service's `request_flush`: hands the request to a background thread that enqueues
    the RQ job, so the hot path never waits for RQ's round trips to Redis. Requests that pile
    up while one is enqueued are merged. A request lost here (Redis down) is made good by the
    flag's expiry (the next increment asks again) and by the sweep."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._wanted: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def __call__(self, partition: int) -> None:
        if self._thread is None:
            with self._start:
                if self._thread is None:  # started lazily: in the process that serves
                    self._thread = threading.Thread(
                        target=self._run, name="flush-requests", daemon=True
                    )
                    self._thread.start()
        self._wanted.put(partition)

    def _run(self) -> None:
        """The thread: enqueue what is wanted, for as long as the process runs, whatever fails
        (a thread that died here would leave every later request unheard)."""
        rq_queue = Queue(QUEUE, connection=queue_redis(self._settings))
        while True:
            wanted = {self._wanted.get()}
            while not self._wanted.empty():
                wanted.add(self._wanted.get())
            for partition in sorted(wanted):
                try:
                    enqueue_flush(rq_queue, partition)
                except redis.RedisError as exc:
                    log.warning("could not request a flush of partition %d: %s", partition, exc)
                except Exception:
                    log.exception("could not request a flush of partition %d", partition)
