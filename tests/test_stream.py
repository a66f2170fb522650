"""persister/stream.py against a real Redis, with another client's command run between the
stream's own commands: what Redis may do at any time between two commands that are not one
atomic step (a pipeline without MULTI is not one: Redis may serve another client between its
commands). The test client runs such pipelines command by command, so the interleaving that
Redis allows happens every time.

- Trimming while the read-ahead reads the next batch (XREADGROUP) never drops an entry that
  is delivered but not yet acknowledged.
- Forgetting an idle consumer never takes the entries of a consumer that came back meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
import redis.client

from persister.stream import EventStream
from service.keys import PERSISTER_GROUP, KeySchema, PartitionKeys
from service.settings import Settings


class Interleaving(redis.Redis):
    """A client after whose first command another client runs `between` (once). Its
    pipelines without MULTI run one command at a time."""

    def __init__(self, between: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.between: Callable[[], None] | None = between

    def execute_command(self, *args: Any, **options: Any) -> Any:
        result = super().execute_command(*args, **options)
        if self.between is not None:
            between, self.between = self.between, None
            between()
        return result

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> redis.client.Pipeline:
        if transaction:
            return super().pipeline(transaction, shard_hint)
        return OneByOne(self)


class OneByOne(redis.client.Pipeline):
    """A pipeline without MULTI, sent as separate commands (as Redis may interleave it)."""

    def __init__(self, owner: Interleaving) -> None:
        super().__init__(owner.connection_pool, owner.response_callbacks, False, None)
        self.owner = owner

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack, self.command_stack = self.command_stack, []
        replies: list[Any] = []
        for args, options in stack:
            try:
                replies.append(self.owner.execute_command(*args, **options))
            except redis.ResponseError as exc:
                if raise_on_error:
                    raise
                replies.append(exc)
        return replies


def _interleaving(r: redis.Redis, between: Callable[[], None]) -> Interleaving:
    return Interleaving(between, connection_pool=r.connection_pool)


def _keys(settings: Settings) -> PartitionKeys:
    return KeySchema(settings.partitions).all()[0]


def _add(r: redis.Redis, keys: PartitionKeys, count: int) -> list[bytes]:
    return [r.xadd(keys.events, {"e": f"event-{i}", "u": "u", "d": "1"}) for i in range(count)]


def _survives(r: redis.Redis, keys: PartitionKeys, ids: list[bytes]) -> bool:
    return all(r.xrange(keys.events, i, i) for i in ids)


def test_trimming_keeps_entries_read_ahead_meanwhile(settings: Settings, r: redis.Redis) -> None:
    keys = _keys(settings)
    worker = EventStream(r, keys, "worker")
    worker.ensure_group()
    acknowledged = _add(r, keys, 3)
    r.xreadgroup(PERSISTER_GROUP, "worker", {keys.events: ">"})
    r.xack(keys.events, PERSISTER_GROUP, *acknowledged)  # nothing pending now
    read_ahead = _add(r, keys, 2)

    def read_next_batch() -> None:  # the read-ahead thread's XREADGROUP
        worker.read(10)

    trimming = EventStream(_interleaving(r, read_next_batch), keys, "worker")
    trimming.trim()

    assert r.xpending(keys.events, PERSISTER_GROUP)["pending"] == 2
    assert _survives(r, keys, read_ahead)  # delivered, not yet in Postgres: kept
    trimming.trim()
    assert _survives(r, keys, read_ahead)
    assert not any(r.xrange(keys.events, i, i) for i in acknowledged)


def test_acknowledging_trims_what_is_acknowledged_and_keeps_the_rest(
    settings: Settings, r: redis.Redis
) -> None:
    keys = _keys(settings)
    stream = EventStream(r, keys, "worker")
    stream.ensure_group()
    first = _add(r, keys, 3)
    r.xreadgroup(PERSISTER_GROUP, "worker", {keys.events: ">"})
    undelivered = _add(r, keys, 2)

    stream.ack([i.decode() for i in first[1:]], [])

    assert _survives(r, keys, [first[0], *first[1:], *undelivered])  # first[0] is pending
    stream.ack([first[0].decode()], [])
    assert r.xlen(keys.events) == 2
    assert _survives(r, keys, undelivered)


def test_a_consumer_that_comes_back_while_being_forgotten_keeps_its_entries(
    settings: Settings, r: redis.Redis
) -> None:
    keys = _keys(settings)
    sweeper = EventStream(r, keys, "sweeper")
    sweeper.ensure_group()
    r.xgroup_createconsumer(keys.events, PERSISTER_GROUP, "stalled")  # idle, holds nothing
    entries = _add(r, keys, 2)

    def stalled_worker_reads() -> None:  # it was stalled, not dead: it reads its next batch
        r.xreadgroup(PERSISTER_GROUP, "stalled", {keys.events: ">"})

    forgetting = EventStream(_interleaving(r, stalled_worker_reads), keys, "sweeper")
    forgetting.forget_idle_consumers(0)

    pending = r.xpending_range(keys.events, PERSISTER_GROUP, "-", "+", 10)
    assert sorted(p["message_id"] for p in pending) == sorted(entries)
    assert {p["consumer"] for p in pending} == {b"stalled"}
