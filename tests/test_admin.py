"""The admin API: provisioning users and batch score adjustments, with an admin token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest
import redis
from persist_support import keyed_rows, pg_scores, redis_totals
from starlette.testclient import TestClient
from support import assert_problem

from persister.flush import Persister
from persister.rebuild import rebuild
from service.app import create_app
from service.dev.servers import wait_for
from service.keys import KeySchema
from service.settings import Settings

USERS = "/api/v1/admin/users"
SCORES = "/api/v1/admin/scores"


@pytest.fixture
def flushes() -> list[int]:
    return []


@pytest.fixture
def admin_client(settings: Settings, r: redis.Redis, flushes: list[int]) -> Iterator[TestClient]:
    """The app in-process, recording its flush requests."""
    app = create_app(settings, request_flush=flushes.append)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        yield c


@pytest.fixture
def admin(token: Callable[..., str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token('operator', admin=True)}"}


def test_provisioning_users_is_idempotent(
    admin_client: TestClient, admin: dict[str, str], r: redis.Redis, pg: psycopg.Connection
) -> None:
    first = admin_client.post(USERS, json={"user_ids": ["ann", "ben", "ann"]}, headers=admin)
    assert first.status_code == 200, first.text
    assert first.json() == {"created": 2, "existing": 0}
    again = admin_client.post(USERS, json={"user_ids": ["ben", "cat"]}, headers=admin)
    assert again.json() == {"created": 1, "existing": 1}

    assert pg_scores(pg, ["ann", "ben", "cat"]) == {"ann": 0, "ben": 0, "cat": 0}
    assert admin_client.get("/api/v1/users/cat").json()["score"] == 0


@pytest.mark.parametrize(
    ("headers", "status", "words"),
    [
        ({}, 401, ["Authorization"]),
        ({"Authorization": "Bearer not-a-jwt"}, 401, ["JWT"]),
        (None, 403, ["score:admin"]),  # a valid token without the admin scope
    ],
)
def test_the_admin_api_needs_an_admin_token(
    admin_client: TestClient,
    token: Callable[..., str],
    snapshot: Callable[[], object],
    headers: dict[str, str] | None,
    status: int,
    words: list[str],
) -> None:
    if headers is None:
        headers = {"Authorization": f"Bearer {token('operator')}"}
    before = snapshot()
    for path, body in [
        (USERS, {"user_ids": ["ann"]}),
        (SCORES, {"adjustments": [{"user_id": "ann", "delta": 1, "idempotency_key": "k"}]}),
    ]:
        assert_problem(admin_client.post(path, json=body, headers=headers), status, *words)
    assert snapshot() == before


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (USERS, {"user_ids": []}, ["user_ids"]),
        (USERS, {"user_ids": ["ok", "bad\nid"]}, ["user_ids[1]"]),
        (USERS, {"users": ["ann"]}, ["users"]),
        (SCORES, {"adjustments": [{"user_id": "a", "delta": 1}]}, ["idempotency_key"]),
        (SCORES, {"adjustments": [
            {"user_id": "a", "delta": 5, "idempotency_key": "k1"},
            {"user_id": "a", "delta": 0, "idempotency_key": "k2"},
        ]}, ["adjustments[1].delta"]),
        (SCORES, {"adjustments": [
            {"user_id": "a", "delta": 5, "idempotency_key": "k1"},
            {"user_id": "a", "delta": 5, "idempotency_key": "has space"},
        ]}, ["adjustments[1].idempotency_key"]),
    ],
)  # fmt: skip
def test_a_bad_body_is_refused_whole(
    admin_client: TestClient,
    admin: dict[str, str],
    add_users,
    snapshot: Callable[[], object],
    path: str,
    body: dict[str, object],
    words: list[str],
) -> None:
    add_users("a")
    before = snapshot()
    assert_problem(admin_client.post(path, json=body, headers=admin), 400, *words)
    assert snapshot() == before


def test_adjustments_apply_one_by_one_with_per_item_results(
    admin_client: TestClient,
    admin: dict[str, str],
    add_users,
    r: redis.Redis,
    pg: psycopg.Connection,
    settings: Settings,
    flushes: list[int],
) -> None:
    add_users("ann", "ben")
    batch = [
        {"user_id": "ann", "delta": 50, "idempotency_key": "fix-1"},
        {"user_id": "ann", "delta": -20, "idempotency_key": "fix-2"},
        {"user_id": "ben", "delta": 7, "idempotency_key": "fix-1"},  # keys are per user
        {"user_id": "ghost", "delta": 1, "idempotency_key": "fix-3"},
        {"user_id": "ben", "delta": -8, "idempotency_key": "fix-4"},  # below zero
        {"user_id": "ann", "delta": 50, "idempotency_key": "fix-1"},  # the same item again
        {"user_id": "ann", "delta": 51, "idempotency_key": "fix-1"},  # reused with a change
    ]
    reply = admin_client.post(SCORES, json={"adjustments": batch}, headers=admin)

    assert reply.status_code == 200, reply.text
    results = [(x["status"], x["new_score"]) for x in reply.json()["results"]]
    assert results == [
        ("applied", 50), ("applied", 30), ("applied", 7), ("unknown_user", None),
        ("out_of_range", None), ("replayed", 50), ("conflict", None),
    ]  # fmt: skip
    assert flushes == [0]  # through the hot path's flush request

    again = admin_client.post(SCORES, json={"adjustments": batch[:3]}, headers=admin)
    assert [x["status"] for x in again.json()["results"]] == ["replayed"] * 3
    assert redis_totals(settings, r, ["ann", "ben"]) == {"ann": 30, "ben": 7}

    # the same events stream as the hot path: the persister takes them to Postgres
    persister = Persister(settings)
    try:
        persister.drain(0)
    finally:
        persister.close()
    assert pg_scores(pg, ["ann", "ben"]) == {"ann": 30, "ben": 7}
    assert sorted(keyed_rows(pg, ["ann", "ben"])) == [  # each with its key and its new total
        ("ann", "operator fix-1", 50, 50),  # an operator's key, kept apart from the player's
        ("ann", "operator fix-2", -20, 30),
        ("ben", "operator fix-1", 7, 7),
    ]
    assert r.xlen(KeySchema(1).all()[0].events) == 0


def test_an_operator_adjustment_is_not_capped_by_the_players_maximum(
    admin_client: TestClient, admin: dict[str, str], settings: Settings, r: redis.Redis
) -> None:
    admin_client.post(USERS, json={"user_ids": ["ann"]}, headers=admin)
    big = settings.max_increase * 3
    items = [
        {"user_id": "ann", "delta": big, "idempotency_key": "up"},
        {"user_id": "ann", "delta": -(big - 1), "idempotency_key": "down"},
    ]
    resp = admin_client.post(SCORES, json={"adjustments": items}, headers=admin)
    assert resp.status_code == 200, resp.text
    assert [(x["status"], x["new_score"]) for x in resp.json()["results"]] == [
        ("applied", big),
        ("applied", 1),
    ]
    assert redis_totals(settings, r, ["ann"]) == {"ann": 1}


def test_a_players_key_cannot_block_an_operators_adjustment_even_after_a_rebuild(
    admin_client: TestClient,
    admin: dict[str, str],
    add_users,
    token,
    r: redis.Redis,
    pg: psycopg.Connection,
    settings: Settings,
) -> None:
    """A player who uses an operator's adjustment key first (guessed: `penalty-2026-11`) gets
    an ordinary increment; the operator's -500 with that key is still applied, and each replay
    returns its own first result, also after Redis is wiped and rebuilt from the ledger."""
    add_users("mallory", "rival")
    key = "penalty-2026-11"
    player = {"Authorization": f"Bearer {token('mallory')}", "Idempotency-Key": key}
    increment = {"user_id": "mallory", "score_increase": 600}
    adjustment = {"adjustments": [{"user_id": "mallory", "delta": -500, "idempotency_key": key}]}

    def play() -> dict[str, object]:
        resp = admin_client.post("/api/v1/score", json=increment, headers=player)
        assert resp.status_code == 200, resp.text
        return {**resp.json(), "replayed": resp.headers.get("idempotent-replayed")}

    def adjust() -> tuple[str, int]:
        resp = admin_client.post(SCORES, json=adjustment, headers=admin)
        assert resp.status_code == 200, resp.text
        (result,) = resp.json()["results"]
        return result["status"], result["new_score"]

    assert play() == {"message": "Score updated successfully.", "user_id": "mallory",
                      "new_score": 600, "rank": 1, "replayed": None}  # fmt: skip
    rival = admin_client.post(  # rival passes mallory: a replay still says rank 1
        "/api/v1/score",
        json={"user_id": "rival", "score_increase": 700},
        headers={"Authorization": f"Bearer {token('rival')}"},
    )
    assert rival.json()["rank"] == 1
    assert adjust() == ("applied", 100)  # not a conflict: the operator's key is its own
    assert play()["new_score"] == 600 and play()["rank"] == 1 and play()["replayed"] == "true"
    assert adjust() == ("replayed", 100)
    assert redis_totals(settings, r, ["mallory"]) == {"mallory": 100}

    persister = Persister(settings)
    try:
        persister.drain(0)
    finally:
        persister.close()
    assert keyed_rows(pg, ["mallory"]) == [
        ("mallory", key, 600, 600),
        ("mallory", "operator " + key, -500, 100),
    ]
    r.flushall()
    done = rebuild(settings, force=True)
    assert done is not None and done.records == 2  # each into its own namespace
    wait_for(lambda: admin_client.get("/readyz").status_code == 200, 10, "ready again")

    replay = play()  # the first total; the first rank was kept in Redis only: none, not today's
    assert (replay["new_score"], replay["replayed"], "rank" in replay) == (600, "true", False)
    assert adjust() == ("replayed", 100)
    assert redis_totals(settings, r, ["mallory"]) == {"mallory": 100}
    assert r.xlen(KeySchema(1).all()[0].events) == 0  # nothing applied again
    assert pg_scores(pg, ["mallory"]) == {"mallory": 100}
