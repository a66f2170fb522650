"""The Redis key schema.

Every key carries its partition's hash tag so that all keys one Lua call touches live in one
Redis Cluster slot. A user belongs to partition `crc32(user_id) % partitions`. Key names are
built here and only here: Lua scripts receive them in KEYS, never build them.

Hash tags spread the partitions over a cluster's primaries: partition i of P gets the first of
`p<i>`, `p<i>.1`, `p<i>.2`, ... whose slot lies in the i-th of P equal slot ranges. A cluster
whose primaries own equal contiguous ranges (what `redis-cli --cluster create` makes) so holds
P/primaries partitions on each primary when P is a multiple of their number, and P=3 on three
primaries puts one on each. `score-service partitions` shows where each one is. (Key scheme 1,
before: `p<i>` alone, whose slots fall where they may: {p0}, {p1}, {p2} are all on two of
three primaries. With one partition both schemes give `{p0}`.)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

PREFIX = "score"
KEY_SCHEME = 2
"""The current key scheme (see above); recorded with the layout (service.layout)."""
OPERATOR_KEY_PREFIX = "operator "
"""Prefixes an operator's Idempotency-Key in its stored form. It holds a space, which no
player's key (1-200 printable ASCII characters, no space) can: the two never meet."""
PERSISTER_GROUP = "persister"
"""The consumer group of the persister on every events stream."""
PERSISTER_WORKERS = f"{PREFIX}:persister:workers"
"""ZSET of persister workers (`host:pid`) -> their last heartbeat, in ms on Redis's clock
(persister/heartbeat.py). No hash tag: read by /readyz and the worker's health check only."""


@cache
def partition_tag(index: int, partitions: int, scheme: int = KEY_SCHEME) -> str:
    """The hash tag's text (without braces) of partition `index` of `partitions`."""
    if scheme == 1:
        return f"p{index}"
    low, high = slot_range(index, partitions)
    for n in range(100_000):  # a few hundred candidates at most, in practice
        name = f"p{index}.{n}" if n else f"p{index}"
        if low <= key_slot(name.encode()) < high:
            return name
    raise AssertionError(f"no hash tag for partition {index} of {partitions}")


def slot_range(index: int, parts: int) -> tuple[int, int]:
    """The `index`-th of `parts` equal contiguous Redis Cluster slot ranges: [low, high)."""
    return (
        index * REDIS_CLUSTER_HASH_SLOTS // parts,
        (index + 1) * REDIS_CLUSTER_HASH_SLOTS // parts,
    )


def partition_of(user_id: str, partitions: int) -> int:
    """The partition that owns `user_id` (stable across processes and restarts)."""
    return zlib.crc32(user_id.encode()) % partitions


def stored_idempotency_key(key: str, *, operator: bool) -> str:
    """The form an Idempotency-Key is kept in (its record's name, the events stream, the
    ledger): the player's key as sent, an operator's with OPERATOR_KEY_PREFIX. Players and
    operators so have separate namespaces per user (a player who uses an operator's key
    first cannot turn the adjustment into a conflict), and a rebuild that restores the
    records from the ledger puts each back in its own namespace."""
    return OPERATOR_KEY_PREFIX + key if operator else key


@dataclass(frozen=True, slots=True)
class PartitionKeys:
    """The keys of one partition."""

    index: int
    name: str
    """The hash tag's text (partition_tag)."""

    @property
    def tag(self) -> str:
        return "{" + self.name + "}"

    @property
    def slot(self) -> int:
        """The Redis Cluster slot of every key of this partition."""
        return key_slot(self.name.encode())

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

    @property
    def rebuild_progress(self) -> str:
        """HASH token, upto: a rebuild of this partition is in progress, and how far its
        rebuilt leaderboard has caught up with the events stream (lua/swap_leaderboard-5.lua)."""
        return f"{PREFIX}:{self.tag}:leaderboard:rebuilt:progress"

    @property
    def ready(self) -> str:
        """STRING set once Redis holds this partition's leaderboard (by the swap of a rebuild,
        to its token). Missing (a new or wiped Redis): the hot path answers NOT_READY, and the
        service rebuilds from Postgres."""
        return f"{PREFIX}:{self.tag}:ready"

    def repair_applied(self, token: str) -> str:
        """STRING: a chunk of `reconcile --repair` corrections was applied (at most once)."""
        return f"{PREFIX}:{self.tag}:repair:{token}"

    def rate(self, user_id: str) -> str:
        """STRING: the user's GCRA theoretical arrival time."""
        return f"{PREFIX}:{self.tag}:rate:{user_id}"

    def idempotency(self, user_id: str, key: str) -> str:
        """STRING: the first result of a request made with this Idempotency-Key, given in
        its stored form (`stored_idempotency_key`)."""
        return f"{PREFIX}:{self.tag}:idem:{len(user_id)}:{user_id}:{key}"


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Key names for a deployment with `partitions` partitions."""

    partitions: int
    scheme: int = KEY_SCHEME

    def all(self) -> list[PartitionKeys]:
        return [self.partition(i) for i in range(self.partitions)]

    def partition(self, index: int) -> PartitionKeys:
        return PartitionKeys(index, partition_tag(index, self.partitions, self.scheme))

    def for_user(self, user_id: str) -> PartitionKeys:
        return self.partition(partition_of(user_id, self.partitions))

    @property
    def ready_markers(self) -> list[str]:
        """Every partition's ready marker. A Redis without one of them (new, wiped) must be
        rebuilt from Postgres before serving."""
        return [p.ready for p in self.all()]

    @property
    def rebuild_lock(self) -> str:
        """STRING lock: one rebuild at a time across every service and CLI process."""
        return f"{PREFIX}:rebuild:lock"

    @property
    def layout(self) -> str:
        """STRING: the deployment's partition layout (service.layout), also in Postgres. No
        hash tag: read once at startup and by the readiness poll, never by the hot path's Lua."""
        return f"{PREFIX}:layout"
