"""/openapi.json and /asyncapi.json describe every route the app serves: a route added without
its description fails here. The statuses a fuzzer cannot reach (429, 503, 413, 415, 401, 426)
are provoked here, and each must be documented with its content type and headers."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jsonschema_rs
import pytest
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient

from service.app import create_app
from service.asyncapi import ASYNCAPI_PATH
from service.asyncapi import document as asyncapi_document
from service.dev.servers import wait_for
from service.keys import KeySchema
from service.layout import Layout, encode
from service.openapi import OPENAPI_PATH
from service.requests import IDEMPOTENCY_KEY
from service.settings import Settings

_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def documented_path(path: str) -> str:
    """A Starlette path as OpenAPI writes it: `{user_id:path}` -> `{user_id}`."""
    return _CONVERTER.sub(r"{\1}", path)


def test_every_route_is_documented_and_nothing_else(client: TestClient) -> None:
    openapi = client.get(OPENAPI_PATH).json()
    asyncapi = client.get(ASYNCAPI_PATH).json()
    assert openapi["x-asyncapi"] == ASYNCAPI_PATH
    channels = {c["address"] for c in asyncapi["channels"].values()}
    served: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, WebSocketRoute):
            sockets.add(route.path)
        elif isinstance(route, Mount):  # static files
            served.add((route.path + "/{path}", "get"))
        else:
            assert isinstance(route, Route), route
            # HEAD comes with every GET
            methods = {m.lower() for m in route.methods or ()} - {"head"}
            served |= {(documented_path(route.path), m) for m in methods}
    described = {(path, method) for path, ops in openapi["paths"].items() for method in ops}
    assert served == described
    assert sockets == channels - {"/api/v1/leaderboard/stream"}
    assert channels <= {path for path, _ in served} | sockets


def _operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = doc["paths"][path][method]
    return operation


def assert_documented(doc: dict[str, Any], method: str, path: str, resp: Any) -> None:
    """`resp` has a status the operation lists, its content type, and its required headers."""
    responses = _operation(doc, method, path)["responses"]
    status = str(resp.status_code)
    assert status in responses, f"{method.upper()} {path} answered {status}: not documented"
    response = responses[status]
    media = resp.headers.get("content-type", "").split(";")[0]
    assert media in response.get("content", {}), (status, media)
    for name, header in response.get("headers", {}).items():
        if header.get("required"):
            assert name in resp.headers, f"{status} without its {name} header"


def test_every_refusal_a_fuzzer_cannot_reach_is_documented(
    client: TestClient, settings: Settings, add_users: Any, token: Any, r: Any
) -> None:
    doc = client.get(OPENAPI_PATH).json()
    (alice,) = add_users(count=1)
    score = "/api/v1/score"
    bearer = {"Authorization": f"Bearer {token(alice)}"}
    body = {"user_id": alice, "score_increase": 1}
    cases = [
        ("post", score, client.post(score, json=body)),  # 401
        ("post", score, client.post(score, content=b"x" * 5000, headers=bearer)),  # 413
        (
            "post",
            score,
            client.post(score, content=b"{}", headers={**bearer, "content-type": "text/plain"}),
        ),
        ("post", score, client.post(score, json=body, headers=bearer)),  # 200
        ("get", "/api/v1/leaderboard/ws", client.get("/api/v1/leaderboard/ws")),  # 426
        ("post", "/api/v1/admin/users", client.post("/api/v1/admin/users", json={})),  # 401
        ("get", "/static/{path}", client.get("/static/nothing-here.js")),  # 404
    ]
    statuses = [resp.status_code for _, _, resp in cases]
    assert statuses == [401, 413, 415, 200, 426, 401, 404]
    for method, path, resp in cases:
        assert_documented(doc, method, path, resp)

    # 429: a burst of one
    slow = dataclasses.replace(settings, rate_interval_us=3_600_000_000, rate_burst=1)
    with TestClient(create_app(slow), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        responses = [c.post(score, json=body, headers=bearer) for _ in range(2)]
    assert [resp.status_code for resp in responses] == [200, 429]
    assert_documented(doc, "post", score, responses[1])

    # 503: Redis records another partition layout than this process's
    r.set(KeySchema(settings.partitions).layout, encode(Layout(partitions=2)))
    wait_for(lambda: client.get("/readyz").status_code == 503, 10, "not ready")
    unavailable = [
        ("post", score, client.post(score, json=body, headers=bearer)),
        ("get", "/api/v1/users/{user_id}", client.get(f"/api/v1/users/{alice}")),
        ("get", "/readyz", client.get("/readyz")),
    ]
    for method, path, resp in unavailable:
        assert resp.status_code == 503, (path, resp.text)
        assert_documented(doc, method, path, resp)


def test_the_asyncapi_frame_schema_fits_a_real_frame(client: TestClient, add_users: Any) -> None:
    add_users(count=2)
    doc = client.get(ASYNCAPI_PATH).json()
    assert doc["asyncapi"].startswith("3.")
    payload = doc["components"]["messages"]["leaderboard"]["payload"]
    validator = jsonschema_rs.validator_for({**payload, "components": doc["components"]})
    with client.websocket_connect("/api/v1/leaderboard/ws") as ws:
        frame = ws.receive_json()
    validator.validate(frame)
    with pytest.raises(jsonschema_rs.ValidationError):
        validator.validate({**frame, "top": "nobody"})


def test_the_documents_are_built_once() -> None:
    assert asyncapi_document() is asyncapi_document()


def test_the_idempotency_key_patterns_are_the_checked_one(client: TestClient) -> None:
    schemas = client.get(OPENAPI_PATH).json()["components"]["schemas"]
    adjustment = schemas["Adjustment"]["properties"]["idempotency_key"]
    assert adjustment["pattern"] == IDEMPOTENCY_KEY.pattern
