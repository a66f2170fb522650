"""The persister's locks: one flush per partition at a time, and pausing the persister.

A flush holds its partition's lock while it reads, commits, acknowledges and trims. Holding
it is what lets a flush treat every pending entry of the consumer group as abandoned (the
consumer that read it is dead) and reclaim it. Rebuild and reconcile hold every partition's
lock to pause the persister: while they read, Postgres gets no commits and the stream's
delivery state does not move.

Correctness never rests on a lock: if one expires under a stalled holder, two flushes may
apply the same events, and the ledger's unique event ids make the second one change nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from redis.lock import Lock

from service.keys import KeySchema, PartitionKeys

LOCK_TTL_S = 10.0
"""A dead holder blocks its partition this long; a live one renews after every batch."""
PAUSE_WAIT_S = 60.0
"""How long rebuild and reconcile wait for running flushes to let go."""
_POLL_S = 0.05


class PersisterBusy(RuntimeError):
    """The persister could not be paused in time."""


def flush_lock(client: redis.Redis, keys: PartitionKeys) -> Lock:
    """The lock of one partition's flushes (not yet acquired)."""
    lock: Lock = client.lock(
        keys.persist_lock, timeout=LOCK_TTL_S, sleep=_POLL_S, thread_local=False
    )
    return lock


class Pause:
    """Every partition's flush lock, held."""

    def __init__(self, locks: list[Lock]) -> None:
        self._locks = locks

    def renew(self) -> None:
        """Restart the locks' time to live; LockNotOwnedError if one was lost (then the
        persister may have moved, and the caller must not trust what it read)."""
        for lock in self._locks:
            lock.reacquire()


@contextlib.contextmanager
def paused(client: redis.Redis, schema: KeySchema, wait_s: float = PAUSE_WAIT_S) -> Iterator[Pause]:
    """Hold every partition's flush lock (in partition order, so two pausers cannot deadlock)."""
    locks: list[Lock] = []
    try:
        for keys in schema.all():
            lock = flush_lock(client, keys)
            if not lock.acquire(blocking_timeout=wait_s):
                raise PersisterBusy(
                    f"partition {keys.index} was still flushing after {wait_s:.0f}s"
                )
            locks.append(lock)
        yield Pause(locks)
    finally:
        for lock in locks:
            with contextlib.suppress(redis.exceptions.LockError, redis.RedisError):
                lock.release()
