"""How far the persister is behind, read from Redis: for /metrics and the worker's logs.

Everything here comes from the events stream and its consumer group, so any process can
compute it cheaply on demand (a scrape costs at most two pipelined round trips, whatever the
number of partitions) and every service process reports the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from service import streamids
from service.context import Context
from service.keys import PERSISTER_GROUP, PERSISTER_WORKERS, PartitionKeys

HEARTBEAT_S = 2.0
"""A running worker beats this often."""
HEARTBEAT_FRESH_S = 10.0
"""A worker whose last heartbeat is older than this is taken for dead (five missed beats)."""


@dataclass(frozen=True, slots=True)
class Lag:
    """The persister's position on one partition's events stream."""

    partition: int
    pending: int
    """Events read by a persister and not yet committed and acknowledged."""
    undelivered: int
    """Events not yet read by any persister."""
    oldest_age_s: float
    """Age of the oldest event not yet in Postgres; 0 when there is none."""
    persisted: int
    """Events committed to Postgres and acknowledged, since the stream began."""
    batches: int
    dead_letters: int

    @property
    def unpersisted(self) -> int:
        return self.pending + self.undelivered


# TIME of the primary that holds `KEYS[1]`: a keyless TIME cannot go in a Redis Cluster
# pipeline, and ages are measured on the clock that made the stream ids.
TIME_AT_KEY = "return redis.call('TIME')"


def _queue_reads(pipe: Any, parts: Sequence[PartitionKeys]) -> Any:
    """The first round trip, on `pipe` (a blocking or an asyncio client's)."""
    for keys in parts:
        pipe.execute_command("EVAL", TIME_AT_KEY, 1, keys.events)
        pipe.xlen(keys.events)
        pipe.xinfo_groups(keys.events)
        pipe.xpending(keys.events, PERSISTER_GROUP)
        pipe.hgetall(keys.persist_stats)
    return pipe


@dataclass(frozen=True, slots=True)
class _Reads:
    """The first round trip, parsed."""

    now_s: float
    pending: int
    undelivered: int
    """Redis's estimate, exact only when no group has read the stream yet."""
    most_undelivered: int
    """The stream's length less the pending entries: undelivered ones cannot be more."""
    oldest_pending: str | None
    first_undelivered_after: str | None
    """XRANGE start that finds the oldest undelivered event ("-": the whole stream)."""
    stats: dict[bytes, bytes]

    def lag(self, partition: int, first_undelivered: str | None) -> Lag:
        oldest_id = self.oldest_pending or first_undelivered
        age = 0.0
        if oldest_id is not None:
            age = max(0.0, self.now_s - streamids.millis(oldest_id) / 1000)
        undelivered = 0  # nothing after the last delivered entry: no estimate can say more
        if first_undelivered is not None:
            undelivered = min(max(self.undelivered, 1), self.most_undelivered)
        return Lag(
            partition=partition,
            pending=self.pending,
            undelivered=undelivered,
            oldest_age_s=age,
            persisted=int(self.stats.get(b"events", 0)),
            batches=int(self.stats.get(b"batches", 0)),
            dead_letters=int(self.stats.get(b"dead", 0)),
        )


def _parse(results: list[Any]) -> _Reads:
    (seconds, micros), length, groups, summary, stats = results
    now_s = int(seconds) + int(micros) / 1e6
    group = None if isinstance(groups, Exception) else _persister_group(groups)
    if group is None:  # no persister has read this stream yet: every entry waits
        return _Reads(now_s, 0, int(length), int(length), None, "-" if length else None, stats)
    pending = int(summary["pending"])
    # The group's `lag` is Redis's estimate from counters that go stale (unknown after some
    # deletions, too high after a group was created on a stream that already had entries):
    # only an upper bound, checked against the stream itself in the second round trip.
    most = max(0, int(length) - pending)
    lag = group.get("lag")
    estimate = min(int(lag), most) if lag is not None else most
    after = "(" + _text(group["last-delivered-id"]) if most else None
    oldest_pending = _text(summary["min"]) if pending else None
    return _Reads(now_s, pending, estimate, most, oldest_pending, after, stats)


def _persister_group(groups: list[dict[str, Any]]) -> dict[str, Any] | None:
    for group in groups:
        if _text(group["name"]) == PERSISTER_GROUP:
            return group
    return None


_READS = 5  # commands _queue_reads adds per partition


def _first_round(results: list[Any], count: int) -> list[_Reads]:
    return [_parse(results[i * _READS : (i + 1) * _READS]) for i in range(count)]


def _queue_first_undelivered(
    pipe: Any, parts: Sequence[PartitionKeys], reads: list[_Reads]
) -> list[int]:
    """Queue an XRANGE for the first undelivered entry of each partition that may have one;
    their positions in `parts`."""
    asked = []
    for i, (keys, r) in enumerate(zip(parts, reads, strict=True)):
        if r.first_undelivered_after is not None:
            pipe.xrange(keys.events, r.first_undelivered_after, "+", 1)
            asked.append(i)
    return asked


def _lags(
    parts: Sequence[PartitionKeys], reads: list[_Reads], asked: list[int], entries: list[Any]
) -> list[Lag]:
    first: list[str | None] = [None] * len(parts)
    for i, found in zip(asked, entries, strict=True):
        first[i] = _text(found[0][0]) if found else None
    return [r.lag(k.index, f) for k, r, f in zip(parts, reads, first, strict=True)]


def read_lags_sync(client: redis.Redis, parts: Sequence[PartitionKeys]) -> list[Lag]:
    """The lag of each partition, in two pipelined round trips at most (blocking client)."""
    first = _queue_reads(client.pipeline(transaction=False), parts)
    reads = _first_round(first.execute(raise_on_error=False), len(parts))
    second = client.pipeline(transaction=False)
    asked = _queue_first_undelivered(second, parts, reads)
    return _lags(parts, reads, asked, second.execute() if asked else [])


async def read_lags(client: aioredis.Redis, parts: Sequence[PartitionKeys]) -> list[Lag]:
    """The lag of each partition, in two pipelined round trips at most (asyncio client)."""
    first = _queue_reads(client.pipeline(transaction=False), parts)
    reads = _first_round(await first.execute(raise_on_error=False), len(parts))
    second = client.pipeline(transaction=False)
    asked = _queue_first_undelivered(second, parts, reads)
    return _lags(parts, reads, asked, await second.execute() if asked else [])


async def live_workers(client: aioredis.Redis) -> list[str]:
    """The persister workers (`host:pid`) whose heartbeat is fresh, by Redis's clock: one
    round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.eval(TIME_AT_KEY, 1, PERSISTER_WORKERS)
    pipe.zrange(PERSISTER_WORKERS, 0, -1, withscores=True)
    (seconds, micros), beats = await pipe.execute()
    oldest_ms = (int(seconds) + int(micros) / 1e6 - HEARTBEAT_FRESH_S) * 1000
    return [_text(worker) for worker, at_ms in beats if at_ms >= oldest_ms]


class PersisterCollector(Collector):
    """Prometheus metrics of the persister, from the lags read at the last scrape."""

    def __init__(self) -> None:
        self.lags: list[Lag] = []

    def collect(self) -> Iterator[Metric]:
        label = ["partition"]
        families: list[tuple[Any, str, str, Any]] = [
            (GaugeMetricFamily, "score_persister_lag_seconds",
             "Age of the oldest accepted increment not yet committed to Postgres",
             lambda lag: lag.oldest_age_s),
            (GaugeMetricFamily, "score_persister_unpersisted_events",
             "Accepted increments waiting in Redis for the persister",
             lambda lag: lag.unpersisted),
            (GaugeMetricFamily, "score_persister_pending_events",
             "Increments read by a persister, not yet committed and acknowledged",
             lambda lag: lag.pending),
            (CounterMetricFamily, "score_persister_events_persisted",
             "Increments committed to Postgres (rate() of it is the throughput)",
             lambda lag: lag.persisted),
            (CounterMetricFamily, "score_persister_batches",
             "Batches committed to Postgres", lambda lag: lag.batches),
            (CounterMetricFamily, "score_persister_dead_letters",
             "Increments Postgres kept refusing, moved to the dead-letter stream",
             lambda lag: lag.dead_letters),
        ]  # fmt: skip
        for family, name, doc, value in families:
            metric = family(name, doc, labels=label)
            for lag in self.lags:
                metric.add_metric([str(lag.partition)], value(lag))
            yield metric


COLLECTOR = PersisterCollector()
REGISTRY.register(COLLECTOR)


async def refresh(ctx: Context) -> None:
    """Read every partition's lag for the scrape under way; none while Redis is down."""
    try:
        COLLECTOR.lags = await read_lags(ctx.reads, ctx.schema.all())
    except redis.RedisError:
        COLLECTOR.lags = []


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
