"""schemathesis hooks for tests/test_openapi_fuzz.py (loaded by `schemathesis run` through
SCHEMATHESIS_HOOKS): a token that lets each request through authentication, so the fuzzer
reaches what lies behind it."""

from __future__ import annotations

from typing import Any

import schemathesis

from service.auth import mint
from service.settings import Settings

SETTINGS = Settings.from_env()  # the service's own environment: the same key


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: Any) -> None:
    """An admin's token for the admin API, the body's own user's for a score update."""
    if case.path.startswith("/api/v1/admin/"):
        token = mint(SETTINGS, "operator", admin=True)
    elif case.path == "/api/v1/score":
        body = case.body if isinstance(case.body, dict) else {}
        user_id = body.get("user_id")
        token = mint(SETTINGS, user_id if isinstance(user_id, str) and user_id else "player-1")
    else:
        return
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
