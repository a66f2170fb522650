"""`score-service worker`: the RQ worker that runs the persister's jobs, with its scheduler.

- RQ's SimpleWorker: jobs run in this process, which keeps its Postgres connection from one
  flush to the next (a work horse forked per job would connect again for every flush).
- `with_scheduler=True`: RQ's scheduler runs beside it (a child process), for delayed jobs.
- RQ's cron (`rq.cron.CronScheduler`) enqueues the sweep every SWEEP_INTERVAL_S from a thread
  of this process, so the sweep lives and dies with the worker. Several workers each enqueue
  their own sweeps; a sweep that finds a partition being flushed skips it.
- RQ leaves its work loop when Redis fails under it (a restart, a failover): the loop is
  started again, with capped, jittered backoff. Only SIGTERM or SIGINT stop the command.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from types import FrameType

import redis
from rq import SimpleWorker
from rq.cron import CronScheduler

from persister import jobs, layout
from persister.flush import backoff
from service.connections import check_redis_sync, sync_redis
from service.settings import Settings

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 2
"""No event waits longer than about this for the persister, even when no request arrives."""


class PersisterWorker(SimpleWorker):
    """RQ's SimpleWorker, remembering whether it was asked to stop (or failed)."""

    stopping = False

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]


def run(settings: Settings) -> int:
    """Run the worker until SIGTERM/SIGINT, or until the partition layout is changed under it;
    the exit code (2 for a layout it does not run with)."""
    _wait_for_redis(settings)
    layout.ensure_waiting(settings)
    persister = jobs.persister()
    quiet = "DEBUG" if os.environ.get("SCORE_LOG_LEVEL", "").upper() == "DEBUG" else "WARNING"
    logging.getLogger("rq").setLevel(quiet)  # RQ logs every job at INFO: one every 2s
    stop = threading.Event()
    cron = threading.Thread(target=_enqueue_sweeps, args=(settings, stop), name="cron", daemon=True)
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
        while True:
            connection = sync_redis(settings)
            worker = PersisterWorker([jobs.QUEUE], connection=connection, log_job_description=False)
            try:
                worker.work(with_scheduler=True, logging_level=quiet)
            except redis.RedisError as exc:  # raised by RQ's own cleanup while Redis is away
                log.warning("the RQ worker failed: %s", exc)
            finally:
                connection.close()
            if worker.stopping:
                log.info("persister worker stopped")
                return 2 if changed.is_set() else 0
            failures += 1
            delay = backoff(failures)
            log.warning("the RQ worker loop ended on an error; starting it again in %.1fs", delay)
            time.sleep(delay)
    finally:
        stop.set()
        persister.close()


def _wait_for_redis(settings: Settings) -> None:
    """Return once Redis answers; ConfigError if it could evict our keys."""
    client = sync_redis(settings)
    failures = 0
    try:
        while True:
            try:
                check_redis_sync(client)
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                failures += 1
                log.warning("waiting for Redis: %s", exc)
                time.sleep(backoff(failures))
    finally:
        client.close()


def _enqueue_sweeps(settings: Settings, stop: threading.Event) -> None:
    cron = CronScheduler(connection=sync_redis(settings), logging_level="WARNING")
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
            delay = cron.calculate_sleep_interval()
        except redis.RedisError as exc:
            log.warning("could not enqueue the sweep: %s", exc)
            delay = SWEEP_INTERVAL_S
        stop.wait(max(delay, 0.05))
