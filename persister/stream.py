"""One partition's events stream, seen by one consumer of the persister's group.

Entries are acknowledged only after Postgres has committed them, and the stream is trimmed
with MINID below the oldest entry still pending (never MAXLEN): an entry leaves Redis only
once Postgres has it, or once it has been moved to the dead-letter stream.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import redis

from persister.events import Batch, Event, RawEntry, StreamEntry, parse_raw
from service.keys import PERSISTER_GROUP, PartitionKeys
from service.scripts import SyncScripts, forget_consumer, trim_events

log = logging.getLogger(__name__)

CLAIM_IDLE_MS = 1000
"""Entries pending this long are reclaimed. Callers hold the partition's flush lock, so no
other consumer is working on them: they belong to a dead consumer, or were refused by
Postgres and wait for another attempt (spaced by this much)."""
FAILURES_TTL_S = 24 * 3600


class EventStream:
    """Reads, acknowledges, trims and dead-letters entries of one partition's stream."""

    def __init__(self, client: redis.Redis, keys: PartitionKeys, consumer: str) -> None:
        self.client = client
        self.keys = keys
        self.consumer = consumer
        self._scripts = SyncScripts(client)
        # The same connections, for the two reads of a batch without redis-py's reply parsing
        # (a dict per entry): parse_raw reads the replies as they come. A cluster client has
        # no pool of its own: the primary of the partition's slot is asked (_unparsed).
        pool = getattr(client, "connection_pool", None)
        self._raw = None if pool is None else _unparsing(pool)

    def ensure_group(self) -> None:
        """Create the persister's group, reading from the stream's start (idempotent)."""
        try:
            self.client.xgroup_create(self.keys.events, PERSISTER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, count: int, skip: Collection[str] = ()) -> Batch:
        """Up to `count` entries, parsed: reclaimed ones (from a dead consumer, or refused by
        Postgres a while ago) first, then new ones.

        `skip`: the stream ids of a batch this consumer is committing meanwhile. XAUTOCLAIM
        takes them too once that has taken longer than CLAIM_IDLE_MS; they are left out, so
        no batch holds an entry another batch is working on.
        """
        try:
            return self._read(count, skip)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        self.ensure_group()  # a new or wiped Redis
        return self._read(count, skip)

    def _read(self, count: int, skip: Collection[str]) -> Batch:
        batch = Batch()
        events, group, consumer = self.keys.events, PERSISTER_GROUP, self.consumer
        reply = self._unparsed(
            "XAUTOCLAIM", events, group, consumer, CLAIM_IDLE_MS, "0-0", "COUNT", count
        )
        # an entry deleted while pending comes back as nil (Redis 6.2): nothing to persist
        claimed = [e for e in reply[1] if e[1] is not None and e[0].decode() not in skip]
        batch.reclaimed.update(e[0].decode() for e in claimed)
        parse_raw(claimed, batch)
        if len(claimed) < count:
            reply = self._unparsed(
                "XREADGROUP", "GROUP", group, consumer, "COUNT", count - len(claimed),
                "STREAMS", events, ">",
            )  # fmt: skip
            parse_raw(_entries(reply), batch)
        return batch

    def _unparsed(self, *command: str | int) -> Any:
        if self._raw is not None:
            return self._raw.execute_command(*command)  # type: ignore[no-untyped-call]
        cluster: Any = self.client
        for attempt in (1, 2):
            node = cluster.get_node_from_key(self.keys.events)
            try:
                raw = _unparsing(node.redis_connection.connection_pool)
                return raw.execute_command(*command)  # type: ignore[no-untyped-call]
            except redis.exceptions.MovedError:  # the slot moved (nothing ran): ask again
                if attempt == 2:
                    raise
                cluster.nodes_manager.initialize()
        raise AssertionError("unreachable")

    def ack(self, stream_ids: Sequence[str], reclaimed: Sequence[str]) -> None:
        """Acknowledge committed entries, count them, and trim what no one needs any more.

        `reclaimed`: the event ids among them that may have a failure record to forget.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.keys.events, PERSISTER_GROUP, *stream_ids)
        pipe.hincrby(self.keys.persist_stats, "events", len(stream_ids))
        pipe.hincrby(self.keys.persist_stats, "batches", 1)
        if reclaimed:
            pipe.hdel(self.keys.persist_failures, *reclaimed)
        pipe.execute()
        self.trim()

    def trim(self) -> None:
        """Trim the stream below the oldest entry not yet acknowledged: pending, or else not
        yet delivered. One atomic step: the read-ahead's XREADGROUP may run at any time."""
        self._scripts.run(trim_events(self.keys))

    def record_failure(self, event: Event) -> int:
        """Count one more refusal of `event` by Postgres; the count so far."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.keys.persist_failures, event.event_id, 1)
        pipe.expire(self.keys.persist_failures, FAILURES_TTL_S)
        count, _ = pipe.execute()
        return int(count)

    def dead_letter(self, entry: StreamEntry, reason: str, event_id: str | None = None) -> None:
        """Move an entry Postgres will not take to the dead-letter stream, atomically, and count
        it; it no longer holds back the others or the trimming."""
        stream_id, fields = entry
        pipe = self.client.pipeline(transaction=True)
        dead: dict[Any, Any] = dict(fields)
        dead.update({b"stream_id": stream_id, b"reason": reason[:500]})
        pipe.xadd(self.keys.dead_letters, dead)
        pipe.xack(self.keys.events, PERSISTER_GROUP, stream_id)
        pipe.hincrby(self.keys.persist_stats, "dead", 1)
        if event_id is not None:
            pipe.hdel(self.keys.persist_failures, event_id)
        pipe.execute()
        log.error(
            "partition %d: event %s moved to the dead-letter stream %s: %s",
            self.keys.index, stream_id.decode(), self.keys.dead_letters, reason,
        )  # fmt: skip

    def forget_idle_consumers(self, idle_ms: int) -> None:
        """Delete consumers that hold nothing and have been idle for `idle_ms` (dead workers).

        Each is checked again and deleted in one step: a worker that comes back meanwhile
        keeps its consumer, and the entries it has just read stay pending."""
        try:
            consumers = self.client.xinfo_consumers(self.keys.events, PERSISTER_GROUP)
        except redis.ResponseError:
            return
        for consumer in consumers:
            name = consumer["name"].decode()
            if name != self.consumer and not consumer["pending"] and consumer["idle"] >= idle_ms:
                self._scripts.run(forget_consumer(self.keys, PERSISTER_GROUP, name, idle_ms))


def _entries(reply: Any) -> list[RawEntry]:
    """The entries of an unparsed XREADGROUP reply: nil when there are none, else per stream
    [key, entries] (RESP2) or {key: entries} (RESP3)."""
    if not reply:
        return []
    per_stream = reply.values() if isinstance(reply, dict) else (s[1] for s in reply)
    return [entry for entries in per_stream for entry in entries]


def _unparsing(pool: redis.ConnectionPool) -> redis.Redis:
    """A client on `pool` that hands the batch reads' replies over as they come."""
    raw = redis.Redis(connection_pool=pool)
    for command in ("XAUTOCLAIM", "XREADGROUP"):
        raw.response_callbacks.pop(command, None)
    return raw
