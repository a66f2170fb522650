"""What anonymous clients are told when a store is down: that it is, not where it lives.

psycopg's error text names the database's host and port ("connection to server at ...,
port ... failed"). It once reached anyone through /readyz and GET /api/v1/users/{id} (as the
reason the service was not ready); it belongs in the service's log only.
"""

from __future__ import annotations

import logging

import pytest
import redis
from starlette.testclient import TestClient
from support import Servers, assert_problem, make_env

from persister.rebuild import rebuild_if_missing
from service.app import create_app
from service.dev.servers import free_port, wait_for
from service.keys import KeySchema
from service.settings import Settings


def test_a_failed_rebuild_shows_no_database_address(
    servers: Servers, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there: the rebuild's connection is refused
    env = make_env(servers, DATABASE_URL=f"postgresql://127.0.0.1:{port}/nowhere")
    r.delete(*KeySchema(1).ready_markers)  # Redis must be rebuilt from an unreachable Postgres
    caplog.set_level(logging.INFO)
    with TestClient(create_app(Settings.from_env(env), rebuild=rebuild_if_missing)) as c:
        wait_for(lambda: "rebuild failed" in c.get("/readyz").text, 30, "the failed rebuild")
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["detail"] == "rebuild failed: OperationalError"
        user = c.get("/api/v1/users/alice")
        assert_problem(user, 503, "rebuild failed: OperationalError")
        assert ready.json()["postgres"].startswith("down: ")  # its type only, as detail
        for resp in (ready, user):
            assert str(port) not in resp.text and "127.0.0.1" not in resp.text, resp.text
    # the operator still gets the whole story, in the log
    assert str(port) in caplog.text
