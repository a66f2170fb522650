"""Bearer-token authentication with pyjwt.

Algorithms are pinned to the configured key's type, `exp` is required, `iss`/`aud` are checked
when configured, and the headers RFC 8725 warns about (`jku`, `x5u`, `jwk`, `x5c`, `crit`) are
refused before any key is chosen. A verified token is cached until it expires: on the hot path
a client re-sends the same token many times, and verifying an RS256 signature costs far more
than the rest of the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from service.settings import ADMIN_SCOPE, Settings

log = logging.getLogger(__name__)

LEEWAY_S = 30
JWKS_REFRESH_S = 300.0
JWKS_UNKNOWN_KID_INTERVAL_S = 30.0
JWKS_FETCH_TIMEOUT_S = 5.0
CACHE_SIZE = 100_000
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
_ASYMMETRIC = {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "EdDSA", "PS256"}


class AuthError(Exception):
    """The token is missing or not acceptable; `str(exc)` says why (safe to show)."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    admin: bool
    expires_at: float


def algorithm_for(key: Any) -> str:
    """The one algorithm a public key may verify (no algorithm confusion)."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(f"unsupported public key type {type(key).__name__}")


class Jwks:
    """An identity provider's JWKS: fetched off the event loop, cached, rotated by `kid`.

    Keys are refreshed in the background; a failed refresh keeps the keys we have. A token
    with an unknown `kid` triggers at most one refetch per JWKS_UNKNOWN_KID_INTERVAL_S, so a
    flood of forged `kid`s cannot turn into a flood of requests to the identity provider.
    """

    def __init__(self, url: str) -> None:
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=int(JWKS_FETCH_TIMEOUT_S))
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch = -JWKS_UNKNOWN_KID_INTERVAL_S
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def refresh(self) -> None:
        async with self._lock:
            self._last_fetch = time.monotonic()
            try:
                jwk_set = await asyncio.to_thread(self._client.get_jwk_set, refresh=True)
            except (jwt.PyJWKClientError, jwt.InvalidKeyError, OSError) as exc:
                log.warning("JWKS refresh failed, keeping %d cached keys: %s", len(self._keys), exc)
                return
            self._keys = {k.key_id: k for k in jwk_set.keys if k.key_id}

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(JWKS_REFRESH_S)
            await self.refresh()

    async def key(self, kid: str) -> jwt.PyJWK:
        if kid not in self._keys and (
            time.monotonic() - self._last_fetch >= JWKS_UNKNOWN_KID_INTERVAL_S
        ):
            await self.refresh()
        try:
            return self._keys[kid]
        except KeyError:
            raise AuthError(f"unknown key id {kid!r}") from None


class Authenticator:
    """Verifies bearer tokens against the configured key sources."""

    def __init__(self, settings: Settings) -> None:
        self._secret = settings.jwt_secret
        self._public_key: Any = None
        self._public_alg: str | None = None
        if settings.jwt_public_key is not None:
            self._public_key = load_pem_public_key(settings.jwt_public_key)
            self._public_alg = algorithm_for(self._public_key)
        self.jwks = Jwks(settings.jwt_jwks_url) if settings.jwt_jwks_url else None
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        required = ["exp"]
        if self._issuer:
            required.append("iss")
        if self._audience:
            required.append("aud")
        self._options: dict[str, Any] = {"require": required}
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer ...` header, or AuthError."""
        if not authorization:
            raise AuthError("missing Authorization header: send 'Authorization: Bearer <JWT>'")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("the Authorization header must be 'Bearer <JWT>'")
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > time.time():
                return cached
            del self._cache[token]
        principal = await self._verify(token)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.popitem(last=False)
        self._cache[token] = principal
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("the bearer token is not a well-formed JWT") from None
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise AuthError(f"tokens with a '{name}' header are not accepted")
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self._secret is not None:
            key = self._secret
        elif alg in _ASYMMETRIC and self._public_key is not None and alg == self._public_alg:
            key = self._public_key
        elif alg in _ASYMMETRIC and self.jwks is not None and isinstance(header.get("kid"), str):
            jwk = await self.jwks.key(header["kid"])
            if jwk.algorithm_name != alg:
                raise AuthError(f"key {header['kid']!r} does not sign with {alg}")
            key = jwk.key
        else:
            raise AuthError(f"tokens signed with {alg!r} are not accepted here")
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
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        user_id = claims.get("sub") or claims.get("user_id")
        if not isinstance(user_id, str) or not user_id:
            raise AuthError("the token names no user: it needs a 'sub' or 'user_id' claim")
        scope = claims.get("scope")
        admin = isinstance(scope, str) and ADMIN_SCOPE in scope.split()
        exp = claims["exp"]
        if not isinstance(exp, int | float):
            raise AuthError("the token's 'exp' claim is not a number")
        return Principal(user_id, admin, float(exp) + LEEWAY_S)


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
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        private = load_pem_private_key(settings.jwt_private_key, password=None)
        alg = algorithm_for(private.public_key())
        return jwt.encode(claims, private, algorithm=alg)  # type: ignore[arg-type]
    if settings.jwt_secret is not None:
        return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
    raise AuthError(
        "cannot mint a token: set SCORE_JWT_PRIVATE_KEY (PEM) or SCORE_JWT_SECRET"
    )
