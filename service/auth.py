"""Bearer-token authentication with pyjwt.

Algorithms are pinned to the configured key's type, `exp` is required, `iss`/`aud` are checked
when configured, and the headers RFC 8725 warns about (`jku`, `x5u`, `jwk`, `x5c`, `crit`) are
refused before any key is chosen: a token never names where its key comes from. A verified
token is cached until it expires: on the hot path a client re-sends the same token many times,
and verifying an RS256 signature costs far more than the rest of the request. A token verified
with a JWKS key is served from the cache only while that key is still the JWKS's key for its
`kid`: a key rotated out (or replaced under the same `kid`) takes its tokens with it. With
SCORE_JWT_MAX_AGE, a token must carry `iat` and is refused once it is older than that, however
far away its `exp` is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)
from jwt.types import Options

from service.settings import ADMIN_SCOPE, ConfigError, Settings, algorithm_for

log = logging.getLogger(__name__)

LEEWAY_S = 30
JWKS_REFRESH_S = 300.0
JWKS_UNKNOWN_KID_INTERVAL_S = 30.0
JWKS_FETCH_TIMEOUT_S = 5.0
CACHE_SIZE = 100_000
MAX_TOKEN_CHARS = 8192  # far above any real JWT; keeps parsing work bounded
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
_ASYMMETRIC = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class AuthError(Exception):
    """The token is missing or not acceptable; `str(exc)` says why (safe to show)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for, and until when (`exp` plus the leeway, or `iat` plus
    SCORE_JWT_MAX_AGE if that is sooner)."""

    user_id: str
    admin: bool
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Verified:
    """A cached verification: the principal, and the JWKS key that verified the token (None
    for the dev secret or the PEM public key, which do not rotate while we run)."""

    principal: Principal
    jwk: jwt.PyJWK | None


def _same_key(a: jwt.PyJWK, b: jwt.PyJWK) -> bool:
    """Whether two JWKs hold the same key material for the same algorithm and use (when in
    doubt, they do not: the tokens of a key taken for new are verified again, no more)."""
    try:
        return (a.algorithm_name, a.public_key_use, _material(a.key)) == (
            b.algorithm_name,
            b.public_key_use,
            _material(b.key),
        )
    except (AttributeError, TypeError, ValueError):  # a key type without a DER form
        return False


def _material(key: Any) -> bytes:
    if isinstance(key, bytes):  # an HMAC ("oct") key
        return key
    if hasattr(key, "private_bytes"):  # a JWKS that (wrongly) publishes a private key
        key = key.public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


class Jwks:
    """An identity provider's JWKS: fetched off the event loop, cached, rotated by `kid`.

    Keys are refreshed in the background; a failed refresh keeps the keys we have. A token
    with an unknown `kid` triggers at most one refetch per `unknown_kid_interval_s`, so a
    flood of forged `kid`s cannot turn into a flood of requests to the identity provider;
    requests that arrive while a fetch is under way wait for that one fetch. A refresh keeps
    the very `PyJWK` object of a key that did not change, and only of those: `holds` tells
    whether a key is still current.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_s: float = JWKS_REFRESH_S,
        unknown_kid_interval_s: float = JWKS_UNKNOWN_KID_INTERVAL_S,
        timeout_s: float = JWKS_FETCH_TIMEOUT_S,
    ) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        self._refresh_s = refresh_s
        self._unknown_kid_interval_s = unknown_kid_interval_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = float("-inf")
        self._fetching: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Fetch the keys once, then keep them fresh in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        """Stop the background refresh (and a fetch under way)."""
        for task in (self._task, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._fetching = None

    async def refresh(self) -> None:
        """Fetch the JWKS now, or join the fetch already under way."""
        if self._fetching is None:
            self._last_fetch = time.monotonic()
            self._fetching = asyncio.create_task(self._fetch())
        # shielded: a request that gives up must not cancel the fetch others wait for
        await asyncio.shield(self._fetching)

    async def _fetch(self) -> None:
        try:
            jwk_set = await asyncio.to_thread(self._client.get_jwk_set, refresh=True)
            keys = {
                k.key_id: k for k in jwk_set.keys if k.key_id and k.public_key_use in ("sig", None)
            }
            if not keys:
                raise jwt.PyJWKSetError("the JWKS holds no signing key with a 'kid'")
            for kid, new in keys.items():
                old = self._keys.get(kid)
                if old is not None and _same_key(old, new):
                    keys[kid] = old  # unchanged: the tokens it verified stay cached
            dropped = [kid for kid, old in self._keys.items() if keys.get(kid) is not old]
            if dropped:
                log.info("JWKS keys removed or replaced: %s", ", ".join(sorted(dropped)))
            self._keys = keys
        except Exception as exc:  # whatever went wrong (network, HTTP, JSON, keys): keep ours
            log.warning("JWKS refresh failed, keeping %d cached keys: %s", len(self._keys), exc)
        finally:
            self._fetching = None

    async def _refresh_forever(self) -> None:
        while True:
            # without any key, retry as often as an unknown kid would
            await asyncio.sleep(self._refresh_s if self._keys else self._unknown_kid_interval_s)
            await self.refresh()

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key with this `kid`, refetching the JWKS for an unknown one (rate-limited)."""
        if kid not in self._keys:
            if self._fetching is not None:
                await asyncio.shield(self._fetching)
            elif time.monotonic() - self._last_fetch >= self._unknown_kid_interval_s:
                await self.refresh()
        try:
            return self._keys[kid]
        except KeyError:
            raise AuthError(f"unknown key id {kid[:64]!r}") from None

    def holds(self, jwk: jwt.PyJWK) -> bool:
        """Whether `jwk` is still the key of its `kid` (not removed, nor replaced)."""
        return jwk.key_id is not None and self._keys.get(jwk.key_id) is jwk


class Authenticator:
    """Verifies bearer tokens against the configured key sources.

    HS256 tokens are checked with the dev secret. An asymmetric token is checked with a JWKS
    key when a JWKS is configured and the token names a `kid`, else with the configured
    public key, and only with the one algorithm that key's type allows.
    """

    def __init__(self, settings: Settings, *, jwks: Jwks | None = None) -> None:
        self._secret = settings.jwt_secret
        self._public_key: Any = None
        self._public_alg: str | None = None
        if settings.jwt_public_key is not None:
            self._public_key = load_pem_public_key(settings.jwt_public_key)
            self._public_alg = algorithm_for(self._public_key)
        if jwks is None and settings.jwt_jwks_url:
            jwks = Jwks(settings.jwt_jwks_url)
        self.jwks = jwks
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._max_age_s = settings.jwt_max_age_s
        required = ["exp"]
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        if self._max_age_s is not None:
            required.append("iat")
        self._options: Options = {"require": required}
        self._cache: OrderedDict[str, _Verified] = OrderedDict()

    def known(self, authorization: str | None) -> Principal | None:
        """The principal of an Authorization header whose token was verified before and is
        still valid, else None (then `authenticate`). No await: the hot path's usual case
        costs a dictionary lookup, not two coroutines."""
        if not authorization:
            return None
        cached = self._cache.get(authorization)
        if cached is None or not self._valid(cached):
            return None
        self._cache.move_to_end(authorization)
        return cached.principal

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer ...` header, or AuthError."""
        if not authorization:
            raise AuthError("missing Authorization header: send 'Authorization: Bearer <JWT>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <JWT>'")
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(f"the bearer token is longer than {MAX_TOKEN_CHARS} characters")
        # cached by the whole header: a header seen before needs no parsing (`known`)
        cached = self._cache.get(authorization)
        if cached is not None:
            if self._valid(cached):
                self._cache.move_to_end(authorization)
                return cached.principal
            del self._cache[authorization]  # expired, or its key was rotated out: verify again
        verified = await self._verify(token)
        self._cache[authorization] = verified
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return verified.principal

    def _valid(self, cached: _Verified) -> bool:
        return cached.principal.expires_at > time.time() and self._still_trusted(cached)

    def _still_trusted(self, cached: _Verified) -> bool:
        """Whether the key that verified a cached token is still current."""
        if cached.jwk is None:
            return True
        return self.jwks is not None and self.jwks.holds(cached.jwk)

    async def _verify(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"the bearer token is not a well-formed JWT: {exc}") from None
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise AuthError(f"tokens with a '{name}' header are not accepted")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError("the token's header names no algorithm ('alg')")
        key, jwk = await self._key_for(alg, header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,
                issuer=self._issuer,
                audience=self._audience,
                leeway=LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        user_id = claims["sub"] if "sub" in claims else claims.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            raise AuthError("the token names no user: it needs a 'sub' (or 'user_id') claim")
        scope = claims.get("scope")
        admin = isinstance(scope, str) and ADMIN_SCOPE in scope.split()
        exp = claims["exp"]
        if not _is_number(exp):
            raise AuthError("the token's 'exp' claim is not a number")
        expires_at = float(exp) + LEEWAY_S
        if self._max_age_s is not None:
            iat = claims["iat"]
            if not _is_number(iat):
                raise AuthError("the token's 'iat' claim is not a number")
            if time.time() - float(iat) > self._max_age_s:
                raise AuthError(
                    f"the token was issued more than {self._max_age_s} s ago "
                    "(SCORE_JWT_MAX_AGE): get a new one"
                )
            expires_at = min(expires_at, float(iat) + self._max_age_s)
        return _Verified(Principal(user_id, admin, expires_at), jwk)

    async def _key_for(self, alg: str, kid: object) -> tuple[Any, jwt.PyJWK | None]:
        """The key that may verify a token signed with `alg` (and the JWKS key it is, if it
        is one), or AuthError."""
        if alg == "HS256" and self._secret is not None:
            return self._secret, None
        if alg in _ASYMMETRIC:
            if self.jwks is not None and isinstance(kid, str) and kid:
                jwk = await self.jwks.key(kid)
                if jwk.algorithm_name != alg:
                    raise AuthError(f"key {kid[:64]!r} does not sign with {alg}")
                return jwk.key, jwk
            if self._public_key is not None and alg == self._public_alg:
                return self._public_key, None
            if self.jwks is not None:
                raise AuthError("the token names no key id ('kid') to pick a JWKS key by")
        raise AuthError(f"tokens signed with {alg[:16]!r} are not accepted here")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def mint(settings: Settings, user_id: str, *, admin: bool = False, ttl_s: int = 3600) -> str:
    """A token for `user_id`, signed with the configured private key or dev secret."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if admin:
        claims["scope"] = ADMIN_SCOPE
    if settings.jwt_private_key is not None:
        private = load_pem_private_key(settings.jwt_private_key, password=None)
        if not isinstance(
            private,
            rsa.RSAPrivateKey
            | ec.EllipticCurvePrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            raise ConfigError("SCORE_JWT_PRIVATE_KEY must be an RSA, EC or EdDSA key")
        return jwt.encode(claims, private, algorithm=algorithm_for(private))
    if settings.jwt_secret is not None:
        return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
    raise ConfigError("cannot mint a token: set SCORE_JWT_PRIVATE_KEY (PEM) or SCORE_JWT_SECRET")
