"""The increments Redis has accepted and Postgres has not committed yet.

Rebuild and reconcile compare Redis with Postgres *plus* these: an increment is in Redis's
total the moment it is accepted, and in Postgres's only once the persister has committed it.
Read them with the persister paused (every flush lock held): then nothing is committed or
acknowledged meanwhile, and the stream only grows at its end.

An entry is unpersisted when it is undelivered (after the group's last-delivered id) or
pending (delivered, not acknowledged) and its event id is not in the ledger: a persister
killed between COMMIT and XACK leaves committed entries pending. An acknowledged entry is
in the ledger, or was dead-lettered: either way it is not waiting any more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import redis

from persister.events import Event, StreamEntry, parse_all
from service.keys import PERSISTER_GROUP, PartitionKeys
from service.streamids import ZERO, order

PAGE = 10_000

KeepAlive = Callable[[], None]
"""Renews the persister's pause (raises if it was lost)."""


@dataclass
class Unpersisted:
    """One partition's unpersisted increments, up to the stream id `last_id`."""

    keys: PartitionKeys
    last_id: str = ZERO
    deltas: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    count: int = 0
    keyed: list[Event] = field(default_factory=list)
    """Those made with an Idempotency-Key (a rebuild restores their records)."""

    def add(self, events: list[Event]) -> None:
        for event in events:
            self.deltas[event.user_id] += event.delta
            if event.idempotency_key is not None:
                self.keyed.append(event)
        self.count += len(events)

    def advance(self, client: redis.Redis, to_id: str, keep_alive: KeepAlive) -> None:
        """Add the entries appended after `last_id`, up to `to_id`: all are undelivered, since
        the persister is paused."""
        if order(to_id) <= order(self.last_id):
            return
        for page in _pages(client, self.keys.events, "(" + self.last_id, to_id):
            self.add(parse_all(page)[0])
            keep_alive()
        self.last_id = to_id


def last_entry_id(reply: Any) -> str:
    """The id in an `XREVRANGE events + - COUNT 1` reply ("0-0" for an empty stream)."""
    return str(reply[0][0].decode()) if reply else ZERO


def read_unpersisted(
    client: redis.Redis,
    conn: psycopg.Connection[tuple[object, ...]],
    keys: PartitionKeys,
    keep_alive: KeepAlive,
    *,
    up_to: str | None = None,
) -> Unpersisted:
    """The partition's unpersisted increments now, up to the stream id `up_to` (default: the
    stream's last). The persister must be paused; `keep_alive` renews the pause between pages
    (a backlog can be long)."""
    pipe = client.pipeline(transaction=True)
    pipe.xrevrange(keys.events, "+", "-", 1)
    pipe.xinfo_groups(keys.events)
    pipe.xpending(keys.events, PERSISTER_GROUP)
    last, groups, summary = pipe.execute(raise_on_error=False)
    result = Unpersisted(keys, up_to or last_entry_id(last))
    if result.last_id == ZERO:
        return result
    group = None
    if not isinstance(groups, Exception):
        group = next((g for g in groups if g["name"].decode() == PERSISTER_GROUP), None)
    delivered = ZERO if group is None else group["last-delivered-id"].decode()
    pending: set[str] = set()
    if group is not None and summary["pending"]:
        pending = _pending_ids(client, keys)
    start = min(pending, key=order) if pending else "(" + delivered
    candidates: list[Event] = []
    for page in _pages(client, keys.events, start, result.last_id):
        for event in parse_all(page)[0]:
            if event.stream_id in pending or order(event.stream_id) > order(delivered):
                candidates.append(event)
        keep_alive()
    result.add(_not_in_ledger(conn, candidates))
    return result


def _pending_ids(client: redis.Redis, keys: PartitionKeys) -> set[str]:
    ids: set[str] = set()
    start = "-"
    while True:
        rows = client.xpending_range(keys.events, PERSISTER_GROUP, start, "+", PAGE)
        ids.update(cast(bytes, row["message_id"]).decode() for row in rows)
        if len(rows) < PAGE:
            return ids
        start = "(" + cast(bytes, rows[-1]["message_id"]).decode()


def _pages(client: redis.Redis, stream: str, start: str, end: str) -> Iterator[list[StreamEntry]]:
    while True:
        page: Any = client.xrange(stream, start, end, PAGE)
        if page:
            yield page
        if len(page) < PAGE:
            return
        start = "(" + page[-1][0].decode()


def _not_in_ledger(
    conn: psycopg.Connection[tuple[object, ...]], events: list[Event]
) -> list[Event]:
    """`events` without those Postgres has already committed."""
    committed: set[str] = set()
    for i in range(0, len(events), PAGE):
        ids = [e.event_id for e in events[i : i + PAGE]]
        rows = conn.execute(
            "SELECT event_id::text FROM score_events WHERE event_id = ANY(%s::uuid[])", (ids,)
        ).fetchall()
        committed.update(str(row[0]) for row in rows)
    return [e for e in events if e.event_id not in committed]
