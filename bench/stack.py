"""A production-like stack for one benchmark: Redis (the project's redis.conf), a Postgres
database, provisioned users with RS256 tokens, `score-service serve --workers N` and the
persister (`score-service worker`)."""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import psycopg
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.procs import Proc, http_server, spawn
from persister.schema import migrate
from service.dev.servers import PostgresServer, RedisServer
from service.keys import KeySchema
from service.users import provision_sync

TOKEN_TTL_S = 3 * 3600
PROVISION_CHUNK = 100_000


def user_id(i: int) -> str:
    """Bench user ids: `u` + 12 digits, the shape redis-benchmark's __rand_int__ makes."""
    return f"u{i:012d}"


@dataclass(frozen=True)
class Keys:
    private_pem: Path
    public_pem: Path
    private: rsa.RSAPrivateKey


def make_keys(directory: Path) -> Keys:
    """An RS256 key pair, written as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = directory / "jwt-private.pem"
    public_pem = directory / "jwt-public.pem"
    private_pem.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return Keys(private_pem, public_pem, private)


def mint(keys: Keys, user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + TOKEN_TTL_S}, keys.private, "RS256")


def create_database(pg: PostgresServer, name: str) -> str:
    """A new database `name` on `pg`, migrated; its URL."""
    admin = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # type: ignore[arg-type]
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    url = f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"
    with psycopg.connect(url) as conn:
        migrate(conn)
    return url


@dataclass
class Stack:
    name: str
    directory: Path
    redis: RedisServer
    database_url: str
    env: dict[str, str]
    users: int
    tokens_file: Path
    token_users: list[str]
    serve: Proc | None = None
    worker: Proc | None = None
    extra: list[Proc] = field(default_factory=list)

    @property
    def base(self) -> str:
        assert self.serve is not None
        return self.serve.base

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=30)

    def start_worker(self) -> None:
        """Start the persister (unless it runs)."""
        if self.worker is None:
            self.worker = spawn(
                f"{self.name}-worker",
                [sys.executable, "-m", "service.cli", "worker"],
                self.env,
                self.directory / "worker.log",
            )

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def stop(self) -> None:
        for proc in [*self.extra, self.worker, self.serve]:
            if proc is not None:
                proc.stop()
        self.redis.stop()


def service_env(redis_url: str, database_url: str, keys: Keys) -> dict[str, str]:
    """The service's environment: production settings, a rate limit the bench never hits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCORE_")}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        SCORE_JWT_PUBLIC_KEY=str(keys.public_pem),
        SCORE_JWT_PRIVATE_KEY=str(keys.private_pem),
        SCORE_RATE_LIMIT="1000000/s",
        SCORE_RATE_BURST="1000000",
        SCORE_LIVE_MAX_CONNECTIONS="100000",
        SCORE_LIVE_MAX_PER_CLIENT="100000",
        SCORE_LOG_LEVEL="warning",
    )
    return env


def provision(stack_env: dict[str, str], redis_url: str, database_url: str, ids: list[str]) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    try:
        with psycopg.connect(database_url) as conn:
            for start in range(0, len(ids), PROVISION_CHUNK):
                chunk = ids[start : start + PROVISION_CHUNK]
                provision_sync(conn, client, KeySchema(1), 10, chunk)
        # Redis now holds what Postgres holds: no rebuild needed when the service starts
        client.mset(dict.fromkeys(KeySchema(1).ready_markers, "1"))
    finally:
        client.close()


def build_stack(
    name: str,
    root: Path,
    pg: PostgresServer,
    keys: Keys,
    *,
    users: int,
    token_users: int,
    workers: int,
    redis_extra: list[str] | None = None,
    persister: bool = True,
) -> Stack:
    """Start Redis, create the database, provision `users`, mint tokens for a random
    `token_users` of them, start the service (and the persister)."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    redis_server = RedisServer(directory / "redis", extra=redis_extra or []).start()
    database_url = create_database(pg, f"bench_{name}")
    env = service_env(redis_server.url, database_url, keys)
    ids = [user_id(i) for i in range(users)]
    provision(env, redis_server.url, database_url, ids)
    chosen = random.Random(name).sample(ids, min(token_users, users))
    tokens_file = directory / "tokens.txt"
    tokens_file.write_text("".join(f"{u} {mint(keys, u)}\n" for u in chosen))
    stack = Stack(name, directory, redis_server, database_url, env, users, tokens_file, chosen)
    try:
        stack.serve = http_server(
            f"{name}-serve",
            [sys.executable, "-m", "service.cli", "serve", "--workers", str(workers)],
            env,
            directory / "serve.log",
            "/readyz",
        )
        if persister:
            stack.start_worker()
    except BaseException:
        stack.stop()
        raise
    return stack
