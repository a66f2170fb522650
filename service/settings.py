"""Configuration: read once from the environment into a frozen, validated object.

Everything is checked at startup so that a bad deployment fails fast with one clear line,
never at the first request.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

from service import topology

MAX_SCORE = 2**53 - 1
"""Largest total a Redis sorted-set score (an IEEE double) holds exactly."""

MAX_JWT_AGE_S = 366 * 24 * 3600
"""The largest SCORE_JWT_MAX_AGE: a bound meant to be hours or days, not years."""

ADMIN_SCOPE = "score:admin"
"""The OAuth scope (space-separated `scope` claim) that grants the admin API."""

_PLACEHOLDER_SECRETS = {"secret", "changeme", "change-me", "password", "dev", "test", "example"}
_MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key must be at least as long as the hash
_RATE = re.compile(r"^\s*(\d{1,15})\s*/\s*(\d{0,15})\s*(ms|s|m|h)\s*$")
_UNITS_US = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000}
MAX_RATE_WINDOW_US = 10 * 365 * 24 * 3600 * 1_000_000
"""The longest a full burst may take to refill (SCORE_RATE_LIMIT's interval times
SCORE_RATE_BURST), 10 years. The rate limit's state is a time in microseconds on Redis's clock
plus at most this window: kept far below 2^53 (the year 2255) so that lua/submit_score-6.lua's
arithmetic stays exact and its expiry valid for any setting that passes."""
_MIN_RSA_BITS = 2048  # RFC 7518 3.3
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_POSTGRES_SCHEMES = ("postgresql", "postgres")
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_DATABASE_URL = "postgresql://localhost/score_service"


class ConfigError(ValueError):
    """The environment does not describe a service that can run."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The service's configuration; build it with `Settings.from_env()`, which validates."""

    redis_url: str = DEFAULT_REDIS_URL
    queue_url: str | None = None
    """SCORE_QUEUE_URL: the Redis of the persister's RQ job queue; None: REDIS_URL's."""
    database_url: str = DEFAULT_DATABASE_URL
    jwt_secret: str | None = None
    jwt_public_key: bytes | None = None
    jwt_private_key: bytes | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_max_age_s: int | None = None
    rate_limit: str = "10/s"
    rate_interval_us: int = 100_000
    rate_burst: int = 20
    max_increase: int = 1_000_000
    top_n: int = 10
    partitions: int = 1
    redis_min_replicas: int = 0
    """SCORE_REDIS_MIN_REPLICAS: an increment is acknowledged once this many replicas have it."""
    redis_wait_ms: int = 500
    """SCORE_REDIS_WAIT_MS: how long a batch waits for those replicas (WAIT), then 503."""
    idempotency_ttl_s: int = 24 * 3600
    # Live leaderboard (WebSocket / SSE)
    live_tick_ms: int = 50
    live_max_connections: int = 10_000
    live_max_per_client: int = 1000
    live_send_timeout_s: float = 5.0
    live_ping_interval_s: float = 20.0
    # SCORE_CORS_ORIGINS: the live Origin check, the /embed framers and CORS (service.cors)
    live_allowed_origins: tuple[str, ...] = ()
    live_max_message_bytes: int = 1024
    # Persister
    persist_batch: int = 20_000
    # Serving: shutdown, slow clients, proxies (service/live/going_away.py, service/concurrency.py)
    shutdown_grace_s: float = 5.0
    body_timeout_s: float = 5.0
    max_concurrency: int = 1000
    trusted_proxies: tuple[str, ...] = ()
    # Operations: logs and readiness
    log_format: str = "text"
    access_log: bool = False
    persister_lag_degraded_s: int = 30

    @property
    def redis(self) -> topology.RedisTarget:
        """The Redis deployment REDIS_URL names (checked by from_env)."""
        return topology.parse(self.redis_url)

    @property
    def queue_redis(self) -> topology.RedisTarget:
        """The Redis of the persister's RQ job queue (checked by from_env: never a cluster)."""
        return topology.parse(self.queue_url or self.redis_url)

    @classmethod
    def for_stores(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings for commands that talk to Redis and Postgres but verify no token."""
        return cls.from_env(_stores_only(os.environ if env is None else env))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: os.environ); raise ConfigError when invalid."""
        e = os.environ if env is None else env
        secret = _opt(e, "SCORE_JWT_SECRET")
        public_key = _read_key(e, "SCORE_JWT_PUBLIC_KEY", private=False)
        jwks_url = _opt(e, "SCORE_JWT_JWKS_URL")
        if secret is None and public_key is None and jwks_url is None:
            raise ConfigError(
                "no JWT key source: set SCORE_JWT_SECRET (development), "
                "SCORE_JWT_PUBLIC_KEY (PEM file) or SCORE_JWT_JWKS_URL"
            )
        if secret is not None and (
            secret.lower() in _PLACEHOLDER_SECRETS or len(secret.encode()) < _MIN_SECRET_BYTES
        ):
            raise ConfigError(
                f"SCORE_JWT_SECRET is a placeholder or shorter than {_MIN_SECRET_BYTES} "
                "bytes: use a random secret, e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        if jwks_url is not None:
            _check_url("SCORE_JWT_JWKS_URL", jwks_url, ("http", "https"))
        redis_url = _opt(e, "REDIS_URL") or DEFAULT_REDIS_URL
        queue_url = _opt(e, "SCORE_QUEUE_URL")
        _check_redis_urls(redis_url, queue_url)
        database_url = _opt(e, "DATABASE_URL") or DEFAULT_DATABASE_URL
        _check_url("DATABASE_URL", database_url, _POSTGRES_SCHEMES)
        rate_limit = e.get("SCORE_RATE_LIMIT", "10/s")
        interval_us = _parse_rate(rate_limit)
        burst = _int(e, "SCORE_RATE_BURST", 20, 1, 1_000_000)
        if interval_us * burst > MAX_RATE_WINDOW_US:
            raise ConfigError(
                f"SCORE_RATE_LIMIT {rate_limit!r} with SCORE_RATE_BURST {burst}: a full burst "
                "would take more than 10 years to refill; use a faster rate or a smaller burst"
            )
        origins = _origins(e)
        return cls(
            redis_url=redis_url,
            queue_url=queue_url,
            database_url=database_url,
            jwt_secret=secret,
            jwt_public_key=public_key,
            jwt_private_key=_read_key(e, "SCORE_JWT_PRIVATE_KEY", private=True),
            jwt_jwks_url=jwks_url,
            jwt_issuer=_opt(e, "SCORE_JWT_ISSUER"),
            jwt_audience=_opt(e, "SCORE_JWT_AUDIENCE"),
            jwt_max_age_s=_opt_int(e, "SCORE_JWT_MAX_AGE", 1, MAX_JWT_AGE_S),
            rate_limit=rate_limit,
            rate_interval_us=interval_us,
            rate_burst=burst,
            max_increase=_int(e, "SCORE_MAX_INCREASE", 1_000_000, 1, MAX_SCORE),
            top_n=_int(e, "SCORE_TOP_N", 10, 1, 1000),
            partitions=_int(e, "SCORE_PARTITIONS", 1, 1, 1024),
            redis_min_replicas=_int(e, "SCORE_REDIS_MIN_REPLICAS", 0, 0, 16),
            redis_wait_ms=_int(e, "SCORE_REDIS_WAIT_MS", 500, 1, 60_000),
            idempotency_ttl_s=_int(e, "SCORE_IDEMPOTENCY_TTL", 24 * 3600, 60, 30 * 24 * 3600),
            live_tick_ms=_int(e, "SCORE_LIVE_TICK_MS", 50, 1, 10_000),
            live_max_connections=_int(e, "SCORE_LIVE_MAX_CONNECTIONS", 10_000, 1, 1_000_000),
            live_max_per_client=_int(e, "SCORE_LIVE_MAX_PER_CLIENT", 1000, 1, 1_000_000),
            live_send_timeout_s=_int(e, "SCORE_LIVE_SEND_TIMEOUT_MS", 5000, 100, 600_000) / 1000,
            live_ping_interval_s=_int(e, "SCORE_LIVE_PING_INTERVAL_MS", 20_000, 100, 600_000)
            / 1000,
            live_max_message_bytes=_int(e, "SCORE_LIVE_MAX_MESSAGE_BYTES", 1024, 1, 1_048_576),
            live_allowed_origins=tuple(o.strip() for o in origins.split(",") if o.strip())
            if origins
            else (),
            persist_batch=_int(e, "SCORE_PERSIST_BATCH", 20_000, 1, 1_000_000),
            shutdown_grace_s=_int(e, "SCORE_SHUTDOWN_GRACE_S", 5, 0, 600),
            body_timeout_s=_int(e, "SCORE_BODY_TIMEOUT_S", 5, 1, 600),
            max_concurrency=_int(e, "SCORE_MAX_CONCURRENCY", 1000, 1, 1_000_000),
            trusted_proxies=_networks(e, "SCORE_TRUSTED_PROXIES"),
            log_format=log_format(e),
            access_log=_flag(e, "SCORE_ACCESS_LOG"),
            persister_lag_degraded_s=_int(e, "SCORE_PERSISTER_LAG_DEGRADED_S", 30, 1, 86_400),
        )


LOG_FORMATS = ("text", "json")


def log_format(env: Mapping[str, str]) -> str:
    """SCORE_LOG_FORMAT: "text" (the default) or "json" (one object a line)."""
    value = (_opt(env, "SCORE_LOG_FORMAT") or "text").lower()
    if value not in LOG_FORMATS:
        raise ConfigError(f"SCORE_LOG_FORMAT must be text or json, got {value!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (unset: false)."""
    value = (_opt(env, name) or "0").lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {value!r}")


def _stores_only(env: Mapping[str, str]) -> dict[str, str]:
    """`env`, with a placeholder key source when none is set: for commands that verify no
    token (migrate, users, worker, rebuild, reconcile)."""
    keys = ("SCORE_JWT_SECRET", "SCORE_JWT_PUBLIC_KEY", "SCORE_JWT_JWKS_URL")
    if any(env.get(k) for k in keys):
        return dict(env)
    return {**env, "SCORE_JWT_JWKS_URL": "https://unused.invalid/"}


def _origins(env: Mapping[str, str]) -> str | None:
    """SCORE_CORS_ORIGINS: the one list of browser origins allowed to call the REST API
    (CORS) and to open the live endpoints (the WebSocket/SSE Origin check).
    SCORE_LIVE_ALLOWED_ORIGINS is its older name, still read when the new one is unset."""
    new, old = _opt(env, "SCORE_CORS_ORIGINS"), _opt(env, "SCORE_LIVE_ALLOWED_ORIGINS")
    if new is not None and old is not None and new != old:
        raise ConfigError(
            "SCORE_CORS_ORIGINS and SCORE_LIVE_ALLOWED_ORIGINS (its older name) differ: "
            "set SCORE_CORS_ORIGINS alone"
        )
    return new or old


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of IP addresses or networks (CIDR), each checked now; "*" (any
    peer) as it is."""
    raw = _opt(env, name)
    if raw is None:
        return ()
    networks = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in networks:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {item!r} is not an IP address or network") from None
    return networks


def _opt(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def algorithm_for(key: Any) -> str:
    """The one JWS algorithm a key (public or private) may be used with: no algorithm
    confusion. ValueError for a key type or size the service does not accept."""
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"an RSA key must have at least {_MIN_RSA_BITS} bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if key.curve.name not in _EC_ALGORITHMS:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return _EC_ALGORITHMS[key.curve.name]
    if isinstance(
        key,
        ed25519.Ed25519PublicKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PublicKey
        | ed448.Ed448PrivateKey,
    ):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__} (use RSA, EC or Ed25519)")


def _read_key(env: Mapping[str, str], name: str, *, private: bool) -> bytes | None:
    """The PEM file named by `name`, checked now so that a bad key fails at startup."""
    path = _opt(env, name)
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
    kind = "private" if private else "public"
    try:
        key = load_pem_private_key(data, password=None) if private else load_pem_public_key(data)
        algorithm_for(key)
    except (ValueError, TypeError) as exc:
        # TypeError: an encrypted private key; ValueError: not PEM, or not this kind of key
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{name}: {path} is not a usable {kind} key in PEM: {message}") from None
    return data


def _check_redis_urls(redis_url: str, queue_url: str | None) -> None:
    try:
        queue = data = topology.parse(redis_url)
        if queue_url:
            queue = topology.parse(queue_url, "SCORE_QUEUE_URL")
    except topology.BadRedisUrl as exc:
        raise ConfigError(str(exc)) from None
    if queue.kind == "cluster":
        where = "SCORE_QUEUE_URL is" if queue is not data else "REDIS_URL is"
        raise ConfigError(
            f"{where} a Redis Cluster, where the persister's job queue (RQ) cannot live: set "
            "SCORE_QUEUE_URL to a single Redis server or a Sentinel deployment for it (it "
            "holds only flush requests: losing it loses no increment)"
        )


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    # The URL itself is not echoed: it may carry a password.
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{name} must be a URL with scheme {' or '.join(schemes)}, "
            f"got scheme {parts.scheme or 'none'!r}"
        )
    if parts.scheme in ("http", "https") and not parts.hostname:
        raise ConfigError(f"{name} must name a host")


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = _opt_int(env, name, low, high)
    return default if value is None else value


def _opt_int(env: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    """The integer `name` holds, from `low` to `high`; None when it is unset."""
    raw = _opt(env, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _parse_rate(raw: str) -> int:
    """'10/s', '600/m', '5/10s' -> microseconds between requests (GCRA emission interval)."""
    m = _RATE.match(raw)
    if not m or int(m.group(1)) == 0:
        raise ConfigError(
            f"SCORE_RATE_LIMIT must look like '10/s', '600/m' or '5/10s', got {raw!r}"
        )
    count, multiple, unit = int(m.group(1)), int(m.group(2) or 1), m.group(3)
    period_us = multiple * _UNITS_US[unit]
    if period_us < count:
        raise ConfigError(f"SCORE_RATE_LIMIT {raw!r} is faster than one request per microsecond")
    # in integers, rounded to the nearest microsecond: no float can overflow or round here
    return (2 * period_us + count) // (2 * count)
