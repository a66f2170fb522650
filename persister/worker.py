"""`score-service worker`: the RQ worker that runs the persister's jobs.

- RQ's SimpleWorker: jobs run in this process, which keeps its Postgres connection from one
  flush to the next (a work horse forked per job would connect again for every flush).
- No RQ scheduler (the child process RQ forks for delayed and retried jobs): every job here
  is enqueued to run at once, by the service or by the cron thread below.
- RQ's cron (`rq.cron.CronScheduler`) enqueues the sweep every SWEEP_INTERVAL_S from a thread
  of this process, so the sweep lives and dies with the worker. Several workers each enqueue
  their own sweeps; a sweep that finds a partition being flushed skips it.
- SIGTERM or SIGINT (RQ's warm shutdown): a flush in progress commits and acknowledges the
  batches it has read, reads no more and ends; one waiting for Postgres leaves its batch
  pending for the next worker to reclaim. Then the worker exits. (A second signal, a second
  or more later, is RQ's cold shutdown: whatever is not acknowledged stays pending.)
- RQ leaves its work loop when Redis fails under it (a restart, a failover): the loop is
  started again, with capped, jittered backoff. Only SIGTERM or SIGINT stop the command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType

import redis
from rq import SimpleWorker
from rq.cron import CronScheduler

from persister import heartbeat, jobs, layout
from persister.flush import BACKOFF, Persister
from service.connections import check_redis, failed_again, queue_redis, sync_redis
from service.persister_lag import HEARTBEAT_S
from service.redis_errors import is_outage
from service.settings import Settings

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 2
"""No event waits longer than about this for the persister, even when no request arrives."""


class PersisterWorker(SimpleWorker):
    """RQ's SimpleWorker, setting `stop` when it is asked to stop (SIGTERM, SIGINT)."""

    stop: threading.Event
    max_connection_wait_time = 5.0
    """RQ waits between reconnections, doubling, at most this long (RQ's default: 60 s): once
    Redis is back, an outage of any length delays the persister by this much at most."""

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()  # type: ignore[no-untyped-call]
        if self.stop.is_set():  # asked before RQ's handlers were in place: stop at once
            self._stop_requested = True


def run(settings: Settings) -> int:
    """Run the worker until SIGTERM/SIGINT or a change of the partition layout under it,
    through outages of Redis or Postgres of any length; the exit code (2 for a layout it does
    not run with)."""
    stop = threading.Event()
    _stop_on_signals(stop)
    persister = _start(settings, stop)
    if persister is None:
        return 0
    persister.stopping = stop  # a flush running at SIGTERM ends after the batches it has read
    quiet = "DEBUG" if os.environ.get("SCORE_LOG_LEVEL", "").upper() == "DEBUG" else "WARNING"
    logging.getLogger("rq").setLevel(quiet)  # RQ logs every job at INFO: one every 2s
    cron = threading.Thread(
        target=_enqueue_sweeps, args=(settings, stop, persister.consumer), name="cron", daemon=True
    )
    cron.start()
    changed = threading.Event()
    threading.Thread(
        target=layout.stop_on_change,
        args=(settings, stop, changed, SWEEP_INTERVAL_S),
        name="layout",
        daemon=True,
    ).start()
    log.info(
        "persister worker: queue %s, %d partition(s), batches of up to %d, sweep every %ds, "
        "consumer %s",
        jobs.QUEUE, settings.partitions, settings.persist_batch, SWEEP_INTERVAL_S,
        persister.consumer,
    )  # fmt: skip
    failures = 0
    try:
        while not stop.is_set():
            connection = queue_redis(settings)
            try:
                # RQ talks to Redis from its constructor on (CLIENT SETNAME)
                worker = PersisterWorker(
                    [jobs.QUEUE], connection=connection, log_job_description=False
                )
                worker.stop = stop
                worker.work(logging_level=quiet)
            except Exception as exc:  # Redis away (RQ's own bookkeeping raises): start again
                log.warning("the RQ worker failed: %s: %s", type(exc).__name__, exc)
            finally:
                connection.close()
            # RQ's handlers stay installed after its loop ends, bound to a worker that is gone
            _stop_on_signals(stop)
            if stop.is_set():
                break
            failures = failed_again(failures)
            delay = BACKOFF.compute(failures)
            log.warning("the RQ worker loop ended on an error; starting it again in %.1fs", delay)
            stop.wait(delay)
        log.info("persister worker stopped")
        return 2 if changed.is_set() else 0
    finally:
        stop.set()
        cron.join(timeout=5)  # its last beat must not follow our goodbye
        with contextlib.suppress(redis.RedisError):
            heartbeat.forget(persister.redis, persister.consumer)
        persister.close()


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set `stop` (while no RQ worker runs: it installs its own)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _start(settings: Settings, stop: threading.Event) -> Persister | None:
    """Wait until Redis answers, check the partition layout, build the persister: retried
    until all three succeed, whatever Redis does meanwhile (a cluster node that dies while we
    start fails the persister's client, which reads the slot map as it is made). None if
    `stop` comes first; ConfigError for a Redis that could evict our keys."""
    failures = 0
    while not stop.is_set():
        try:
            with contextlib.closing(sync_redis(settings)) as client:
                check_redis(client)
            layout.ensure_waiting(settings)
            return jobs.persister()
        except redis.RedisError as exc:
            if not is_outage(exc):
                raise
            failures = failed_again(failures)
            log.warning("waiting for Redis: %s", exc)
            stop.wait(BACKOFF.compute(failures))
    return None


def _enqueue_sweeps(settings: Settings, stop: threading.Event, worker: str) -> None:
    """The cron thread: enqueue the sweep every SWEEP_INTERVAL_S, and beat the worker's
    heartbeat, until `stop`, whatever fails (a thread that died here would leave events
    waiting until a request asks for a flush)."""
    client: redis.Redis | None = None
    cron = CronScheduler(connection=queue_redis(settings), logging_level="WARNING")
    cron.register(
        jobs.sweep,
        jobs.QUEUE,
        interval=SWEEP_INTERVAL_S,
        job_timeout=jobs.JOB_TIMEOUT_S,
        result_ttl=0,
        failure_ttl=jobs.FAILURE_TTL_S,
        ttl=SWEEP_INTERVAL_S * 5,  # a sweep queued behind a long flush expires, not piles up
    )
    while not stop.is_set():
        try:
            cron.enqueue_jobs()
            client = client or sync_redis(settings)  # a cluster's reads the slot map when made
            heartbeat.beat(client, worker)
            delay = min(cron.calculate_sleep_interval(), HEARTBEAT_S)
        except redis.RedisError as exc:
            log.warning("could not enqueue the sweep: %s", exc)
            delay = SWEEP_INTERVAL_S
        except Exception:
            log.exception("could not enqueue the sweep")
            delay = SWEEP_INTERVAL_S
        stop.wait(max(delay, 0.05))
