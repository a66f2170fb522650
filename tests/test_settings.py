"""Settings.from_env: a frozen, typed object, and one clear line for every bad configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.settings import MAX_RATE_WINDOW_US, ConfigError, Settings

SECRET = "s" * 40


def pem_public(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_private(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def refused(env: dict[str, str], *words: str) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_defaults() -> None:
    s = Settings.from_env({"SCORE_JWT_SECRET": SECRET})
    assert s.jwt_max_age_s is None  # no bound on a token's age unless asked
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.database_url == "postgresql://localhost/score_service"
    assert (s.rate_interval_us, s.rate_burst, s.max_increase) == (100_000, 20, 1_000_000)
    assert (s.top_n, s.partitions) == (10, 1)
    assert s.jwt_issuer is None and s.jwt_audience is None


def test_settings_are_frozen() -> None:
    s = Settings.from_env({"SCORE_JWT_SECRET": SECRET})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_increase = 5  # type: ignore[misc]


def test_every_variable_is_read() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://cache:6380/2",
            "DATABASE_URL": "postgresql://db/scores",
            "SCORE_JWT_SECRET": SECRET,
            "SCORE_JWT_JWKS_URL": "https://idp.example/.well-known/jwks.json",
            "SCORE_JWT_ISSUER": "https://idp.example/",
            "SCORE_JWT_AUDIENCE": "score-service",
            "SCORE_RATE_LIMIT": "600/m",
            "SCORE_RATE_BURST": "5",
            "SCORE_MAX_INCREASE": "100",
            "SCORE_TOP_N": "25",
            "SCORE_PARTITIONS": "8",
            "SCORE_JWT_MAX_AGE": "3600",
        }
    )
    assert s.jwt_max_age_s == 3600
    assert s.redis_url == "redis://cache:6380/2"
    assert s.database_url == "postgresql://db/scores"
    assert s.jwt_jwks_url == "https://idp.example/.well-known/jwks.json"
    assert (s.jwt_issuer, s.jwt_audience) == ("https://idp.example/", "score-service")
    assert (s.rate_interval_us, s.rate_burst, s.max_increase) == (100_000, 5, 100)
    assert (s.top_n, s.partitions) == (25, 8)


def test_no_key_source_is_refused() -> None:
    refused({}, "SCORE_JWT_SECRET", "SCORE_JWT_PUBLIC_KEY", "SCORE_JWT_JWKS_URL")
    refused({"SCORE_JWT_SECRET": "   "}, "no JWT key source")


@pytest.mark.parametrize("secret", ["secret", "changeme", "short-but-random-ish"])
def test_placeholder_or_short_secret_is_refused(secret: str) -> None:
    refused({"SCORE_JWT_SECRET": secret}, "SCORE_JWT_SECRET")


@pytest.mark.parametrize(
    ("rate", "interval_us"),
    [("10/s", 100_000), ("600/m", 100_000), ("5/10s", 2_000_000), ("1/h", 3_600_000_000),
     ("1000/ms", 1)],
)  # fmt: skip
def test_rate_limit_formats(rate: str, interval_us: int) -> None:
    env = {"SCORE_JWT_SECRET": SECRET, "SCORE_RATE_LIMIT": rate}
    assert Settings.from_env(env).rate_interval_us == interval_us


@pytest.mark.parametrize("rate", ["fast", "0/s", "10", "10/d", "-1/s", "2000/ms"])
def test_bad_rate_limit_is_refused(rate: str) -> None:
    refused({"SCORE_JWT_SECRET": SECRET, "SCORE_RATE_LIMIT": rate}, "SCORE_RATE_LIMIT")


def test_a_rate_limit_the_hot_path_cannot_run_is_refused_at_startup() -> None:
    """`1/3000000h` once passed startup and made every request a 500 (the Lua refuses an
    interval past 2^53-1 us). The bound is the time a full burst takes to refill."""
    env = {"SCORE_JWT_SECRET": SECRET}
    refused({**env, "SCORE_RATE_LIMIT": "1/3000000h"}, "SCORE_RATE_LIMIT", "SCORE_RATE_BURST")
    slowest = {**env, "SCORE_RATE_LIMIT": "1/87600h", "SCORE_RATE_BURST": "1"}  # 10 years
    assert Settings.from_env(slowest).rate_interval_us == MAX_RATE_WINDOW_US
    refused({**slowest, "SCORE_RATE_BURST": "2"}, "10 years")
    refused({**env, "SCORE_RATE_LIMIT": "1/1000000000000000h"}, "SCORE_RATE_LIMIT")
    refused({**env, "SCORE_RATE_LIMIT": "1" * 5000 + "/s"}, "SCORE_RATE_LIMIT")  # no traceback


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SCORE_JWT_MAX_AGE", "0"),
        ("SCORE_JWT_MAX_AGE", "1h"),
        ("SCORE_JWT_MAX_AGE", str(366 * 24 * 3600 + 1)),
        ("SCORE_RATE_BURST", "0"),
        ("SCORE_RATE_BURST", "many"),
        ("SCORE_MAX_INCREASE", "0"),
        ("SCORE_MAX_INCREASE", str(2**53)),
        ("SCORE_MAX_INCREASE", "1e6"),
        ("SCORE_TOP_N", "0"),
        ("SCORE_TOP_N", "100000"),
        ("SCORE_PARTITIONS", "0"),
        ("SCORE_PARTITIONS", "2.5"),
    ],
)
def test_bad_numbers_are_refused(name: str, value: str) -> None:
    refused({"SCORE_JWT_SECRET": SECRET, name: value}, name)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "http://cache:6379"),
        ("REDIS_URL", "localhost:6379"),
        ("DATABASE_URL", "mysql://db/scores"),
        ("SCORE_JWT_JWKS_URL", "file:///etc/passwd"),
        ("SCORE_JWT_JWKS_URL", "https://"),
    ],
)
def test_bad_urls_are_refused(name: str, value: str) -> None:
    refused({"SCORE_JWT_SECRET": SECRET, name: value}, name)


def test_a_refused_url_is_not_echoed_with_its_password() -> None:
    message = refused(
        {"SCORE_JWT_SECRET": SECRET, "DATABASE_URL": "mysql://root:hunter2@db/x"}, "DATABASE_URL"
    )
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(65537, 2048),
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["RSA", "P-256", "P-384", "Ed25519"],
)
def test_public_and_private_keys_are_loaded(tmp_path: Path, make) -> None:
    key = make()
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    (tmp_path / "key.pem").write_bytes(pem_private(key))
    s = Settings.from_env(
        {
            "SCORE_JWT_PUBLIC_KEY": str(tmp_path / "pub.pem"),
            "SCORE_JWT_PRIVATE_KEY": str(tmp_path / "key.pem"),
        }
    )
    assert s.jwt_public_key == pem_public(key)
    assert s.jwt_private_key == pem_private(key)


def test_unusable_public_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    env = {"SCORE_JWT_PUBLIC_KEY": str(path)}
    refused(env, "SCORE_JWT_PUBLIC_KEY", "cannot read")
    path.write_text("not a key")
    refused(env, "SCORE_JWT_PUBLIC_KEY", "not a usable public key")
    path.write_bytes(pem_private(ec.generate_private_key(ec.SECP256R1())))
    refused(env, "SCORE_JWT_PUBLIC_KEY", "not a usable public key")
    path.write_bytes(pem_public(rsa.generate_private_key(65537, 1024)))
    refused(env, "SCORE_JWT_PUBLIC_KEY", "2048")
    path.write_bytes(pem_public(ec.generate_private_key(ec.SECP256K1())))
    refused(env, "SCORE_JWT_PUBLIC_KEY", "secp256k1")


def test_unusable_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem_public(ec.generate_private_key(ec.SECP256R1())))
    refused({"SCORE_JWT_SECRET": SECRET, "SCORE_JWT_PRIVATE_KEY": str(path)}, "private key")
