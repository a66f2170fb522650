"""Authentication: pinned algorithms, required claims, every RFC 8725 forgery, and a JWKS served
by a real HTTP server (rotation by kid, rate-limited refetch, failed refresh, background
refresh, fetches that never block the event loop)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.testclient import TestClient
from support import Servers, assert_problem, make_env

import service.auth
from service.app import create_app
from service.auth import LEEWAY_S, MAX_TOKEN_CHARS, Authenticator, AuthError, Jwks, Principal
from service.dev.servers import wait_for, wait_for_async
from service.settings import Settings

SECRET = "auth-test-secret-" + "z" * 60  # long enough for HS512 too
RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ATTACKER = rsa.generate_private_key(65537, 2048)
KEYS: dict[str, tuple[Any, str]] = {"RS256": (RSA_KEY, "rsa"), "ES256": (EC_KEY, "ec"),
                                    "EdDSA": (ED_KEY, "ed")}  # fmt: skip


# ---- helpers ---------------------------------------------------------------------------


def claims(**overrides: object) -> dict[str, object]:
    """Valid claims for alice (a fresh jti, so every token is new to the cache)."""
    now = int(time.time())
    base: dict[str, object] = {"sub": "alice", "iat": now, "exp": now + 600}
    base["jti"] = uuid.uuid4().hex
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def compact(header: dict[str, object], payload: dict[str, object], sign: bytes = b"") -> str:
    """A JWS built by hand, for tokens pyjwt refuses to make."""
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(sign)]
    )


def hs256_with(key: bytes, payload: dict[str, object], **header: object) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", **header}).encode())
    body = b64(json.dumps(payload).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: Any, kid: str, **extra: str) -> dict[str, object]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**data, "kid": kid, "use": "sig", **extra}


def sign(key: Any, alg: str, payload: dict[str, object], **header: object) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers=header or None)


async def accepted(auth: Authenticator, token: str) -> Principal:
    return await auth.authenticate(f"Bearer {token}")


async def refused(auth: Authenticator, token: str, *words: str) -> str:
    with pytest.raises(AuthError) as caught:
        await auth.authenticate(f"Bearer {token}")
    for word in words:
        assert word in str(caught.value), str(caught.value)
    return str(caught.value)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    """Poll `check` on the event loop until it holds (deadline: `within` seconds)."""
    await wait_for_async(check, within, what)


def secret_auth(**env: str) -> Authenticator:
    return Authenticator(Settings.from_env({"SCORE_JWT_SECRET": SECRET, **env}))


def public_key_auth(tmp_path: Path, key: Any, **env: str) -> Authenticator:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(key))
    return Authenticator(Settings.from_env({"SCORE_JWT_PUBLIC_KEY": str(path), **env}))


class FakeClock:
    """service.auth's clock, moved forward by hand (wall and monotonic alike)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(
        service.auth, "time", SimpleNamespace(time=fake.time, monotonic=fake.monotonic)
    )
    return fake


# ---- a real identity provider ----------------------------------------------------------


class IdentityProvider:
    """A JWKS endpoint on a free local port, served from a thread; counts every request."""

    def __init__(self) -> None:
        self.keys: list[dict[str, object]] = []
        self.mode = "ok"  # or: "500", "garbage", "not an object", "empty", "encryption only"
        self.gate: threading.Event | None = None  # when set, hold each response until released
        self.released: list[bool] = []
        self.hits: Counter[str] = Counter()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.hits[self.path] += 1
                if provider.gate is not None:
                    provider.released.append(provider.gate.wait(5))
                status, body = provider.respond()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return self.base + "/jwks.json"

    @property
    def fetches(self) -> int:
        return self.hits["/jwks.json"]

    def respond(self) -> tuple[int, bytes]:
        bodies = {
            "ok": json.dumps({"keys": self.keys}).encode(),
            "500": b'{"error": "boom"}',
            "garbage": b"<html>not json",
            "not an object": b"[1, 2, 3]",
            "empty": b'{"keys": []}',
            "encryption only": json.dumps(
                {"keys": [{**k, "use": "enc"} for k in self.keys]}
            ).encode(),
        }
        return (500 if self.mode == "500" else 200), bodies[self.mode]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.keys = [jwk(key, kid) for key, kid in KEYS.values()]
    yield provider
    if provider.gate is not None:
        provider.gate.set()
    provider.stop()


