"""What the service needs from the persister, handed over by the CLI (see service.cli)."""

from __future__ import annotations

from typing import Any

from persister.jobs import FlushRequester
from persister.layout import ensure
from persister.rebuild import rebuild_if_missing
from service.settings import Settings


def rebuild_checked(settings: Settings) -> None:
    """The service's rebuild hook: check the partition layout against Postgres's record first
    (a wiped Redis gets it back from there; LayoutMismatch for another count), then rebuild
    unless Redis already holds the leaderboards."""
    ensure(settings)
    rebuild_if_missing(settings)


def hooks(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for service.app.create_app: `rebuild` and `request_flush`."""
    return {"rebuild": rebuild_checked, "request_flush": FlushRequester(settings)}
