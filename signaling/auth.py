"""JWT verification and minting.

HS256 with the configured secret; RS256, or ES256/ES384/ES512 (by the EC key's curve), with
a configured PEM public key for tokens minted by an app's own backend. The algorithm is
chosen from the key that is configured for it, never from the token alone: ``alg: none``
and algorithm confusion (an HS256 token signed with the public key as secret) are refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from im_bridge.errors import Unauthorized
from im_bridge.ids import DEVICE_ID_RE, valid_user_id
from signaling.config import Config

_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True, slots=True)
class Claims:
    """Who a verified token speaks for."""

    user: str
    exp: int
    name: str | None = None
    device: str | None = None
    admin: bool = False


class TokenVerifier:
    """Verify bearer tokens; mint HS256 tokens for /api/login and tests (needs the secret).

    HS256 is accepted only with a configured secret: with a public key alone there is none
    (see Config.ensure_jwt_secret).
    """

    def __init__(self, config: Config) -> None:
        self.secret = config.jwt_secret
        self.public_key: Any = None
        self.public_algs: list[str] = []
        if config.jwt_public_key:
            with open(config.jwt_public_key, "rb") as fh:
                key = load_pem_public_key(fh.read())
            if isinstance(key, rsa.RSAPublicKey):
                self.public_algs = ["RS256"]
            elif isinstance(key, ec.EllipticCurvePublicKey):
                # Each ECDSA JWT algorithm is tied to one curve (RFC 7518 3.4): with any other
                # pairing no token could ever verify, so a key on another curve is refused.
                alg = _EC_ALGS.get(key.curve.name)
                if alg is None:
                    raise ValueError(
                        f"TALKBRIDGE_JWT_PUBLIC_KEY: EC curve {key.curve.name} is not supported"
                        " (P-256, P-384 or P-521, for ES256, ES384 or ES512)"
                    )
                self.public_algs = [alg]
            else:
                raise ValueError("TALKBRIDGE_JWT_PUBLIC_KEY must be an RSA or EC public key")
            self.public_key = key
        self.token_ttl = config.token_ttl
        # An app that mints tokens for several services tells ours apart by `aud`/`iss`;
        # unset, a token naming any audience is refused (PyJWT's rule: it is someone else's).
        self.audience = config.jwt_audience or None
        self.issuer = config.jwt_issuer or None
        self._required = ["exp", "sub"] + ["aud"] * bool(self.audience) + ["iss"] * bool(
            self.issuer
        )

    def verify(self, token: object) -> Claims:
        """The claims of a valid token; Unauthorized (with the reason) otherwise."""
        if not isinstance(token, str) or not token or len(token) > 8192:
            raise Unauthorized("missing or malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if alg == "HS256" and self.secret:
            key: Any = self.secret
            algs = ["HS256"]
        elif alg in self.public_algs:
            key, algs = self.public_key, self.public_algs
        else:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algs,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": self._required},
                leeway=5,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not valid_user_id(sub):
            raise Unauthorized("token 'sub' is not a valid user id")
        dev = claims.get("dev")
        # Device ids are stored with every message: one PostgreSQL cannot hold (a NUL)
        # would fail every batch its sends share (see ids.no_nul).
        if isinstance(dev, str) and dev and not DEVICE_ID_RE.fullmatch(dev):
            raise Unauthorized("token 'dev' must match [A-Za-z0-9_.:-]{1,64}")
        name = claims.get("name")
        return Claims(
            user=sub,
            exp=int(claims["exp"]),
            name=name if isinstance(name, str) else None,
            device=dev if isinstance(dev, str) and dev else None,
            admin=claims.get("admin") is True,
        )

    def mint(self, user: str, ttl: int | None = None, **extra: Any) -> tuple[str, int]:
        """An HS256 token for ``user`` and its expiry (unix seconds)."""
        if not self.secret:
            raise RuntimeError("no HS256 secret configured")
        exp = int(time.time()) + (ttl if ttl is not None else self.token_ttl)
        payload: dict[str, Any] = {"sub": user, "exp": exp, "iat": int(time.time()), **extra}
        if self.audience:
            payload["aud"] = self.audience
        if self.issuer:
            payload["iss"] = self.issuer
        return jwt.encode(payload, self.secret, algorithm="HS256"), exp
