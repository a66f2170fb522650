"""Draining a partition's events stream into Postgres: the work of one flush job.

A flush takes the partition's lock, clears the flush flag (so the next accepted increment asks
for another flush), then reads batches until the stream is drained: reclaimed entries first,
then new ones. Each batch is one Postgres transaction; its entries are acknowledged only after
COMMIT, then the stream is trimmed. While one flush runs, new events pile up for the next
read: under load, batches grow by themselves (group commit), and once the stream is caught up
the reads are LINGER_S apart. The next batch is read while the current one commits, so
draining a backlog runs at about the speed of Postgres alone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
from redis.backoff import EqualJitterBackoff
from redis.lock import Lock

from persister import faults
from persister.events import Batch, Event
from persister.locks import flush_lock
from persister.store import TRANSIENT, Store
from persister.stream import EventStream
from service.connections import failed_again, sync_redis
from service.keys import KeySchema, PartitionKeys
from service.settings import Settings

log = logging.getLogger(__name__)

FLUSH_BUDGET_S = 30.0
"""A flush stops after this long (the next one continues), so one job never runs forever."""
LINGER_S = 0.05
"""After a batch that was not full (the stream is caught up), the next read waits until this
long after that one: at a steady write rate a partition commits about 20 times a second, in
batches of a twentieth of the rate, instead of as often as Postgres commits (a transaction and
a WAL flush each). It adds this much to the lag at most; a backlog is read without a pause."""
LOCK_WAIT_S = 2.0
"""A requested flush waits this long for a running one of the same partition to finish."""
MAX_FAILURES = 5
"""An event Postgres refuses this many times (a second apart at least) is dead-lettered."""
BACKOFF = EqualJitterBackoff(cap=5.0, base=0.1)
"""Waits between attempts while a store is away: exponential, capped at 5 s, jittered (between
half and all of the ceiling, so retries spread but never spin)."""


@dataclass
class Drained:
    """What one flush did."""

    partition: int
    events: int = 0
    new: int = 0
    batches: int = 0
    dead: int = 0
    waiting_for_postgres: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


class Persister:
    """Drains events into Postgres. One per worker process (it keeps a Postgres connection,
    and the backoff state survives from one flush to the next)."""

    def __init__(
        self,
        settings: Settings,
        consumer: str | None = None,
        parts: Sequence[PartitionKeys] | None = None,
    ) -> None:
        self.settings = settings
        self.parts = list(parts) if parts is not None else KeySchema(settings.partitions).all()
        """The partitions it drains (`partitions set` gives those of two layouts at once)."""
        self.redis = sync_redis(settings)
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.store = Store(settings.database_url, settings.idempotency_ttl_s)
        self._failures = 0
        self.stopping = threading.Event()
        """Set when the worker is asked to stop (SIGTERM): a flush persists the batches it has
        read, reads no more, and gives up waiting for Postgres (its batch stays pending, for
        the next worker to reclaim)."""

    def close(self) -> None:
        """Close the Postgres connection and the Redis client."""
        self.store.close()
        self.redis.close()

    def stream(self, partition: int) -> EventStream:
        """The partition's events stream, as this persister's consumer."""
        return EventStream(self.redis, self.parts[partition], self.consumer)

    def drain(
        self, partition: int, *, budget_s: float = FLUSH_BUDGET_S, wait_s: float = LOCK_WAIT_S
    ) -> Drained | None:
        """Persist the partition's waiting events; None if another flush holds it (that flush
        reads our events too: the flag was cleared when it started)."""
        keys = self.parts[partition]
        lock = flush_lock(self.redis, keys)
        if not lock.acquire(blocking=wait_s > 0, blocking_timeout=wait_s):
            return None
        try:
            self.redis.delete(keys.flush_flag)
            return self._drain(self.stream(partition), lock, time.monotonic() + budget_s)
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:
                log.warning(
                    "partition %d: the flush lock expired before the flush ended", partition
                )

    def _drain(self, stream: EventStream, lock: Lock, deadline: float) -> Drained:
        done = Drained(stream.keys.index)
        size = self.settings.persist_batch
        # While a batch commits, the next one is read and parsed in a thread: Postgres and
        # Python work at once, on two cores (the commit waits on a socket, without the GIL).
        # Read ahead, entries only become pending, which is safe: a crash leaves them to be
        # reclaimed, and each is acknowledged only after its own batch has committed.
        with ThreadPoolExecutor(1, thread_name_prefix="persist-read") as reader:
            read_at = time.monotonic()
            batch: Batch | None = None if self.stopping.is_set() else stream.read(size)
            while batch:
                not_before = read_at + LINGER_S if len(batch) < size else read_at
                read_at = max(time.monotonic(), not_before)
                # past the deadline, or stopping, read no more (a batch read ahead would wait
                # pending); a batch already read is still persisted
                ahead = (
                    reader.submit(self._read_at, stream, size, batch.stream_ids(), read_at)
                    if time.monotonic() < deadline and not self.stopping.is_set()
                    else None
                )
                if not self._persist(stream, batch, lock=lock, deadline=deadline, done=done):
                    done.waiting_for_postgres = True
                    break
                if not _renew(lock):
                    break
                batch = ahead.result() if ahead else None
        return done

    def _read_at(self, stream: EventStream, size: int, skip: set[str], when: float) -> Batch:
        """The next batch, read at `when` (time.monotonic()) or now if that has passed; a
        SIGTERM ends the wait."""
        wait = when - time.monotonic()
        if wait > 0:
            self.stopping.wait(wait)
        return stream.read(size, skip)

    def _persist(
        self, stream: EventStream, batch: Batch, *, lock: Lock, deadline: float, done: Drained
    ) -> bool:
        """Commit one batch, then acknowledge it; False if Postgres stayed unavailable until
        the deadline (the batch stays pending and a later flush reclaims it)."""
        events = batch.events
        inserted, refused = 0, list[tuple[Event, Exception]]()
        while events:
            try:
                inserted, refused = self.store.apply(events)
                break
            except TRANSIENT as exc:
                self._failures = failed_again(self._failures)
                delay = BACKOFF.compute(self._failures)
                log.warning(
                    "partition %d: Postgres unavailable (%s: %s); %d events wait in Redis; "
                    "retrying in %.1fs",
                    stream.keys.index, type(exc).__name__, str(exc).strip()[:200],
                    len(events), delay,
                )  # fmt: skip
                self.store.close()
                # renewed on both sides of the sleep: an attempt plus a sleep may outlast it
                if self._give_up(deadline, delay) or not _renew(lock):
                    return False
                self.stopping.wait(delay)  # a SIGTERM ends the wait
                if self.stopping.is_set() or not _renew(lock):
                    return False
        self._failures = 0
        faults.point("after-commit")
        if not _renew(lock):
            # Committed, but the partition is no longer ours (a rebuild or reconcile may have
            # paused it, reading the stream and Postgres in one snapshot): leave the batch
            # pending; whoever flushes next finds it in the ledger and adds nothing.
            return False
        dead = 0
        for entry, reason in batch.malformed:  # cannot succeed later: dead-letter at once
            stream.dead_letter(entry, f"malformed: {reason}")
            dead += 1
        for event, error in refused:
            dead += self._refused(stream, event, error)
        refused_ids = {event.stream_id for event, _ in refused}
        committed = [e.stream_id for e in events if e.stream_id not in refused_ids]
        if committed:
            maybe_failed = [e.event_id for e in events if e.stream_id in batch.reclaimed]
            stream.ack(committed, maybe_failed)  # and trims
        elif dead:
            stream.trim()  # dead letters are acknowledged: they need not stay in the stream
        done.dead += dead
        done.events += len(committed)
        done.new += inserted
        done.batches += 1
        return True

    def _give_up(self, deadline: float, delay: float) -> bool:
        """Whether to stop waiting for Postgres and leave the batch pending: past the flush's
        deadline, or asked to stop (a worker that is being stopped must not wait 30 s)."""
        return self.stopping.is_set() or time.monotonic() + delay > deadline

    def _refused(self, stream: EventStream, event: Event, exc: Exception) -> int:
        """Count a refusal; dead-letter the event once it has failed MAX_FAILURES times.
        Until then it stays pending, and is retried when reclaimed (in a second at least)."""
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        failures = stream.record_failure(event)
        if failures < MAX_FAILURES:
            log.warning(
                "partition %d: Postgres refused event %s (%d/%d): %s",
                stream.keys.index, event.stream_id, failures, MAX_FAILURES, reason,
            )  # fmt: skip
            return 0
        stream.dead_letter((event.stream_id.encode(), event.fields()), reason, event.event_id)
        return 1


def _renew(lock: Lock) -> bool:
    """Restart the flush lock's time to live; False if it was lost (it expired and another
    flush took the partition): then stop, and leave the rest to that flush."""
    try:
        lock.reacquire()
    except redis.exceptions.LockError:
        log.warning("the flush lock %s was lost; stopping this flush", lock.name)
        return False
    return True
