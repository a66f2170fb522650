"""Test-only fault points: SCORE_PERSIST_FAULT=pause-before-commit or pause-after-commit.

The fault tests kill -9 a worker at exact moments of a flush: with the batch applied but not
committed, and with it committed but not acknowledged in Redis. At the named point the worker
logs `fault point <name> reached` and waits until it is killed. Never set it in production: a
worker that reaches the point stops persisting.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

ENV = "SCORE_PERSIST_FAULT"
_ARMED = os.environ.get(ENV, "")


def point(name: str) -> None:
    """Wait here forever if SCORE_PERSIST_FAULT is `pause-<name>`; otherwise return at once."""
    if f"pause-{name}" == _ARMED:
        log.critical("fault point %s reached (%s); waiting to be killed", name, ENV)
        sys.stderr.flush()
        threading.Event().wait()
