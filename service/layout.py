"""The partition layout: how users map to partitions, recorded once per deployment.

A user's partition is `crc32(user_id) % partitions` and every key carries its partition's hash
tag (service.keys): a process that runs with another SCORE_PARTITIONS than the data was written
with looks users up in the wrong partition (404 for users who exist) and, in a rolling deploy,
splits one user's increments over two partitions. So the layout is recorded in Postgres and in
Redis (`score:layout`, see persister.layout), every partition-aware process compares it with its
own, and only `score-service partitions set N` changes it.

`version` names the key scheme (service.keys.KEY_SCHEME); a process refuses a layout of
another scheme like another count, and `partitions set N` moves the keys to the current one.
"""

from __future__ import annotations

import msgspec

from service.keys import KEY_SCHEME, KeySchema, PartitionKeys
from service.settings import ConfigError, Settings

LAYOUT_VERSION = KEY_SCHEME
CHANGE_COMMAND = "score-service partitions set"


class Layout(msgspec.Struct, frozen=True, omit_defaults=True):
    """A deployment's layout, as recorded."""

    partitions: int
    version: int = LAYOUT_VERSION
    changing_from: int | None = None
    """Set while `partitions set` moves the data to `partitions`: the partitions of the layout
    before (this count, of key scheme `changing_from_version`) may still hold keys."""
    changing_from_version: int | None = None
    """The key scheme of the layout before (absent: 1, as recorded before it was kept)."""

    @property
    def changing(self) -> bool:
        return self.changing_from is not None

    def schema(self) -> KeySchema:
        return KeySchema(self.partitions, self.version)

    def holding(self) -> list[PartitionKeys]:
        """Every partition that may hold keys under this layout: its own, and while it is
        being changed, those of the layout before."""
        parts = self.schema().all()
        if self.changing_from is not None:
            before = KeySchema(self.changing_from, self.changing_from_version or 1)
            tags = {p.tag for p in parts}
            parts += [p for p in before.all() if p.tag not in tags]
        return parts

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
        layout = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise LayoutMismatch(
            f"the recorded partition layout {raw!r} is unreadable by this version: {exc}"
        ) from None
    return normalized(layout)


def normalized(layout: Layout) -> Layout:
    """`layout`, as of the current key scheme when its keys are the same in both: one
    partition is `{p0}` in every scheme."""
    if layout.version == 1 and layout.partitions == 1 and not layout.changing:
        return Layout(1)
    return layout


def problem(recorded: Layout | None, settings: Settings) -> str | None:
    """Why a process configured with `settings` must not use the partitions of a deployment
    that records `recorded`; None when it may (or when nothing is recorded yet)."""
    if recorded is None:
        return None
    if recorded.changing:
        return f"the partition layout is {recorded.describe()}"
    if recorded.partitions == settings.partitions and recorded.version != LAYOUT_VERSION:
        return (
            f"this deployment's keys are of key scheme version {recorded.version}, this "
            f"version uses {LAYOUT_VERSION}: move them with `{CHANGE_COMMAND} "
            f"{settings.partitions}` (drains, moves and rebuilds while the services run)"
        )
    if recorded != layout_of(settings):
        return (
            f"SCORE_PARTITIONS is {settings.partitions} but this deployment has "
            f"{recorded.describe()}: run with SCORE_PARTITIONS={recorded.partitions}, or change "
            f"the layout with `{CHANGE_COMMAND} {settings.partitions}`"
        )
    return None
