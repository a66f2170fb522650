"""The `score-service` basics, run as the operator runs them (a real process each): migrate,
users add/import, token, and serve refusing a configuration it cannot run with."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import jwt
import psycopg
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support import ROOT, SECRET, Servers, refused

from service.dev.servers import RedisServer, free_port
from service.keys import KeySchema


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


def leaderboard_scores(r) -> dict[str, int]:
    board = KeySchema(1).all()[0].leaderboard
    return {m.decode(): -int(s) for m, s in r.zrange(board, 0, -1, withscores=True)}


# ---- migrate ---------------------------------------------------------------------------


def test_migrate_creates_the_schema_once(servers: Servers, env: dict[str, str]) -> None:
    name = f"migrate_{uuid.uuid4().hex[:12]}"
    base = servers.postgres.url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        url = f"{base}/{name}"
        first = cli({**env, "DATABASE_URL": url}, "migrate")
        assert first.returncode == 0, first.stderr
        assert "applied" in first.stdout
        with psycopg.connect(url) as conn:
            versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
        second = cli({**env, "DATABASE_URL": url}, "migrate")
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == "schema is up to date"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT version FROM schema_migrations").fetchall() == versions
            conn.execute("SELECT user_id, score FROM users")  # the tables are there
            conn.execute("SELECT event_id, delta FROM score_events")
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # type: ignore[arg-type]


# ---- users -----------------------------------------------------------------------------


def test_users_add_provisions_both_stores_and_is_idempotent(env, r, pg, snapshot) -> None:
    out = cli(env, "users", "add", "alice", "bob")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("users: 2 created, 0 already existed, in ")
    assert leaderboard_scores(r) == {"alice": 0, "bob": 0}
    rows = pg.execute("SELECT user_id, score FROM users ORDER BY user_id").fetchall()
    assert rows == [("alice", 0), ("bob", 0)]

    # alice has scored since: provisioning her again changes nothing
    r.zadd(KeySchema(1).all()[0].leaderboard, {"alice": -40}, xx=True)
    pg.execute("UPDATE users SET score = 40 WHERE user_id = 'alice'")
    before = snapshot()
    out = cli(env, "users", "add", "alice")
    assert out.stdout.startswith("users: 0 created, 1 already existed, in ")
    assert snapshot() == before


@pytest.mark.parametrize("bad", ["", "x" * 129, "tab\there", "nul-less\x01control"])
def test_users_add_with_a_bad_id_changes_nothing(env, r, snapshot, bad: str) -> None:
    cli(env, "users", "add", "existing")
    before = snapshot()
    refused(cli(env, "users", "add", "carol", bad, "dave"), "invalid user id")
    assert snapshot() == before


def test_users_import_reads_one_id_per_line(env, r, tmp_path: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text("# players\nalice,Alice A.\n\n  bob  \ncarol\n", encoding="utf-8")
    out = cli(env, "users", "import", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("users: 3 created, 0 already existed, in ")
    out = cli(env, "users", "import", "-", stdin="dave\nalice\n")
    assert out.stdout.startswith("users: 1 created, 1 already existed, in ")
    assert leaderboard_scores(r) == {"alice": 0, "bob": 0, "carol": 0, "dave": 0}


def test_users_import_with_a_bad_line_changes_nothing(env, r, snapshot, tmp_path: Path) -> None:
    path = tmp_path / "users.txt"
    path.write_text("erin\nfrank\n" + "y" * 500 + "\ngrace\n", encoding="utf-8")
    before = snapshot()
    refused(cli(env, "users", "import", str(path)), "invalid user id")
    assert snapshot() == before


# ---- token -----------------------------------------------------------------------------


def test_token_mints_a_token_the_service_accepts(env, client, add_users) -> None:
    (alice,) = add_users(count=1)
    out = cli(env, "token", alice)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == alice and "scope" not in claims
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 300
    resp = client.post(
        "/api/v1/score",
        json={"user_id": alice, "score_increase": 2},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 200, resp.text


def test_token_admin_and_ttl(env) -> None:
    out = cli(env, "token", "ops", "--admin", "--ttl", "60")
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["scope"] == "score:admin"
    assert claims["exp"] - claims["iat"] == 60


def test_token_with_a_private_key(env, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "key.pem", tmp_path / "pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    keyed = {**env, "SCORE_JWT_SECRET": "", "SCORE_JWT_PUBLIC_KEY": str(public),
             "SCORE_JWT_PRIVATE_KEY": str(private)}  # fmt: skip
    out = cli(keyed, "token", "alice")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert jwt.decode(token, key.public_key(), algorithms=["ES256"])["sub"] == "alice"


def test_token_refusals(env) -> None:
    refused(cli(env, "token", "bad\x01id"), "invalid user id")
    jwks_only = {**env, "SCORE_JWT_SECRET": "", "SCORE_JWT_JWKS_URL": "https://idp.invalid/jwks"}
    refused(cli(jwks_only, "token", "alice"), "cannot mint")


# ---- serve refuses what it cannot run with -----------------------------------------------


def serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A serve that does not refuse would run until the timeout: the test then fails.
    return cli(env, "serve", "--port", str(free_port()))


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ({"SCORE_RATE_LIMIT": "fast"}, ["SCORE_RATE_LIMIT", "'fast'"]),
        ({"SCORE_RATE_LIMIT": "1/3000000h"}, ["SCORE_RATE_LIMIT", "SCORE_RATE_BURST"]),
        ({"SCORE_JWT_MAX_AGE": "0"}, ["SCORE_JWT_MAX_AGE"]),
        ({"SCORE_MAX_INCREASE": "0"}, ["SCORE_MAX_INCREASE"]),
        ({"SCORE_JWT_SECRET": "secret"}, ["SCORE_JWT_SECRET"]),
        ({"SCORE_JWT_PUBLIC_KEY": "/nonexistent/key.pem"}, ["SCORE_JWT_PUBLIC_KEY", "cannot read"]),
        ({"SCORE_JWT_JWKS_URL": "ftp://idp/jwks"}, ["SCORE_JWT_JWKS_URL"]),
        ({"REDIS_URL": "localhost:6379"}, ["REDIS_URL"]),
        ({"SCORE_JWT_SECRET": ""}, ["no JWT key source"]),
    ],
    ids=["rate", "rate window", "max age", "max increase", "placeholder secret", "key file",
         "jwks url", "redis url", "no key source"],
)  # fmt: skip
def test_serve_refuses_bad_configuration(env, override: dict[str, str], words: list[str]) -> None:
    refused(serve({**env, **override}), *words)


def test_serve_refuses_a_redis_that_could_evict_keys(env, tmp_path: Path) -> None:
    rs = RedisServer(tmp_path / "redis", extra=["--maxmemory-policy", "allkeys-lru"]).start()
    try:
        line = refused(serve({**env, "REDIS_URL": rs.url}), "'allkeys-lru'", "noeviction")
        assert "maxmemory-policy" in line
        with redis.Redis.from_url(rs.url) as client:
            client.config_set("maxmemory-policy", "volatile-ttl")
        refused(serve({**env, "REDIS_URL": rs.url}), "'volatile-ttl'")
        refused(cli({**env, "REDIS_URL": rs.url}, "users", "add", "alice"), "'volatile-ttl'")
    finally:
        rs.stop()


def test_token_in_a_new_shell_finds_the_dev_secret(env: dict[str, str], tmp_path: Path) -> None:
    """`make run` keeps its HS256 secret in .data/: `score-service token alice` from the
    checkout in another shell (no SCORE_JWT_* set) signs with it instead of exiting 2."""
    bare = {k: v for k, v in env.items() if not k.startswith("SCORE_JWT_")}
    (tmp_path / ".data").mkdir()
    secret = "dev-" + "k" * 60
    (tmp_path / ".data" / "dev-jwt-secret").write_text(secret + "\n")

    def token_from(cwd: Path) -> subprocess.CompletedProcess[str]:
        run = [sys.executable, "-m", "service.cli", "token", "alice"]
        return subprocess.run(
            run, env=bare, capture_output=True, text=True, cwd=cwd, timeout=60, check=False
        )

    out = token_from(tmp_path)
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    elsewhere = token_from(tmp_path / ".data")
    assert elsewhere.returncode == 2, elsewhere.stdout  # no secret here: the clear error
