"""An accepted increment as the persister reads it from a partition's events stream.

The Lua hot path appends `e <event id> u <user_id> d <delta>`, and, for a request made with an
Idempotency-Key, `k <the key> t <the new total>` (the ledger keeps them, so a rebuild can
restore the idempotency records). The event id is made by the service (a random UUID), so it
stays the same when a stream id does not (a Redis failover, a replay).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

StreamEntry = tuple[bytes, Mapping[bytes, bytes]]
"""One stream entry as redis-py returns it: (stream id, fields)."""


class Malformed(ValueError):
    """A stream entry that is not an event the hot path could have written."""


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted increment."""

    stream_id: str
    event_id: str
    user_id: str
    delta: int
    idempotency_key: str | None = None
    total: int | None = None
    """The user's total just after this increment: set when, and only when, it had a key."""

    def fields(self) -> dict[bytes, bytes]:
        """The stream entry's fields, as the hot path writes them."""
        fields = {
            b"e": self.event_id.encode(),
            b"u": self.user_id.encode(),
            b"d": str(self.delta).encode(),
        }
        if self.idempotency_key is not None:
            fields[b"k"] = self.idempotency_key.encode()
            fields[b"t"] = str(self.total).encode()
        return fields


def parse(entry: StreamEntry) -> Event:
    """The event in `entry`, or Malformed saying what is wrong with it."""
    raw_id, fields = entry
    stream_id = raw_id.decode()
    try:
        event_id = str(uuid.UUID(fields[b"e"].decode()))
        user_id = fields[b"u"].decode()
        delta = int(fields[b"d"])
        key = fields.get(b"k")
        idempotency_key = None if key is None else key.decode()
        total = None if key is None else int(fields[b"t"])
    except KeyError as exc:
        raise Malformed(f"entry {stream_id} has no field {exc.args[0]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"entry {stream_id}: {exc}") from None
    if not user_id or delta == 0:
        raise Malformed(f"entry {stream_id}: empty user id or zero delta")
    if key is None and b"t" in fields:
        raise Malformed(f"entry {stream_id}: a total without an idempotency key")
    if idempotency_key == "" or (total is not None and total < 0):
        raise Malformed(f"entry {stream_id}: empty idempotency key or negative total")
    return Event(stream_id, event_id, user_id, delta, idempotency_key, total)


def parse_all(entries: Iterable[StreamEntry]) -> tuple[list[Event], list[tuple[StreamEntry, str]]]:
    """The well-formed events of `entries`, and the others with the reason each was refused."""
    events: list[Event] = []
    malformed: list[tuple[StreamEntry, str]] = []
    for entry in entries:
        try:
            events.append(parse(entry))
        except Malformed as exc:
            malformed.append((entry, str(exc)))
    return events, malformed


def stream_key(stream_id: str) -> tuple[int, int]:
    """A stream id as a sortable (milliseconds, sequence) pair."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(stream_id: str) -> str:
    """The smallest stream id greater than `stream_id`."""
    ms, seq = stream_key(stream_id)
    return f"{ms}-{seq + 1}"