def jwks_auth(url: str, jwks: Jwks, **env: str) -> Authenticator:
    return Authenticator(Settings.from_env({"SCORE_JWT_JWKS_URL": url, **env}), jwks=jwks)


@asynccontextmanager
async def started(jwks: Jwks) -> AsyncIterator[Jwks]:
    await jwks.start()
    try:
        yield jwks
    finally:
        await jwks.stop()


# ---- the dev secret: claims -------------------------------------------------------------


async def test_a_valid_token_names_its_user() -> None:
    principal = await accepted(secret_auth(), sign(SECRET, "HS256", claims()))
    assert (principal.user_id, principal.admin) == ("alice", False)


async def test_user_id_claim_where_there_is_no_sub() -> None:
    auth = secret_auth()
    assert (
        await accepted(auth, sign(SECRET, "HS256", claims(sub=None, user_id="bob")))
    ).user_id == "bob"
    both = claims(sub="carol", user_id="bob")
    assert (await accepted(auth, sign(SECRET, "HS256", both))).user_id == "carol"
    await refused(auth, sign(SECRET, "HS256", claims(sub=None)), "sub")
    await refused(auth, sign(SECRET, "HS256", claims(sub="", user_id="bob")), "sub")
    await refused(auth, sign(SECRET, "HS256", claims(sub=None, user_id=7)), "sub")
    await refused(auth, sign(SECRET, "HS256", claims(sub=7)))


@pytest.mark.parametrize(
    ("scope", "admin"),
    [("score:admin", True), ("openid score:admin profile", True), ("score:administrator", False),
     ("openid", False), (["score:admin"], False)],
)  # fmt: skip
async def test_admin_is_the_score_admin_scope(scope: object, admin: bool) -> None:
    principal = await accepted(secret_auth(), sign(SECRET, "HS256", claims(scope=scope)))
    assert principal.admin is admin


async def test_exp_is_required_and_checked_with_30s_leeway() -> None:
    auth = secret_auth()
    now = int(time.time())
    await refused(auth, sign(SECRET, "HS256", claims(exp=None)), "exp")
    await refused(auth, sign(SECRET, "HS256", claims(exp=now - LEEWAY_S - 10)), "expired")
    await accepted(auth, sign(SECRET, "HS256", claims(exp=now - LEEWAY_S + 10)))
    await refused(auth, sign(SECRET, "HS256", claims(exp="soon")))
    await refused(auth, sign(SECRET, "HS256", claims(exp=str(now + 600))), "exp")
    await accepted(auth, sign(SECRET, "HS256", claims(nbf=now + LEEWAY_S - 10)))
    await refused(auth, sign(SECRET, "HS256", claims(nbf=now + LEEWAY_S + 60)))


async def test_issuer_and_audience_when_configured() -> None:
    auth = secret_auth(SCORE_JWT_ISSUER="https://idp.test/", SCORE_JWT_AUDIENCE="scores")
    good = claims(iss="https://idp.test/", aud="scores")
    await accepted(auth, sign(SECRET, "HS256", good))
    await accepted(auth, sign(SECRET, "HS256", {**good, "aud": ["other", "scores"]}))
    await refused(auth, sign(SECRET, "HS256", {**good, "iss": "https://evil.test/"}), "issuer")
    await refused(auth, sign(SECRET, "HS256", {**good, "aud": "other"}), "Audience")
    await refused(auth, sign(SECRET, "HS256", claims(aud="scores")), "iss")
    await refused(auth, sign(SECRET, "HS256", claims(iss="https://idp.test/")), "aud")
    # not configured: not required
    await accepted(secret_auth(), sign(SECRET, "HS256", claims()))


