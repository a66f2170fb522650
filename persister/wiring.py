"""What the service needs from the persister, handed over by the CLI (see service.cli)."""

from __future__ import annotations

from typing import Any

from persister.jobs import FlushRequester
from persister.rebuild import rebuild_if_missing
from service.settings import Settings


def hooks(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for service.app.create_app: `rebuild` and `request_flush`."""
    return {"rebuild": rebuild_if_missing, "request_flush": FlushRequester(settings)}
