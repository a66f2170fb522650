"""The Redis key schema.

Every key carries its partition's hash tag (`{p0}`, `{p1}`, ...) so that all keys one Lua call
touches live in one Redis Cluster slot. A user belongs to partition
`crc32(user_id) % partitions`. Key names are built here and only here: Lua scripts receive
them in KEYS, never build them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

PREFIX = "score"


def partition_of(user_id: str, partitions: int) -> int:
    """The partition that owns `user_id` (stable across processes and restarts)."""
    return zlib.crc32(user_id.encode()) % partitions


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys of one partition."""

    index: int

    @property
    def tag(self) -> str:
        return f"{{p{self.index}}}"

    @property
    def leaderboard(self) -> str:
        """ZSET user_id -> -total (negated: ascending order is best first, ties by user_id)."""
        return f"{PREFIX}:{self.tag}:leaderboard"

    @property
    def events(self) -> str:
        """STREAM of accepted increments, drained into Postgres by the persister."""
        return f"{PREFIX}:{self.tag}:events"

    @property
    def dead_letters(self) -> str:
        """STREAM of events the persister could not apply, kept for an operator."""
        return f"{PREFIX}:{self.tag}:dead"

    @property
    def top(self) -> str:
        """STREAM of this partition's top-N, appended only when it changes."""
        return f"{PREFIX}:{self.tag}:top"

    @property
    def flush_flag(self) -> str:
        """STRING set by the hot path when it has asked the persister for a flush."""
        return f"{PREFIX}:{self.tag}:flush"

    @property
    def persist_lock(self) -> str:
        """STRING lock: one persister flush of this partition at a time (rebuild and
        reconcile hold it to pause the persister)."""
        return f"{PREFIX}:{self.tag}:persist:lock"

    @property
    def persist_stats(self) -> str:
        """HASH of the persister's counters: events, batches, dead (for /metrics)."""
        return f"{PREFIX}:{self.tag}:persist:stats"

    @property
    def persist_failures(self) -> str:
        """HASH event id -> failed attempts, for events Postgres refused (dead-letter after N)."""
        return f"{PREFIX}:{self.tag}:persist:failures"

    @property
    def rebuilt_leaderboard(self) -> str:
        """ZSET a rebuild fills before it replaces `leaderboard` with it (same hash tag)."""
        return f"{PREFIX}:{self.tag}:leaderboard:rebuilt"

    def rate(self, user_id: str) -> str:
        """STRING: the user's GCRA theoretical arrival time."""
        return f"{PREFIX}:{self.tag}:rate:{user_id}"

    def idempotency(self, user_id: str, key: str) -> str:
        """STRING: the first result of a request made with this Idempotency-Key."""
        return f"{PREFIX}:{self.tag}:idem:{len(user_id)}:{user_id}:{key}"


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Key names for a deployment with `partitions` partitions."""

    partitions: int

    def all(self) -> list[PartitionKeys]:
        return [PartitionKeys(i) for i in range(self.partitions)]

    def for_user(self, user_id: str) -> PartitionKeys:
        return PartitionKeys(partition_of(user_id, self.partitions))

    @property
    def ready_marker(self) -> str:
        """STRING set once Redis holds the leaderboards (by a rebuild, or on a new deployment).

        A Redis without it (new, wiped) must be rebuilt from Postgres before serving.
        """
        return f"{PREFIX}:ready"

    @property
    def rebuild_lock(self) -> str:
        """STRING lock: one rebuild at a time across every service and CLI process."""
        return f"{PREFIX}:rebuild:lock"

    @property
    def layout(self) -> str:
        """STRING: the deployment's partition layout (service.layout), also in Postgres. No
        hash tag: read once at startup and by the readiness poll, never by the hot path's Lua."""
        return f"{PREFIX}:layout"
