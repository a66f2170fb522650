"""An accepted increment as the persister reads it from a partition's events stream.

The Lua hot path appends `e <event id> u <user_id> d <delta>`; the event id is made by the
service (a UUID), so it stays the same when a stream id does not (a Redis failover, a replay).
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
    stream_id: str
    event_id: str
    user_id: str
    delta: int


def parse(entry: StreamEntry) -> Event:
    """The event in `entry`, or Malformed saying what is wrong with it."""
    raw_id, fields = entry
    stream_id = raw_id.decode()
    try:
        event_id = str(uuid.UUID(fields[b"e"].decode()))
        user_id = fields[b"u"].decode()
        delta = int(fields[b"d"])
    except KeyError as exc:
        raise Malformed(f"entry {stream_id} has no field {exc.args[0]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"entry {stream_id}: {exc}") from None
    if not user_id or delta == 0:
        raise Malformed(f"entry {stream_id}: empty user id or zero delta")
    return Event(stream_id, event_id, user_id, delta)


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
