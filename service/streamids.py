"""Redis stream ids (`<milliseconds>-<sequence>`): a top stream's ids are the leaderboard's
versions, an events stream's ids order the increments. They compare as pairs of numbers,
never as text ("10-0" comes after "9-0")."""

from __future__ import annotations

ZERO = "0-0"
"""The smallest id: an empty stream's last one, and the version of a partition that never
published its top-N."""

Order = tuple[int, int]
"""A stream id as a comparable (milliseconds, sequence) pair."""


def order(stream_id: str | bytes) -> Order:
    """`stream_id` as a comparable pair (a bare `<ms>` has sequence 0); ValueError for
    anything else."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def parse(text: str) -> Order | None:
    """`text` as a comparable pair if it is a whole id (`<ms>-<seq>`, ASCII digits), else
    None: for ids that come from clients (SSE's Last-Event-ID)."""
    ms, sep, seq = text.partition("-")
    if not (sep and ms.isascii() and ms.isdigit() and seq.isascii() and seq.isdigit()):
        return None
    return int(ms), int(seq)


def millis(stream_id: str | bytes) -> int:
    """When the entry was added, in milliseconds on Redis's clock."""
    return order(stream_id)[0]