async def test_wrong_secret_tampering_and_malformed_headers() -> None:
    auth = secret_auth()
    await refused(auth, sign("another-secret-" + "q" * 40, "HS256", claims()), "invalid token")
    head, _, sig = sign(SECRET, "HS256", claims()).split(".")
    forged_body = b64(json.dumps(claims(sub="mallory")).encode())
    await refused(auth, f"{head}.{forged_body}.{sig}", "invalid token")
    for bad in ["x", "a.b", "a.b.c", "!!!.e30.", f"{b64(b'[1]')}.e30.", f"{b64(b'{}')}.e30."]:
        await refused(auth, bad)
    await refused(auth, compact({"alg": ["HS256"]}, claims()), "alg")
    await refused(auth, compact({"alg": "HS256", "kid": 5}, claims()))
    for header in ["", "Bearer", "Bearer   ", "Basic abc", "Token abc"]:
        with pytest.raises(AuthError):
            await auth.authenticate(header)
    with pytest.raises(AuthError):
        await auth.authenticate(None)
    await refused(auth, "a" * (MAX_TOKEN_CHARS + 1), str(MAX_TOKEN_CHARS))


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_only_hs256_with_the_secret(alg: str) -> None:
    await refused(secret_auth(), sign(SECRET, alg, claims()), alg)


async def test_verified_tokens_are_cached_until_they_expire(clock: FakeClock) -> None:
    auth = secret_auth()
    token = sign(SECRET, "HS256", claims(exp=int(time.time()) + 60))
    first = await accepted(auth, token)
    assert await accepted(auth, token) is first  # served from the cache
    clock.offset = 60 + LEEWAY_S + 1  # the cached entry has expired: verified again
    assert await accepted(auth, token) is not first


# ---- RFC 8725: forged tokens ------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("source", ["secret", "public key", "jwks"])
async def test_alg_none_is_refused(
    tmp_path: Path, idp: IdentityProvider, alg: str, source: str
) -> None:
    auths = {
        "secret": secret_auth,
        "public key": lambda: public_key_auth(tmp_path, RSA_KEY),
        "jwks": lambda: jwks_auth(idp.url, Jwks(idp.url)),
    }
    auth = auths[source]()
    await refused(auth, compact({"alg": alg, "typ": "JWT"}, claims()), "not accepted")
    await refused(auth, compact({"alg": alg, "kid": "rsa"}, claims(), b"x"), "not accepted")


async def test_hs256_signed_with_the_public_key_is_refused(tmp_path: Path) -> None:
    pem = public_pem(RSA_KEY)
    await refused(public_key_auth(tmp_path, RSA_KEY), hs256_with(pem, claims()), "HS256")
    # with a dev secret configured too, HS256 is checked against the secret only
    both = public_key_auth(tmp_path, RSA_KEY, SCORE_JWT_SECRET=SECRET)
    await refused(both, hs256_with(pem, claims()), "invalid token")
    await accepted(both, sign(SECRET, "HS256", claims()))


async def test_hs256_signed_with_a_jwks_key_is_refused(idp: IdentityProvider) -> None:
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        pem = public_pem(RSA_KEY)
        await refused(auth, hs256_with(pem, claims(), kid="rsa"), "HS256")
        material = json.dumps(jwk(RSA_KEY, "rsa")).encode()
        await refused(auth, hs256_with(material, claims(), kid="rsa"), "HS256")


