"""CORS for the REST API from SCORE_CORS_ORIGINS, the list the live endpoints' Origin check
uses too; no CORS middleware at all without it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.middleware.cors import CORSMiddleware
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.dev.servers import wait_for
from service.settings import ConfigError, Settings

GAME = "http://game.example"
OTHER = "http://evil.example"
SCORE = "/api/v1/score"


@pytest.fixture
def cors_client(env: dict[str, str], r: Any) -> Iterator[TestClient]:
    settings = Settings.from_env({**env, "SCORE_CORS_ORIGINS": f"{GAME}/, http://second.example"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        yield c


def preflight(client: TestClient, origin: str, headers: str) -> Any:
    return client.options(
        SCORE,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


def test_one_list_feeds_cors_and_the_live_origin_check(env: dict[str, str]) -> None:
    new = Settings.from_env({**env, "SCORE_CORS_ORIGINS": GAME})
    old = Settings.from_env({**env, "SCORE_LIVE_ALLOWED_ORIGINS": GAME})
    same = {"SCORE_CORS_ORIGINS": GAME, "SCORE_LIVE_ALLOWED_ORIGINS": GAME}
    both = Settings.from_env({**env, **same})
    assert new.live_allowed_origins == old.live_allowed_origins == both.live_allowed_origins
    assert new.live_allowed_origins == (GAME,)
    with pytest.raises(ConfigError, match="SCORE_CORS_ORIGINS"):
        Settings.from_env({**env, "SCORE_CORS_ORIGINS": GAME, "SCORE_LIVE_ALLOWED_ORIGINS": OTHER})


def test_without_origins_there_is_no_cors_middleware(settings: Settings) -> None:
    assert not any(m.cls is CORSMiddleware for m in create_app(settings).user_middleware)


def test_no_cors_headers_without_origins(client: TestClient) -> None:
    resp = client.get("/api/v1/leaderboard", headers={"Origin": GAME})
    assert "access-control-allow-origin" not in resp.headers


def test_a_preflight_from_an_allowed_origin_allows_the_api_headers(
    cors_client: TestClient,
) -> None:
    resp = preflight(cors_client, GAME, "authorization, content-type, idempotency-key")
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == GAME
    allowed = resp.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "content-type", "idempotency-key", "x-request-id"):
        assert header in allowed
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert int(resp.headers["access-control-max-age"]) >= 600
    assert "access-control-allow-credentials" not in resp.headers


def test_a_preflight_from_another_origin_is_refused(cors_client: TestClient) -> None:
    resp = preflight(cors_client, OTHER, "authorization, content-type")
    assert resp.status_code == 400
    assert "access-control-allow-origin" not in resp.headers


def test_a_cross_origin_post_can_read_its_result_and_rate_headers(
    cors_client: TestClient, add_users: Any, token: Any
) -> None:
    (alice,) = add_users(count=1)
    resp = cors_client.post(
        SCORE,
        json={"user_id": alice, "score_increase": 5},
        headers={"Origin": GAME, "Authorization": f"Bearer {token(alice)}"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["access-control-allow-origin"] == GAME
    exposed = resp.headers["access-control-expose-headers"].lower()
    for header in ("ratelimit", "ratelimit-policy", "retry-after", "idempotent-replayed"):
        assert header in exposed
    # a refusal is readable too: the page can show the problem's detail
    refused = cors_client.post(SCORE, json={}, headers={"Origin": GAME})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == GAME
    # another origin's page gets no CORS headers: its browser hides the response
    other = cors_client.get("/api/v1/leaderboard", headers={"Origin": OTHER})
    assert "access-control-allow-origin" not in other.headers
    # a game client's post (no Origin) says that the answer varies by Origin all the same: a
    # cache between it and us must not serve it to a page of another origin
    bare = {"Authorization": f"Bearer {token(alice)}"}
    plain = cors_client.post(SCORE, json={"user_id": alice, "score_increase": 1}, headers=bare)
    assert plain.status_code == 200 and "origin" in plain.headers["vary"].lower()
    assert "access-control-allow-origin" not in plain.headers


def test_the_live_endpoints_check_the_same_list(cors_client: TestClient, add_users: Any) -> None:
    add_users(count=1)
    with cors_client.websocket_connect("/api/v1/leaderboard/ws", headers={"Origin": GAME}) as ws:
        assert ws.receive_json()["type"] == "leaderboard"
    with (
        pytest.raises(WebSocketDisconnect),
        cors_client.websocket_connect("/api/v1/leaderboard/ws", headers={"Origin": OTHER}),
    ):
        pass
    refused = cors_client.get("/api/v1/leaderboard/stream", headers={"Origin": OTHER})
    assert refused.status_code == 403
