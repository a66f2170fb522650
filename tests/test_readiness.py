"""Readiness: while Redis is being rebuilt from Postgres the hot path answers 503 (never a 404
for a user who exists), and a Redis that loses its data while the service runs is noticed and
rebuilt by itself."""

from __future__ import annotations

import threading

from starlette.testclient import TestClient
from support import assert_problem

from persister.rebuild import rebuild_if_missing
from service.app import create_app
from service.dev.servers import wait_for
from service.keys import KeySchema
from service.settings import Settings


def test_503_while_rebuilding_then_ready_and_rebuilt_again_after_a_wipe(
    settings: Settings, r, add_users, token
) -> None:
    (alice,) = add_users(count=1)
    gate = threading.Event()
    rebuilds: list[int] = []

    def gated_rebuild(s: Settings) -> None:
        rebuilds.append(1)
        gate.wait(30)
        rebuild_if_missing(s)

    r.delete(*KeySchema(1).ready_markers)  # a Redis that must be rebuilt before serving
    body = {"user_id": alice, "score_increase": 3}
    headers = {"Authorization": f"Bearer {token(alice)}"}
    with TestClient(create_app(settings, rebuild=gated_rebuild)) as c:
        wait_for(lambda: bool(rebuilds), 10, "the rebuild to start")
        assert c.get("/readyz").status_code == 503
        assert_problem(c.post("/api/v1/score", json=body, headers=headers), 503, "not ready")
        assert_problem(c.get(f"/api/v1/users/{alice}"), 503, "not ready")
        gate.set()
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, "ready after the rebuild")
        assert c.post("/api/v1/score", json=body, headers=headers).json()["new_score"] == 3

        r.flushall()  # Redis loses everything while the service runs
        wait_for(lambda: len(rebuilds) == 2, 10, "the wipe to be noticed")
        wait_for(lambda: c.get("/readyz").status_code == 200, 30, "ready after the 2nd rebuild")
        # the user is back (provisioned in Postgres); the score waits for the persister
        assert c.get(f"/api/v1/users/{alice}").status_code == 200


def test_a_user_id_with_a_slash_can_be_read(client: TestClient, add_users) -> None:
    (user,) = add_users("clan/alice")
    resp = client.get("/api/v1/users/clan/alice")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"user_id": user, "score": 0, "rank": 1}