@pytest.mark.parametrize("name", ["jku", "x5u"])
async def test_key_urls_in_the_token_are_never_fetched(idp: IdentityProvider, name: str) -> None:
    idp.keys.append(jwk(ATTACKER, "attacker"))  # served at the URL the token points to
    evil = idp.base + "/attacker.json"
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        idp.keys.pop()
        fetches = idp.fetches
        token = sign(ATTACKER, "RS256", claims(), **{name: evil, "kid": "attacker"})
        await refused(auth, token, name)
        token = sign(ATTACKER, "RS256", claims(), **{name: evil})
        await refused(auth, token, name)
    assert idp.hits["/attacker.json"] == 0
    assert idp.fetches == fetches


@pytest.mark.parametrize("source", ["public key", "jwks"])
async def test_embedded_keys_are_refused(
    tmp_path: Path, idp: IdentityProvider, source: str
) -> None:
    attacker_jwk = jwk(ATTACKER, "rsa")
    cert_chain = [base64.b64encode(public_pem(ATTACKER)).decode()]
    async with started(Jwks(idp.url)) as jwks:
        auth = (
            public_key_auth(tmp_path, RSA_KEY)
            if source == "public key"
            else jwks_auth(idp.url, jwks)
        )
        await refused(auth, sign(ATTACKER, "RS256", claims(), jwk=attacker_jwk, kid="rsa"), "jwk")
        await refused(auth, sign(ATTACKER, "RS256", claims(), x5c=cert_chain, kid="rsa"), "x5c")
        # the same key, unannounced, is just a bad signature
        await refused(auth, sign(ATTACKER, "RS256", claims(), kid="rsa"), "invalid token")


@pytest.mark.parametrize(
    "header",
    [{"crit": ["exp"]}, {"crit": ["foo"], "foo": 1}, {"crit": []}, {"crit": "b64"},
     {"crit": ["b64"], "b64": True}],
)  # fmt: skip
async def test_unsupported_crit_is_refused(header: dict[str, object]) -> None:
    token = compact({"alg": "HS256", **header}, claims())
    await refused(secret_auth(), token)
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", **header}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    await refused(secret_auth(), f"{head}.{body}.{b64(sig)}")


# ---- a PEM public key: RS256 / ES256 / EdDSA, algorithms pinned -------------------------


@pytest.mark.parametrize("alg", list(KEYS))
async def test_public_key_verifies_its_one_algorithm(tmp_path: Path, alg: str) -> None:
    key, _ = KEYS[alg]
    auth = public_key_auth(tmp_path, key)
    assert (await accepted(auth, sign(key, alg, claims()))).user_id == "alice"
    other = {"RS256": RSA_KEY, "ES256": EC_KEY, "EdDSA": ED_KEY}
    for other_alg, other_key in other.items():
        if other_alg != alg:
            await refused(auth, sign(other_key, other_alg, claims()), other_alg)
    await refused(auth, sign(SECRET, "HS256", claims()), "HS256")


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256"])
async def test_an_rsa_key_verifies_rs256_only(tmp_path: Path, alg: str) -> None:
    await refused(public_key_auth(tmp_path, RSA_KEY), sign(RSA_KEY, alg, claims()), alg)


