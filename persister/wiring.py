"""What the service needs from the persister, handed over by the CLI (see service.cli)."""

from __future__ import annotations

from typing import Any


def hooks() -> dict[str, Any]:
    """Keyword arguments for service.app.create_app: `rebuild` and `request_flush`."""
    return {}
