"""The public reads and the ops endpoints: GET /api/v1/leaderboard, GET /api/v1/users/{id},
/healthz and /readyz. Ties: equal scores share a rank and are listed by user_id ascending."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from starlette.testclient import TestClient
from support import SECRET, Servers, assert_problem, make_env

from service.app import create_app
from service.auth import mint
from service.dev.servers import free_port, wait_for
from service.keys import KeySchema
from service.settings import Settings
from service.streamids import order
from service.users import provision_sync

TOKENS = Settings.from_env({"SCORE_JWT_SECRET": SECRET})


def score(client: TestClient, user: str, increase: int) -> None:
    resp = client.post(
        "/api/v1/score",
        json={"user_id": user, "score_increase": increase},
        headers={"Authorization": f"Bearer {mint(TOKENS, user)}"},
    )
    assert resp.status_code == 200, resp.text


@contextmanager
def app_client(servers: Servers, **overrides: str) -> Iterator[TestClient]:
    settings = Settings.from_env(make_env(servers, **overrides))
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        yield c


def test_empty_leaderboard(client) -> None:
    resp = client.get("/api/v1/leaderboard")
    assert resp.status_code == 200
    body = resp.json()
    assert body["top"] == []
    assert isinstance(body["version"], str)


def test_ties_share_a_rank_and_are_listed_by_user_id(client, add_users) -> None:
    # "Zed" < "alice" < "bob" in code point order (upper case first), as in Redis
    add_users("bob", "alice", "Zed", "carol", "dave")
    for user, increase in [("bob", 50), ("alice", 50), ("Zed", 50), ("carol", 30), ("dave", 10)]:
        score(client, user, increase)
    top = client.get("/api/v1/leaderboard").json()["top"]
    assert top == [
        {"rank": 1, "user_id": "Zed", "score": 50},
        {"rank": 1, "user_id": "alice", "score": 50},
        {"rank": 1, "user_id": "bob", "score": 50},
        {"rank": 4, "user_id": "carol", "score": 30},
        {"rank": 5, "user_id": "dave", "score": 10},
    ]
    assert client.get("/api/v1/users/bob").json() == {"user_id": "bob", "score": 50, "rank": 1}
    assert client.get("/api/v1/users/carol").json()["rank"] == 4
    assert client.get("/api/v1/users/dave").json()["rank"] == 5


def test_limit_and_versions_that_grow(client, add_users) -> None:
    users = add_users(count=4)
    for i, user in enumerate(users):
        score(client, user, 10 * (i + 1))
    first = client.get("/api/v1/leaderboard", params={"limit": 2}).json()
    assert [e["user_id"] for e in first["top"]] == [users[3], users[2]]
    score(client, users[0], 100)
    second = client.get("/api/v1/leaderboard", params={"limit": 2}).json()
    assert [e["user_id"] for e in second["top"]] == [users[0], users[3]]
    ms1, seq1 = order(first["version"])
    ms2, seq2 = order(second["version"])
    assert (ms2, seq2) > (ms1, seq1)


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "11", "²", "9" * 30, "", "1.5"])
def test_bad_limit_is_400(client, snapshot, limit: str) -> None:
    before = snapshot()
    assert_problem(client.get("/api/v1/leaderboard", params={"limit": limit}), 400, "limit")
    assert snapshot() == before


def test_new_users_start_at_zero_sharing_the_last_rank(client, add_users) -> None:
    alice, bob, carol = sorted(add_users(count=3))
    score(client, carol, 1)
    assert client.get(f"/api/v1/users/{carol}").json() == {"user_id": carol, "score": 1, "rank": 1}
    assert client.get(f"/api/v1/users/{alice}").json()["rank"] == 2
    assert client.get(f"/api/v1/users/{bob}").json()["rank"] == 2


def test_unknown_user_is_404(client, snapshot) -> None:
    before = snapshot()
    assert_problem(client.get("/api/v1/users/ghost"), 404, "ghost")
    assert snapshot() == before


@pytest.mark.parametrize(
    "path", ["/api/v1/users/a%01b", "/api/v1/users/" + "x" * 129, "/api/v1/users/%7F"]
)
def test_invalid_user_id_is_400(client, snapshot, path: str) -> None:
    before = snapshot()
    assert_problem(client.get(path), 400, "user_id")
    assert snapshot() == before


def test_invalid_utf8_in_the_path_is_a_client_error(client) -> None:
    resp = client.get("/api/v1/users/%FF%FE")
    assert resp.status_code in (400, 404), resp.text
    assert resp.headers["content-type"] == "application/problem+json"


def test_partitions_merge_into_one_exact_leaderboard(servers, r) -> None:
    users = [f"p-{i:02d}" for i in range(12)]
    with app_client(servers, SCORE_PARTITIONS="4", SCORE_TOP_N="5") as c:
        settings = Settings.from_env(make_env(servers, SCORE_PARTITIONS="4", SCORE_TOP_N="5"))
        _provision(servers, r, settings, users)
        for i, user in enumerate(users):
            resp = c.post(
                "/api/v1/score",
                json={"user_id": user, "score_increase": 1 + i % 6},
                headers={"Authorization": f"Bearer {mint(settings, user)}"},
            )
            assert resp.status_code == 200, resp.text
            assert "rank" not in resp.json()  # not known across partitions in one call
        top = c.get("/api/v1/leaderboard").json()["top"]
        # scores: p-05 and p-11 have 6; p-04 and p-10 have 5; p-03, p-09 have 4
        assert top == [
            {"rank": 1, "user_id": "p-05", "score": 6},
            {"rank": 1, "user_id": "p-11", "score": 6},
            {"rank": 3, "user_id": "p-04", "score": 5},
            {"rank": 3, "user_id": "p-10", "score": 5},
            {"rank": 5, "user_id": "p-03", "score": 4},
        ]
        assert c.get("/api/v1/users/p-09").json() == {"user_id": "p-09", "score": 4, "rank": 5}
        assert c.get("/api/v1/users/p-00").json()["rank"] == 11


def _provision(servers: Servers, r, settings: Settings, users: list[str]) -> None:
    with psycopg.connect(servers.postgres.url) as conn:
        provision_sync(conn, r, KeySchema(settings.partitions), settings.top_n, users)


def test_postgres_down_is_degraded_but_ready_and_scores_still_work(servers, add_users) -> None:
    (alice,) = add_users(count=1)
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/score_service"
    with app_client(servers, DATABASE_URL=nowhere) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["postgres"].startswith("down")
        score(c, alice, 3)