async def test_a_p384_key_verifies_es384_only(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    auth = public_key_auth(tmp_path, key)
    await accepted(auth, sign(key, "ES384", claims()))
    await refused(auth, compact({"alg": "ES256"}, claims(), b"x" * 64), "ES256")


# ---- a JWKS from a real HTTP server -----------------------------------------------------


@pytest.mark.parametrize("alg", list(KEYS))
async def test_jwks_keys_by_kid(idp: IdentityProvider, alg: str) -> None:
    key, kid = KEYS[alg]
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        assert (await accepted(auth, sign(key, alg, claims(), kid=kid))).user_id == "alice"
        await refused(auth, sign(key, alg, claims()), "kid")  # which key? refused
        wrong_kid = "ec" if kid != "ec" else "rsa"
        await refused(auth, sign(key, alg, claims(), kid=wrong_kid))
    assert idp.fetches == 1


async def test_jwks_key_algorithm_is_pinned(idp: IdentityProvider) -> None:
    idp.keys = [jwk(RSA_KEY, "rsa", alg="RS256"), jwk(EC_KEY, "ec")]
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        await refused(auth, sign(RSA_KEY, "RS384", claims(), kid="rsa"), "does not sign with")
        await refused(auth, sign(RSA_KEY, "PS256", claims(), kid="rsa"), "does not sign with")
        await refused(auth, sign(EC_KEY, "ES256", claims(), kid="rsa"), "does not sign with")
        await refused(auth, sign(RSA_KEY, "RS256", claims(), kid="ec"), "does not sign with")


async def test_jwks_encryption_keys_are_not_signing_keys(idp: IdentityProvider) -> None:
    idp.keys = [jwk(RSA_KEY, "rsa"), jwk(EC_KEY, "ec", use="enc")]
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        await accepted(auth, sign(RSA_KEY, "RS256", claims(), kid="rsa"))
        await refused(auth, sign(EC_KEY, "ES256", claims(), kid="ec"), "unknown key id")


async def test_rotation_by_kid(idp: IdentityProvider, clock: FakeClock) -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        await accepted(auth, sign(RSA_KEY, "RS256", claims(), kid="rsa"))
        idp.keys = [jwk(new_key, "2024-06")]  # the provider rotates: old key gone
        clock.offset += 31  # past the unknown-kid interval since the last fetch
        await accepted(auth, sign(new_key, "ES256", claims(), kid="2024-06"))
        assert idp.fetches == 2
        clock.offset += 31
        await refused(auth, sign(RSA_KEY, "RS256", claims(), kid="rsa"), "unknown key id")
        assert idp.fetches == 3


async def test_a_cached_token_goes_with_its_key_when_the_key_is_removed(
    idp: IdentityProvider, clock: FakeClock
) -> None:
    """A 30-day token kept working from the cache after the provider removed its key."""
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        month = int(time.time()) + 30 * 24 * 3600
        token = sign(RSA_KEY, "RS256", claims(exp=month), kid="rsa")
        other = sign(EC_KEY, "ES256", claims(exp=month), kid="ec")
        first, kept = await accepted(auth, token), await accepted(auth, other)
        assert await accepted(auth, token) is first  # cached
        idp.keys = [k for k in idp.keys if k["kid"] != "rsa"]  # the provider drops "rsa"
        await jwks.refresh()
        clock.offset += 31  # the lookup of an unknown kid may refetch: it refuses all the same
        await refused(auth, token, "unknown key id")
        assert await accepted(auth, other) is kept  # a key still served keeps its tokens


async def test_a_cached_token_goes_with_its_key_when_the_key_is_replaced(
    idp: IdentityProvider,
) -> None:
    replacement = rsa.generate_private_key(65537, 2048)
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        token = sign(RSA_KEY, "RS256", claims(), kid="rsa")
        await accepted(auth, token)
        # the same kid, other key material (a compromised key replaced in place)
        idp.keys = [jwk(replacement, "rsa") if k["kid"] == "rsa" else k for k in idp.keys]
        await jwks.refresh()
        await refused(auth, token, "invalid token")
        await accepted(auth, sign(replacement, "RS256", claims(), kid="rsa"))


async def test_a_refresh_that_changes_nothing_keeps_the_cache(idp: IdentityProvider) -> None:
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        tokens = [sign(key, alg, claims(), kid=kid) for alg, (key, kid) in KEYS.items()]
        first = [await accepted(auth, t) for t in tokens]
        idp.keys = list(reversed(idp.keys))  # the same keys, served in another order
        await jwks.refresh()
        assert [await accepted(auth, t) for t in tokens] == first
        assert all([await accepted(auth, t) is p for t, p in zip(tokens, first, strict=True)])
        assert idp.fetches == 2


# ---- SCORE_JWT_MAX_AGE ------------------------------------------------------------------


async def test_max_age_requires_iat_and_refuses_older_tokens() -> None:
    auth = secret_auth(SCORE_JWT_MAX_AGE="3600")
    now = int(time.time())
    month = now + 30 * 24 * 3600
    await accepted(auth, sign(SECRET, "HS256", claims(iat=now - 3500, exp=month)))
    await refused(auth, sign(SECRET, "HS256", claims(iat=None, exp=month)), "iat")
    old = sign(SECRET, "HS256", claims(iat=now - 3700, exp=month))
    await refused(auth, old, "SCORE_JWT_MAX_AGE")
    await refused(auth, sign(SECRET, "HS256", claims(iat=str(now), exp=month)), "iat")
    await refused(auth, sign(SECRET, "HS256", claims(iat=True, exp=month)))
    # unset: no bound, and no iat needed
    await accepted(secret_auth(), sign(SECRET, "HS256", claims(iat=None, exp=month)))
    await accepted(secret_auth(), sign(SECRET, "HS256", claims(iat=now - 10**7, exp=month)))


async def test_a_cached_token_is_refused_once_it_is_older_than_max_age(clock: FakeClock) -> None:
    auth = secret_auth(SCORE_JWT_MAX_AGE="600")
    now = int(time.time())
    token = sign(SECRET, "HS256", claims(iat=now, exp=now + 30 * 24 * 3600))
    first = await accepted(auth, token)
    assert first.expires_at == now + 600
    clock.offset = 599
    assert await accepted(auth, token) is first
    clock.offset = 602
    await refused(auth, token, "SCORE_JWT_MAX_AGE")


async def test_unknown_kid_refetch_is_rate_limited(idp: IdentityProvider, clock: FakeClock) -> None:
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        assert idp.fetches == 1
        forged = [sign(ATTACKER, "RS256", claims(), kid=f"forged-{i}") for i in range(30)]
        for token in forged[:10]:
            await refused(auth, token, "unknown key id")
        await asyncio.gather(*(refused(auth, t, "unknown key id") for t in forged[10:]))
        assert idp.fetches == 1  # within 30 s of the last fetch: no refetch at all
        clock.offset += 29
        await refused(auth, forged[0], "unknown key id")
        assert idp.fetches == 1
        clock.offset += 2
        await asyncio.gather(*(refused(auth, t, "unknown key id") for t in forged))
        assert idp.fetches == 2  # one refetch for the whole flood


async def test_concurrent_unknown_kids_share_one_fetch(idp: IdentityProvider) -> None:
    jwks = Jwks(idp.url)  # not started: the first lookup fetches
    auth = jwks_auth(idp.url, jwks)
    tokens = [sign(RSA_KEY, "RS256", claims(), kid="rsa") for _ in range(20)]
    principals = await asyncio.gather(*(accepted(auth, t) for t in tokens))
    assert {p.user_id for p in principals} == {"alice"}
    assert idp.fetches == 1
    await jwks.stop()


@pytest.mark.parametrize(
    "failure", ["500", "garbage", "not an object", "empty", "encryption only", "server gone"]
)
async def test_a_failed_refresh_keeps_the_keys(idp: IdentityProvider, failure: str) -> None:
    async with started(Jwks(idp.url)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        await accepted(auth, sign(EC_KEY, "ES256", claims(), kid="ec"))
        if failure == "server gone":
            idp.stop()
        else:
            idp.mode = failure
        await jwks.refresh()
        if failure != "server gone":
            assert idp.fetches == 2  # the refresh did reach the provider
        for alg, (key, kid) in KEYS.items():
            await accepted(auth, sign(key, alg, claims(), kid=kid))


async def test_keys_are_refreshed_in_the_background(idp: IdentityProvider) -> None:
    new_key = ed25519.Ed25519PrivateKey.generate()
    async with started(Jwks(idp.url, refresh_s=0.05)) as jwks:
        auth = jwks_auth(idp.url, jwks)
        idp.keys = [jwk(new_key, "next")]

        async def new_key_works() -> bool:
            try:
                await accepted(auth, sign(new_key, "EdDSA", claims(), kid="next"))
            except AuthError:
                return False
            return True

        async def old_key_gone() -> bool:
            try:
                await accepted(auth, sign(RSA_KEY, "RS256", claims(), kid="rsa"))
            except AuthError:
                return True
            return False

        # no request can trigger these fetches (the unknown-kid interval is 30 s)
        await eventually(new_key_works, "the background refresh picks up the new key")
        await eventually(old_key_gone, "the background refresh drops the old key")


async def test_a_slow_identity_provider_never_blocks_the_event_loop(idp: IdentityProvider) -> None:
    idp.gate = threading.Event()
    jwks = Jwks(idp.url)
    auth = jwks_auth(idp.url, jwks)
    pending = asyncio.create_task(accepted(auth, sign(RSA_KEY, "RS256", claims(), kid="rsa")))

    async def request_arrived() -> bool:
        return idp.fetches == 1

    # this coroutine runs while the fetch is held open by the provider
    await eventually(request_arrived, "the JWKS request reaches the provider")
    assert not pending.done()
    idp.gate.set()
    assert (await pending).user_id == "alice"
    assert idp.released == [True]  # the provider was released by us, not by its timeout
    await jwks.stop()


# ---- wired into the app -----------------------------------------------------------------


def test_jwks_through_the_http_api(
    servers: Servers, add_users, snapshot, idp: IdentityProvider
) -> None:
    (alice,) = add_users(count=1)
    env = make_env(servers, SCORE_JWT_SECRET="", SCORE_JWT_JWKS_URL=idp.url)
    with TestClient(create_app(Settings.from_env(env)), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        assert idp.fetches == 1  # fetched at startup
        body = {"user_id": alice, "score_increase": 4}
        good = sign(EC_KEY, "ES256", claims(sub=alice), kid="ec")
        resp = c.post("/api/v1/score", json=body, headers={"Authorization": f"Bearer {good}"})
        assert resp.status_code == 200, resp.text
        before = snapshot()
        for forged in [
            compact({"alg": "none"}, claims(sub=alice)),
            hs256_with(public_pem(RSA_KEY), claims(sub=alice), kid="rsa"),
            sign(ATTACKER, "RS256", claims(sub=alice), jku=idp.base + "/x", kid="rsa"),
            sign(ATTACKER, "RS256", claims(sub=alice), kid="rsa"),
        ]:
            resp = c.post("/api/v1/score", json=body, headers={"Authorization": f"Bearer {forged}"})
            assert_problem(resp, 401)
            assert (
                resp.headers["WWW-Authenticate"]
                == 'Bearer realm="score-service", error="invalid_token"'
            )
        assert snapshot() == before


def test_a_removed_key_stops_its_long_lived_tokens_through_the_http_api(
    servers: Servers, add_users, idp: IdentityProvider
) -> None:
    (alice,) = add_users(count=1)
    env = make_env(servers, SCORE_JWT_SECRET="", SCORE_JWT_JWKS_URL=idp.url)
    with TestClient(create_app(Settings.from_env(env)), raise_server_exceptions=False) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the app")
        month = int(time.time()) + 30 * 24 * 3600
        token = sign(RSA_KEY, "RS256", claims(sub=alice, exp=month), kid="rsa")
        headers = {"Authorization": f"Bearer {token}"}
        body = {"user_id": alice, "score_increase": 4}
        assert c.post("/api/v1/score", json=body, headers=headers).status_code == 200
        idp.keys = [k for k in idp.keys if k["kid"] != "rsa"]
        jwks = c.app.state.ctx.auth.jwks  # type: ignore[attr-defined]
        c.portal.call(jwks.refresh)  # type: ignore[union-attr]  # the background refresh's call
        resp = c.post("/api/v1/score", json=body, headers=headers)
        assert_problem(resp, 401, "unknown key id")
