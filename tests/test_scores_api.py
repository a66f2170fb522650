"""POST /api/v1/score over HTTP (in-process): every status code, every bad input, and the order
of the checks. Every refused request is shown to change nothing in Redis or Postgres."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
import pytest
from starlette.testclient import TestClient
from support import SECRET, Servers, assert_problem, make_env

from service.app import create_app
from service.auth import mint
from service.dev.servers import wait_for
from service.errors import ApiError
from service.keys import KeySchema
from service.models import score_update_decoder
from service.requests import Head, decode_json
from service.scores import MAX_BODY_BYTES
from service.settings import MAX_SCORE, Settings

URL = "/api/v1/score"
CHALLENGE = 'Bearer realm="score-service", error="invalid_token"'


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@contextmanager
def app_client(servers: Servers, **overrides: str) -> Iterator[TestClient]:
    """The app in-process with a different configuration."""
    settings = Settings.from_env(make_env(servers, **overrides))
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        yield c


# ---- 200 -------------------------------------------------------------------------------


def test_increments_add_up_and_reply_is_the_specs(client, add_users, token, r) -> None:
    alice, _ = add_users(count=2)
    first = client.post(
        URL, json={"user_id": alice, "score_increase": 7}, headers=bearer(token(alice))
    )
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "application/json"
    assert first.json() == {
        "message": "Score updated successfully.",
        "user_id": alice,
        "new_score": 7,
        "rank": 1,
    }
    assert "RateLimit" in first.headers and "RateLimit-Policy" in first.headers
    second = client.post(
        URL, json={"user_id": alice, "score_increase": 35}, headers=bearer(token(alice))
    )
    assert second.json()["new_score"] == 42
    assert r.zscore(KeySchema(1).for_user(alice).leaderboard, alice) == -42
    assert r.xlen(KeySchema(1).for_user(alice).events) == 2


def test_unicode_user_id_and_content_type_with_charset(client, add_users, token) -> None:
    (user,) = add_users("élodie-😀")
    resp = client.post(
        URL,
        content=json.dumps({"user_id": user, "score_increase": 3}).encode(),
        headers={**bearer(token(user)), "Content-Type": "application/json; charset=utf-8"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["user_id"] == user


def test_a_body_without_content_type_is_read_as_json(client, add_users, token) -> None:
    (alice,) = add_users(count=1)
    body = json.dumps({"user_id": alice, "score_increase": 1}).encode()
    resp = client.post(URL, content=body, headers=bearer(token(alice)))
    assert resp.status_code == 200, resp.text


def test_score_increase_up_to_the_configured_maximum(client, add_users, token, settings) -> None:
    (alice,) = add_users(count=1)
    body = {"user_id": alice, "score_increase": settings.max_increase}
    resp = client.post(URL, json=body, headers=bearer(token(alice)))
    assert resp.json()["new_score"] == settings.max_increase


# ---- 413 -------------------------------------------------------------------------------


def test_oversized_body_is_413_before_anything_else(client, snapshot) -> None:
    before = snapshot()
    padding = "x" * MAX_BODY_BYTES
    resp = client.post(URL, json={"user_id": "a", "score_increase": 1, "pad": padding})
    assert_problem(resp, 413, str(MAX_BODY_BYTES))
    assert snapshot() == before


def test_oversized_chunked_body_is_413(client, add_users, token, snapshot) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()

    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "' + alice.encode() + b'", "score_increase": 1, "pad": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    resp = client.post(URL, content=chunks(), headers=bearer(token(alice)))
    assert_problem(resp, 413)
    assert snapshot() == before


def test_huge_declared_content_length_is_413(client, add_users, token, snapshot) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()
    resp = client.post(
        URL,
        content=b"{}",
        headers={**bearer(token(alice)), "Content-Length": "9" * 40},
    )
    assert_problem(resp, 413)
    assert snapshot() == before


@pytest.mark.parametrize("length", ["abc", "-1", "²", "1e3"])
def test_malformed_content_length_is_400(client, add_users, token, snapshot, length: str) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()
    headers = {**bearer(token(alice)), "Content-Length": length.encode("latin-1")}
    resp = client.post(URL, content=b"{}", headers=headers)
    assert_problem(resp, 400, "Content-Length")
    assert snapshot() == before


# ---- 401 -------------------------------------------------------------------------------


def _forged(settings: Settings, alice: str) -> dict[str, str]:
    good = mint(settings, alice)
    head, payload, sig = good.split(".")
    other = Settings.from_env({"SCORE_JWT_SECRET": "another-secret-" + "y" * 40})
    return {
        "missing": "",
        "basic scheme": "Basic YWxpY2U6c2VjcmV0",
        "bearer without token": "Bearer",
        "garbage": "Bearer not-a-jwt",
        "two segments": f"Bearer {head}.{payload}",
        "tampered payload": f"Bearer {head}.{payload[:-2]}AA.{sig}",
        "other secret": f"Bearer {mint(other, alice)}",
        "expired": f"Bearer {mint(settings, alice, ttl_s=-120)}",
        "non-ascii": "Bearer \u00e9t\u00e9.\u00e9.\u00e9",
        "too long": "Bearer " + "a" * 20_000,
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "basic scheme",
        "bearer without token",
        "garbage",
        "two segments",
        "tampered payload",
        "other secret",
        "expired",
        "non-ascii",
        "too long",
    ],
)
def test_bad_tokens_are_401_with_a_bearer_challenge(
    client, add_users, settings, snapshot, case: str
) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()
    header = _forged(settings, alice)[case]
    headers = {"Authorization": header.encode()} if header else {}
    resp = client.post(URL, json={"user_id": alice, "score_increase": 1}, headers=headers)
    assert_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"] == CHALLENGE
    assert snapshot() == before


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_alg_that_is_not_a_string_is_401_not_500(client, add_users, snapshot) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()
    token = ".".join(
        b64(part) for part in (b'{"alg":["HS256"],"typ":"JWT"}', b'{"sub":"x"}', b"sig")
    )
    resp = client.post(URL, json={"user_id": alice, "score_increase": 1}, headers=bearer(token))
    assert_problem(resp, 401, "alg")
    assert snapshot() == before


def test_401_comes_before_400(client, snapshot) -> None:
    before = snapshot()
    resp = client.post(URL, content=b"not json", headers={"Content-Type": "application/json"})
    assert_problem(resp, 401, "Authorization")
    assert snapshot() == before


# ---- 400 / 415 -------------------------------------------------------------------------

DEEP = b"[" * 1900 + b"]" * 1900  # as deep as fits in the body limit


def bad_bodies(user: str) -> dict[str, tuple[bytes, str]]:
    """Malformed bodies for `user`, each with a word its 400 detail must contain."""
    u = json.dumps(user).encode()

    def with_increase(raw: bytes) -> bytes:
        return b'{"user_id": ' + u + b', "score_increase": ' + raw + b"}"

    return {
        "empty": (b"", "JSON"),
        "not json": (b"score please", "JSON"),
        "trailing garbage": (with_increase(b"1") + b" x", "JSON"),
        "top-level array": (b"[1, 2]", "object"),
        "top-level string": (b'"hello"', "object"),
        "invalid utf-8 in a string": (b'{"user_id": "\xff\xfe", "score_increase": 1}', "UTF-8"),
        "invalid utf-8 outside strings": (b"\xff" + with_increase(b"1"), "JSON"),
        "lone surrogate escape": (b'{"user_id": "\\ud800", "score_increase": 1}', "JSON"),
        "byte order mark": (b"\xef\xbb\xbf" + with_increase(b"1"), "JSON"),
        "NaN": (with_increase(b"NaN"), "JSON"),
        "Infinity": (with_increase(b"Infinity"), "JSON"),
        "1e400": (with_increase(b"1e400"), "score_increase"),
        "huge integer": (with_increase(b"9" * 4000), "score_increase"),
        "just over 2^53": (with_increase(str(MAX_SCORE + 1).encode()), "score_increase"),
        "float": (with_increase(b"5.0"), "int"),
        "exponent": (with_increase(b"1E2"), "int"),
        "bool": (with_increase(b"true"), "bool"),
        "string": (with_increase(b'"5"'), "str"),
        "null": (with_increase(b"null"), "null"),
        "zero": (with_increase(b"0"), ">= 1"),
        "negative": (with_increase(b"-5"), ">= 1"),
        "array": (with_increase(b"[1]"), "array"),
        "deeply nested value": (with_increase(DEEP), "score_increase"),
        "deeply nested body": (DEEP, "object"),
        "deeply nested unknown field": (
            b'{"user_id": ' + u + b', "score_increase": 1, "x": ' + DEEP + b"}",
            "unknown field",
        ),
        "unknown field": (with_increase(b'1, "bonus": 5'), "bonus"),
        "missing score_increase": (b'{"user_id": ' + u + b"}", "score_increase"),
        "missing user_id": (b'{"score_increase": 1}', "user_id"),
        "user_id number": (b'{"user_id": 7, "score_increase": 1}', "user_id"),
        "user_id null": (b'{"user_id": null, "score_increase": 1}', "user_id"),
        "user_id empty": (b'{"user_id": "", "score_increase": 1}', "user_id"),
        "user_id too long": (
            json.dumps({"user_id": "x" * 129, "score_increase": 1}).encode(),
            "user_id",
        ),
        "user_id control character": (
            b'{"user_id": "a\\u0000b", "score_increase": 1}',
            "user_id",
        ),
        "above SCORE_MAX_INCREASE": (with_increase(b"1000001"), "SCORE_MAX_INCREASE"),
    }


@pytest.mark.parametrize("case", list(bad_bodies("u")))
def test_malformed_bodies_are_400_and_change_nothing(
    client, add_users, token, snapshot, case: str
) -> None:
    (alice,) = add_users(count=1)
    body, word = bad_bodies(alice)[case]
    before = snapshot()
    resp = client.post(
        URL, content=body, headers={**bearer(token(alice)), "Content-Type": "application/json"}
    )
    assert_problem(resp, 400, word)
    assert snapshot() == before
    assert client.get("/healthz").status_code == 200  # and the process is fine


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000, b'{"a":' * 200_000, b'{"user_id": "a", "x": ' + b"[" * 200_000],
    ids=["arrays", "objects", "in an unknown field"],
)
def test_decoding_nesting_deeper_than_any_body_limit_is_a_clean_400(body: bytes) -> None:
    head = Head(content_type="application/json")
    decoders = [score_update_decoder, msgspec.json.Decoder(), msgspec.json.Decoder(Loose)]
    for decoder in decoders:
        with pytest.raises(ApiError) as caught:
            decode_json(head, body, decoder)
        assert caught.value.status == 400


class Loose(msgspec.Struct):
    """A struct that skips unknown fields, so the decoder must walk them."""

    user_id: str


def test_invalid_idempotency_key_is_400(client, add_users, token, snapshot) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()
    resp = client.post(
        URL,
        json={"user_id": alice, "score_increase": 1},
        headers={**bearer(token(alice)), "Idempotency-Key": "has spaces"},
    )
    assert_problem(resp, 400, "Idempotency-Key")
    assert snapshot() == before


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
def test_wrong_content_type_is_415(client, add_users, token, snapshot, content_type) -> None:
    (alice,) = add_users(count=1)
    before = snapshot()
    resp = client.post(
        URL,
        content=json.dumps({"user_id": alice, "score_increase": 1}).encode(),
        headers={**bearer(token(alice)), "Content-Type": content_type},
    )
    assert_problem(resp, 415, "application/json")
    assert snapshot() == before


def test_400_comes_before_403(client, add_users, token, snapshot) -> None:
    alice, bob = add_users(count=2)
    before = snapshot()
    body = {"user_id": alice, "score_increase": "lots"}
    resp = client.post(URL, json=body, headers=bearer(token(bob)))
    assert_problem(resp, 400, "score_increase")
    assert snapshot() == before


def test_a_total_past_2_53_is_refused_not_rounded(client, add_users, token, r, snapshot) -> None:
    (alice,) = add_users(count=1)
    board = KeySchema(1).for_user(alice).leaderboard
    r.zadd(board, {alice: -(MAX_SCORE - 10)}, xx=True)
    before = snapshot()
    resp = client.post(
        URL, json={"user_id": alice, "score_increase": 11}, headers=bearer(token(alice))
    )
    assert_problem(resp, 400, "2^53")
    assert snapshot() == before
    resp = client.post(
        URL, json={"user_id": alice, "score_increase": 10}, headers=bearer(token(alice))
    )
    assert resp.json()["new_score"] == MAX_SCORE


# ---- 403 -------------------------------------------------------------------------------


def test_another_users_token_is_403(client, add_users, token, snapshot) -> None:
    alice, bob = add_users(count=2)
    before = snapshot()
    resp = client.post(
        URL, json={"user_id": alice, "score_increase": 5}, headers=bearer(token(bob))
    )
    assert_problem(resp, 403, "another user")
    assert snapshot() == before


def test_an_admin_token_cannot_score_for_someone_else(client, add_users, token, snapshot) -> None:
    alice, ops = add_users(count=2)
    before = snapshot()
    resp = client.post(
        URL, json={"user_id": alice, "score_increase": 5}, headers=bearer(token(ops, admin=True))
    )
    assert_problem(resp, 403)
    assert snapshot() == before


def test_403_comes_before_404(client, add_users, token, snapshot) -> None:
    (bob,) = add_users(count=1)
    before = snapshot()
    resp = client.post(
        URL, json={"user_id": "ghost", "score_increase": 5}, headers=bearer(token(bob))
    )
    assert_problem(resp, 403)
    assert snapshot() == before


# ---- 429 -------------------------------------------------------------------------------


def test_rate_limit_is_429_with_retry_after_and_ratelimit_headers(
    servers, add_users, snapshot
) -> None:
    (alice,) = add_users(count=1)
    with app_client(servers, SCORE_RATE_LIMIT="1/h", SCORE_RATE_BURST="2") as c:
        tok = bearer(mint(Settings.from_env({"SCORE_JWT_SECRET": SECRET}), alice))
        body = {"user_id": alice, "score_increase": 1}
        assert [c.post(URL, json=body, headers=tok).status_code for _ in range(2)] == [200, 200]
        before = snapshot()
        resp = c.post(URL, json=body, headers=tok)
        assert_problem(resp, 429, "Retry-After")
        assert 1 <= int(resp.headers["Retry-After"]) <= 3600
        assert resp.headers["RateLimit-Policy"] == '"burst";q=2;w=7200'
        assert resp.headers["RateLimit"].startswith('"burst";r=0;t=')
        assert snapshot() == before


def test_429_comes_before_404(servers, add_users, r, snapshot) -> None:
    (alice,) = add_users(count=1)
    with app_client(servers, SCORE_RATE_LIMIT="1/h", SCORE_RATE_BURST="1") as c:
        tok = bearer(mint(Settings.from_env({"SCORE_JWT_SECRET": SECRET}), alice))
        body = {"user_id": alice, "score_increase": 1}
        assert c.post(URL, json=body, headers=tok).status_code == 200
        r.zrem(KeySchema(1).for_user(alice).leaderboard, alice)  # the user is gone from Redis
        before = snapshot()
        assert_problem(c.post(URL, json=body, headers=tok), 429)
        assert snapshot() == before


# ---- 404 -------------------------------------------------------------------------------


def test_unknown_user_is_404(client, add_users, token, snapshot) -> None:
    add_users(count=1)
    before = snapshot()
    resp = client.post(
        URL, json={"user_id": "ghost", "score_increase": 5}, headers=bearer(token("ghost"))
    )
    assert_problem(resp, 404, "ghost")
    assert snapshot() == before


def test_no_such_endpoint_and_wrong_method(client) -> None:
    assert_problem(client.get(URL), 405, "GET")
    assert_problem(client.post("/api/v1/nothing-here"), 404, "/api/v1/nothing-here")


# ---- malformed HTTP against the real server (uvicorn + httptools) -----------------------


def raw_status(base: str, request: bytes) -> int:
    """Send `request` as raw bytes on a new connection; the response's status code."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_the_real_server_answers_malformed_http_with_4xx(service, add_users, token) -> None:
    (alice,) = add_users(count=1)
    auth = f"Authorization: Bearer {token(alice)}\r\n".encode()
    head = b"POST /api/v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    bad = b'{"user_id": "\xff", "score_increase": 1}'
    chunked = b"".join(b"400\r\n" + b"x" * 1024 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    cases = {
        "huge Content-Length": (head + auth + b"Content-Length: 99999999999\r\n\r\n{}", 413),
        "chunked over the limit": (
            head + auth + b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
            413,
        ),
        "raw invalid UTF-8 token": (
            head + b"Authorization: Bearer \xff\xfe.\xc3(\r\nContent-Length: 2\r\n\r\n{}",
            401,
        ),
        "invalid UTF-8 body": (
            head + auth + b"Content-Length: %d\r\n\r\n%s" % (len(bad), bad),
            400,
        ),
        "percent-encoded invalid UTF-8 limit": (
            b"GET /api/v1/leaderboard?limit=%FF HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
    }
    for name, (request, expected) in cases.items():
        assert raw_status(service.base, request) == expected, name
    for path in [b"/api/v1/users/%FF%FE", b"/api/v1/users/\xff\xfe", b"/api/v1/users/%00"]:
        status = raw_status(service.base, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert 400 <= status < 500, path


def test_a_retry_with_the_same_idempotency_key_adds_once(client, add_users, token, r) -> None:
    (alice,) = add_users(count=1)
    headers = {**bearer(token(alice)), "Idempotency-Key": "retry-1"}
    body = {"user_id": alice, "score_increase": 5}
    first = client.post("/api/v1/score", json=body, headers=headers)
    again = client.post("/api/v1/score", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["new_score"] == first.json()["new_score"] == 5
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    events = KeySchema(1).for_user(alice).events
    assert r.xlen(events) == 1


def test_a_replay_returns_the_first_responses_rank_not_todays(client, add_users, token, r) -> None:
    alice, bob = add_users(count=2)
    headers = {**bearer(token(alice)), "Idempotency-Key": "rank-1"}
    body = {"user_id": alice, "score_increase": 5}
    first = client.post("/api/v1/score", json=body, headers=headers)
    assert (first.json()["new_score"], first.json()["rank"]) == (5, 1)
    passed = client.post(
        "/api/v1/score", json={"user_id": bob, "score_increase": 9}, headers=bearer(token(bob))
    )
    assert passed.json()["rank"] == 1  # bob is ahead of alice now
    again = client.post("/api/v1/score", json=body, headers=headers)
    assert again.json() == first.json()  # rank 1, as the first response said
    assert again.headers["idempotent-replayed"] == "true"
    # a record restored by a rebuild (from the ledger) does not know the first rank: none
    record = KeySchema(1).for_user(alice).idempotency(alice, "rank-1")
    r.set(record, "5:5")
    restored = client.post("/api/v1/score", json=body, headers=headers)
    assert restored.status_code == 200 and restored.json()["new_score"] == 5
    assert "rank" not in restored.json()


def test_an_idempotency_key_reused_with_another_body_is_422(
    client, add_users, token, snapshot
) -> None:
    (alice,) = add_users(count=1)
    headers = {**bearer(token(alice)), "Idempotency-Key": "k-422"}
    ok = client.post("/api/v1/score", json={"user_id": alice, "score_increase": 5}, headers=headers)
    assert ok.status_code == 200
    before = snapshot()
    resp = client.post(
        "/api/v1/score", json={"user_id": alice, "score_increase": 6}, headers=headers
    )
    assert_problem(resp, 422, "Idempotency-Key")
    assert snapshot() == before


# ---- what the middleware would add (service.front) ------------------------------------


def test_the_request_id_comes_back_on_answers_and_refusals(client, add_users, token) -> None:
    (alice,) = add_users(count=1)
    body = {"user_id": alice, "score_increase": 1}
    given = client.post(URL, json=body, headers={**bearer(token(alice)), "X-Request-ID": "g-1"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "g-1"
    made = client.post(URL, json=body, headers=bearer(token(alice)))
    insane = client.post(URL, json=body, headers={**bearer(token(alice)), "X-Request-ID": "a b"})
    refused = client.post(URL, json=body)
    assert refused.status_code == 401
    ids = {r.headers["x-request-id"] for r in (made, insane, refused)}
    assert len(ids) == 3 and all(len(i) == 24 for i in ids)


def test_a_bug_on_the_hot_path_is_a_logged_500_problem(
    client, add_users, token, r, snapshot, caplog
) -> None:
    (alice,) = add_users(count=1)
    ctx = client.app.state.ctx  # type: ignore[attr-defined]

    async def broken(call: object) -> object:
        raise RuntimeError("a bug")

    ctx.scripts.submit = broken  # an injected fault: no input makes the real one fail so
    before = snapshot()
    reply = client.post(
        URL,
        json={"user_id": alice, "score_increase": 1},
        headers={**bearer(token(alice)), "X-Request-ID": "bug-1"},
    )
    assert_problem(reply, 500)
    assert "a bug" not in reply.text  # nothing internal is disclosed
    assert reply.headers["x-request-id"] == "bug-1"
    assert any(rec.exc_info and "a bug" in str(rec.exc_info[1]) for rec in caplog.records)
    assert snapshot() == before
