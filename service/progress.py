"""Progress of long operator commands (rebuild, reconcile, users import, ledger prune).

The work reports what it did through a `Progress` callback: `progress("users filled", 10_000)`.
A `Meter` shows it on stderr when stderr is a terminal: one line, rewritten in place at most
every REFRESH_S, with each count, the rate and (when the total is known) the time left.
Anywhere else (a pipe, a log file, cron) it writes nothing: the command's own final summary
line, always printed, is the record.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

REFRESH_S = 0.2


class Progress(Protocol):
    """What long work reports as it goes."""

    def __call__(self, what: str, n: int) -> None:
        """`n` more of `what` are done."""

    def expect(self, what: str, total: int) -> None:
        """`total` of `what` are to be done."""


class _Silent:
    def __call__(self, what: str, n: int) -> None:
        pass

    def expect(self, what: str, total: int) -> None:
        pass


no_progress: Progress = _Silent()
"""A Progress that shows nothing."""


class Meter:
    """A Progress that draws one line on a terminal; `close()` erases it."""

    def __init__(self, title: str, stream: TextIO | None = None) -> None:
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.counts: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self._began: dict[str, float] = {}
        self._shown = 0.0

    def expect(self, what: str, total: int) -> None:
        """`total` of `what` are to be done: the line shows the time left."""
        self.totals[what] = total

    def __call__(self, what: str, n: int) -> None:
        now = time.monotonic()
        self._began.setdefault(what, now)
        self.counts[what] = self.counts.get(what, 0) + n
        if self.live and now - self._shown >= REFRESH_S:
            self._shown = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The progress line: each count, its rate, and the time left when known."""
        parts = []
        for what, count in self.counts.items():
            rate = count / max(now - self._began[what], 1e-3)
            part = f"{what} {count:,}"
            total = self.totals.get(what)
            if total:
                left = max(total - count, 0) / rate if rate else 0.0
                part += f"/{total:,} ({rate:,.0f}/s, {left:.0f}s left)"
            else:
                part += f" ({rate:,.0f}/s)"
            parts.append(part)
        return f"{self.title}: " + ", ".join(parts)

    def close(self) -> None:
        """Erase the line (the command prints its summary next)."""
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rate(count: int, seconds: float) -> str:
    """`count` per second, for a summary line."""
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"
