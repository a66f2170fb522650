"""The partition layout: how users map to partitions, recorded once per deployment.

A user's partition is `crc32(user_id) % partitions` and every key carries its partition's hash
tag (service.keys): a process that runs with another SCORE_PARTITIONS than the data was written
with looks users up in the wrong partition (404 for users who exist) and, in a rolling deploy,
splits one user's increments over two partitions. So the layout is recorded in Postgres and in
Redis (`score:layout`, see persister.layout), every partition-aware process compares it with its
own, and only `score-service partitions set N` changes it.

`version` names the key scheme (1: hash tags `{pN}`, crc32 modulo the count); a future scheme
gets a new number, and a process that does not know it refuses it like another count.
"""

from __future__ import annotations

import msgspec

from service.settings import ConfigError, Settings

LAYOUT_VERSION = 1
CHANGE_COMMAND = "score-service partitions set"


class Layout(msgspec.Struct, frozen=True, omit_defaults=True):
    """A deployment's layout, as recorded."""

    partitions: int
    version: int = LAYOUT_VERSION
    changing_from: int | None = None
    """Set while `partitions set` moves the data to `partitions`: every partition below this
    count may still hold keys of the layout before."""

    @property
    def changing(self) -> bool:
        return self.changing_from is not None

    def describe(self) -> str:
        if self.changing_from is not None:
            return (
                f"being changed to {self.partitions} partition(s) "
                f"(`{CHANGE_COMMAND} {self.partitions}` is running, or resumes it)"
            )
        return f"{self.partitions} partition(s)" + (
            f" (key scheme version {self.version})" if self.version != LAYOUT_VERSION else ""
        )


class LayoutMismatch(ConfigError):
    """This process's SCORE_PARTITIONS is not the deployment's recorded layout."""


_decoder = msgspec.json.Decoder(Layout)
_encoder = msgspec.json.Encoder()


def layout_of(settings: Settings) -> Layout:
    """The layout a process configured with `settings` uses."""
    return Layout(settings.partitions)


def encode(layout: Layout) -> bytes:
    return _encoder.encode(layout)


def decode(raw: bytes | str) -> Layout:
    """The layout in a record; LayoutMismatch for one this version cannot read."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise LayoutMismatch(
            f"the recorded partition layout {raw!r} is unreadable by this version: {exc}"
        ) from None


def problem(recorded: Layout | None, settings: Settings) -> str | None:
    """Why a process configured with `settings` must not use the partitions of a deployment
    that records `recorded`; None when it may (or when nothing is recorded yet)."""
    if recorded is None:
        return None
    if recorded.changing:
        return f"the partition layout is {recorded.describe()}"
    if recorded != layout_of(settings):
        return (
            f"SCORE_PARTITIONS is {settings.partitions} but this deployment has "
            f"{recorded.describe()}: run with SCORE_PARTITIONS={recorded.partitions}, or change "
            f"the layout with `{CHANGE_COMMAND} {settings.partitions}`"
        )
    return None
