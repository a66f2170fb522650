"""The persister's two parsers of stream entries agree: `parse_raw` (the fast path for the
exact shape the Lua script writes) accepts and refuses exactly what `parse` does."""

from __future__ import annotations

import itertools
import uuid

from persister.events import Batch, Malformed, parse, parse_raw
from service.keys import KeySchema
from service.scripts import prepare_submit
from service.settings import Settings

EVENT_ID = str(uuid.uuid4()).encode()
VALUES: dict[bytes, list[bytes | None]] = {
    b"e": [EVENT_ID, EVENT_ID.upper(), b"{" + EVENT_ID + b"}", EVENT_ID.replace(b"-", b""),
           b"not-a-uuid", b""],
    b"u": [b"ann", b"", b"\xff", "é".encode()],
    b"d": [b"5", b"-3", b"0", b" 7", b"x", b"1_0", b"+2", b""],
    b"k": [None, b"o-1", b"", b"\xff"],
    b"t": [None, b"9", b"-1", b"x", b"0"],
}  # fmt: skip


def test_parse_raw_agrees_with_parse_on_good_and_bad_entries() -> None:
    checked = accepted = 0
    for e, u, d, k, t in itertools.product(*VALUES.values()):
        flat: list[bytes] = [b"e", e, b"u", u, b"d", d]  # type: ignore[list-item]
        if k is not None:
            flat += [b"k", k]
        if t is not None:
            flat += [b"t", t]
        for order in (flat, flat[2:4] + flat[:2] + flat[4:]):  # the Lua's order, and another
            entry = (b"1-2", dict(zip(order[::2], order[1::2], strict=True)))
            try:
                want = parse(entry)
            except Malformed:
                want = None
            batch = Batch()
            parse_raw([[b"1-2", order]], batch)
            got = batch.events[0] if batch.events else None
            assert got == want, order
            assert len(batch) == 1  # refused entries are counted too (dead-lettered)
            checked += 1
            accepted += want is not None
    assert accepted > 0 and checked - accepted > 0  # both sides of the line were exercised


def test_the_service_makes_unique_time_ordered_event_ids_the_fast_parser_takes() -> None:
    """Event ids are UUIDv7s, each new, in the order they were made (the ledger's primary
    key grows at its right edge), in the canonical form `parse_raw` reads directly."""
    settings = Settings(redis_url="redis://127.0.0.1:1/0", jwt_secret="s" * 40)
    ids = [str(prepare_submit(settings, KeySchema(1), "ann", 1).args[2]) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert {uuid.UUID(i).version for i in ids} == {7}
    batch = Batch()
    parse_raw(
        [(b"1-%d" % n, [b"e", i.encode(), b"u", b"ann", b"d", b"1"]) for n, i in enumerate(ids)],
        batch,
    )
    assert [e.event_id for e in batch.events] == ids
