"""The top-N: decoding top stream entries, merging partitions, ranking.

Equal scores share a rank (1 + the number of users with a strictly higher score) and are
listed by user_id ascending, in every partition and after the merge.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from service import streamids
from service.models import Entry, Leaderboard

Row = tuple[str, int]  # (user_id, score)


def rows_from_fields(fields: Sequence[bytes | str]) -> list[Row]:
    """Decode a flat [user_id, -score, ...] list (a top stream entry or ZRANGE WITHSCORES)."""
    rows: list[Row] = []
    for i in range(0, len(fields) - 1, 2):
        user, score = fields[i], fields[i + 1]
        user_id = user.decode() if isinstance(user, bytes) else user
        if user_id:  # an empty leaderboard is published as one empty field
            rows.append((user_id, -int(float(score))))
    return rows


def merge(parts: Iterable[list[Row]], limit: int) -> list[Row]:
    """The best `limit` rows of several partitions' top lists (exact: each is sorted)."""
    return list(heapq.merge(*parts, key=lambda r: (-r[1], r[0])))[:limit]


def ranked(rows: list[Row]) -> list[Entry]:
    """Competition ranking ("1224"): ties share the rank of the first of them."""
    entries: list[Entry] = []
    for i, (user_id, score) in enumerate(rows):
        rank = entries[-1].rank if entries and entries[-1].score == score else i + 1
        entries.append(Entry(rank=rank, user_id=user_id, score=score))
    return entries


def combined(versions: Iterable[str]) -> str:
    """One version for the partitions' top stream ids together: "<sum of ms>-<sum of seq>".

    Any partition's newer id makes it larger, read as a pair: a newer id has a larger ms (the
    first sum grows, whatever the second does) or the same ms and a larger seq (the first is
    unchanged, the second grows). So it only grows, whichever partition changed and whatever
    the clocks of the primaries that hold them, and every service process derives the same
    version from the same state. One partition: its stream id itself.
    """
    orders = [streamids.order(v) for v in versions]
    return f"{sum(ms for ms, _ in orders)}-{sum(seq for _, seq in orders)}"


def build(versions: Iterable[str], parts: Iterable[list[Row]], limit: int) -> Leaderboard:
    return Leaderboard(version=combined(versions), top=ranked(merge(parts, limit)))
