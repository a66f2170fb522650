"""A production-like stack for one benchmark: Redis (the project's redis.conf, or a deployment
the caller started: TLS, Sentinel, Cluster), a Postgres database, provisioned users with RS256
tokens, `score-service serve --workers N` and the persister (`score-service worker`)."""

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
from service.connections import sync_redis
from service.dev.servers import PostgresServer, RedisServer
from service.keys import KeySchema
from service.settings import Settings
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
    redis_url: str
    """REDIS_URL: the stack's own Redis, or a deployment its caller started (and stops)."""
    database_url: str
    env: dict[str, str]
    users: int
    tokens_file: Path
    token_users: list[str]
    redis: RedisServer | None = None
    """The Redis the stack started itself, stopped with it."""
    serve: Proc | None = None
    worker: Proc | None = None
    extra: list[Proc] = field(default_factory=list)

    @property
    def base(self) -> str:
        assert self.serve is not None
        return self.serve.base

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def schema(self) -> KeySchema:
        return KeySchema(self.settings.partitions)

    def client(self) -> redis.Redis:
        """A client of the stack's deployment, whatever its topology."""
        return sync_redis(self.settings, socket_timeout=30)

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
        if self.redis is not None:
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
        SCORE_SHUTDOWN_GRACE_S="0",  # no load balancer to drain: a stack stops at once
    )
    return env


def provision(settings: Settings, ids: list[str]) -> None:
    """`ids` in Postgres and in every partition of the deployment."""
    client = sync_redis(settings, socket_timeout=60)
    schema = KeySchema(settings.partitions)
    try:
        with psycopg.connect(settings.database_url) as conn:
            for start in range(0, len(ids), PROVISION_CHUNK):
                chunk = ids[start : start + PROVISION_CHUNK]
                provision_sync(conn, client, schema, 10, chunk)
        # Redis now holds what Postgres holds: no rebuild needed when the service starts. One
        # SET each: on a cluster the markers are in different slots.
        for marker in schema.ready_markers:
            client.set(marker, "1")
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
    redis_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    tokens_of: Stack | None = None,
) -> Stack:
    """Start Redis (unless `redis_url` names a deployment the caller runs), create the
    database, provision `users`, mint tokens for a random `token_users` of them (or reuse
    those of `tokens_of`, a stack with the same users and keys), start the service (and the
    persister). `extra_env`: settings added to the service's (SCORE_PARTITIONS...)."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    own = None
    if redis_url is None:
        own = RedisServer(directory / "redis", extra=redis_extra or []).start()
        redis_url = own.url
    try:
        database_url = create_database(pg, f"bench_{name}")
        stack_env = service_env(redis_url, database_url, keys) | (extra_env or {})
        ids = [user_id(i) for i in range(users)]
        provision(Settings.from_env(stack_env), ids)
        if tokens_of is None:
            chosen = random.Random(name).sample(ids, min(token_users, users))
            tokens_file = directory / "tokens.txt"
            tokens_file.write_text("".join(f"{u} {mint(keys, u)}\n" for u in chosen))
        else:
            chosen, tokens_file = tokens_of.token_users, tokens_of.tokens_file
    except BaseException:
        if own is not None:
            own.stop()
        raise
    stack = Stack(
        name, directory, redis_url, database_url, stack_env, users, tokens_file, chosen, own
    )
    try:
        stack.serve = http_server(
            f"{name}-serve",
            [sys.executable, "-m", "service.cli", "serve", "--workers", str(workers)],
            stack_env,
            directory / "serve.log",
            "/readyz",
        )
        if persister:
            stack.start_worker()
    except BaseException:
        stack.stop()
        raise
    return stack
