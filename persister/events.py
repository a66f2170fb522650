"""An accepted increment as the persister reads it from a partition's events stream.

The Lua hot path appends `e <event id> u <user_id> d <delta>`, and, for a request made with an
Idempotency-Key, `k <the key> t <the new total>` (the ledger keeps them, so a rebuild can
restore the idempotency records; the key is in its stored form, an operator's prefixed:
`service.keys.stored_idempotency_key`). The event id is made by the service (a UUIDv7), so it
stays the same when a stream id does not (a Redis failover, a replay).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

StreamEntry = tuple[bytes, Mapping[bytes, bytes]]
"""One stream entry as redis-py returns it: (stream id, fields)."""
RawEntry = Sequence[Any]
"""One stream entry as Redis sends it, unparsed: [stream id, [field, value, field, value...]]."""

_CANONICAL_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""A UUID exactly as `str(uuid.UUID(...))` writes it: the form the service makes."""


class Malformed(ValueError):
    """A stream entry that is not an event the hot path could have written."""


class Event(NamedTuple):
    """One accepted increment. A tuple (cheap to make by the thousand), its fields in the
    order of the Postgres statement's columns: `zip(*events)` gives the columns."""

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


@dataclass
class Batch:
    """Entries read for one Postgres transaction, parsed."""

    events: list[Event] = field(default_factory=list)
    malformed: list[tuple[StreamEntry, str]] = field(default_factory=list)
    reclaimed: set[str] = field(default_factory=set)
    """Stream ids of the entries reclaimed (XAUTOCLAIM): they may have a failure record."""

    def __len__(self) -> int:
        return len(self.events) + len(self.malformed)

    def stream_ids(self) -> set[str]:
        """The stream ids of every entry in the batch."""
        return {e.stream_id for e in self.events} | {e[0].decode() for e, _ in self.malformed}


def parse_raw(entries: Iterable[RawEntry], batch: Batch) -> None:
    """Add the entries of an unparsed XREADGROUP/XAUTOCLAIM reply to `batch`.

    The persister reads thousands of entries per batch: building a dict per entry (as redis-py
    does) and a UUID object per event id cost more than the rest of the batch's Python work.
    An entry of the exact shape the hot path writes is read straight from its list; any other
    goes through `parse`, which accepts or refuses it (and says why) as it always has.
    """
    for raw_id, flat in entries:
        event = _usual(raw_id, flat)
        if event is None:
            entry: StreamEntry = (raw_id, dict(zip(flat[::2], flat[1::2], strict=False)))
            try:
                event = parse(entry)
            except Malformed as exc:
                batch.malformed.append((entry, str(exc)))
                continue
        batch.events.append(event)


def _usual(raw_id: bytes, flat: Sequence[bytes]) -> Event | None:
    """The event of an entry `e <uuid> u <user> d <delta> [k <key> t <total>]` that `parse`
    would accept, with the values `parse` would give; None for anything else."""
    keyed = len(flat) == 10 and flat[6] == b"k" and flat[8] == b"t"
    if not (keyed or len(flat) == 6) or flat[0] != b"e" or flat[2] != b"u" or flat[4] != b"d":
        return None
    if not _CANONICAL_UUID.fullmatch(flat[1]):
        return None  # `parse` also takes other spellings, and writes them this way
    try:  # the same conversions as `parse` (UnicodeDecodeError is a ValueError)
        user_id = flat[3].decode()
        delta = int(flat[5])
        key = flat[7].decode() if keyed else None
        total = int(flat[9]) if keyed else None
    except ValueError:
        return None
    if not user_id or not delta or key == "" or (total is not None and total < 0):
        return None
    return Event(raw_id.decode(), flat[1].decode(), user_id, delta, key, total)
