"""Bearer-token checking for the app (replaces MONAI Label 0.8.5's, which is unusable and too lenient).

MONAI Label 0.8.5 calls ``jwt.decode(token, key, options=...)`` without ``algorithms``, so PyJWT 2 refuses every
token, and it checks neither audience nor issuer and accepts tokens without ``exp``. :func:`from_token` checks:

- the signature, with the asymmetric algorithms a realm (Keycloak) signs with (RS*, PS*, ES*; never ``none`` or
  HMAC, so a token signed with the public key as an HMAC secret is refused);
- ``exp`` (required), ``iss`` (required, equal to the issuer) and ``aud`` (required, containing the audience),
  with a bounded clock skew;
- the key: pinned (``LANGMAMBA_AUTH_PUBLIC_KEY``: PEM text or a PEM file) or fetched once from the realm over
  HTTPS (a realm URL over plain HTTP is refused, since anyone on the path could substitute the key).

Environment (beside MONAI Label's ``MONAI_LABEL_AUTH_*``):

- ``LANGMAMBA_AUTH_ISSUER``: expected ``iss`` (default: ``MONAI_LABEL_AUTH_REALM_URI``, Keycloak's issuer);
- ``LANGMAMBA_AUTH_AUDIENCE``: expected ``aud`` (default: ``MONAI_LABEL_AUTH_CLIENT_ID``);
- ``LANGMAMBA_AUTH_PUBLIC_KEY``: the realm's public key, pinned;
- ``LANGMAMBA_AUTH_LEEWAY_S``: allowed clock skew in seconds (default 30, at most 300).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import jwt
import requests
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.endpoints.user import auth

logger = logging.getLogger(__name__)

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
MAX_LEEWAY_S = 300
DEFAULT_LEEWAY_S = 30


@dataclass(frozen=True)
class TokenPolicy:
    """What a token must satisfy: ``issuer``, ``audience``, clock skew ``leeway_s`` (seconds), and the realm's
    key (``pinned_key`` PEM, else fetched from ``realm_uri``, which must be HTTPS)."""

    issuer: str
    audience: str
    leeway_s: float = DEFAULT_LEEWAY_S
    pinned_key: str | None = None
    realm_uri: str = ""

    @classmethod
    def from_env(cls) -> TokenPolicy:
        leeway = float(os.environ.get("LANGMAMBA_AUTH_LEEWAY_S", DEFAULT_LEEWAY_S))
        if not 0 <= leeway <= MAX_LEEWAY_S:
            raise ValueError(f"LANGMAMBA_AUTH_LEEWAY_S must be 0..{MAX_LEEWAY_S} seconds, got {leeway}")
        pinned = os.environ.get("LANGMAMBA_AUTH_PUBLIC_KEY", "").strip() or None
        if pinned and not pinned.startswith("-----BEGIN"):
            pinned = Path(pinned).expanduser().read_text().strip()
        realm = settings.MONAI_LABEL_AUTH_REALM_URI
        return cls(
            issuer=os.environ.get("LANGMAMBA_AUTH_ISSUER", realm),
            audience=os.environ.get("LANGMAMBA_AUTH_AUDIENCE", settings.MONAI_LABEL_AUTH_CLIENT_ID),
            leeway_s=leeway,
            pinned_key=pinned,
            realm_uri=realm,
        )


_keys: dict[str, str] = {}
_keys_lock = threading.Lock()


def realm_key(policy: TokenPolicy) -> str:
    """The PEM public key tokens are checked with: the pinned one, or the realm's (HTTPS only, fetched once)."""
    if policy.pinned_key:
        return policy.pinned_key
    if not policy.realm_uri.lower().startswith("https://"):
        logger.error(
            "auth: the realm URL is not HTTPS and no key is pinned (LANGMAMBA_AUTH_PUBLIC_KEY); refusing every token"
        )
        raise HTTPException(
            status_code=503,
            detail="the server's token key is not configured securely (the realm URL must be HTTPS, or the key pinned)",
        )
    with _keys_lock:
        if policy.realm_uri not in _keys:
            try:
                response = requests.get(policy.realm_uri, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT)
                response.raise_for_status()
                key = response.json()["public_key"]
            except (requests.RequestException, ValueError, KeyError) as err:
                logger.error("auth: the realm's public key could not be fetched (%s)", type(err).__name__)
                raise HTTPException(status_code=503, detail="the realm's public key could not be fetched") from err
            _keys[policy.realm_uri] = f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----"
        return _keys[policy.realm_uri]


def decode(token: str, policy: TokenPolicy) -> dict:
    """The claims of ``token``; :class:`jwt.InvalidTokenError` when any check of :class:`TokenPolicy` fails."""
    return jwt.decode(
        token,
        realm_key(policy),
        algorithms=ALGORITHMS,
        audience=policy.audience,
        issuer=policy.issuer,
        leeway=policy.leeway_s,
        options={
            "verify_signature": True,
            "verify_exp": True,
            "verify_aud": True,
            "verify_iss": True,
            "require": ["exp", "iss", "aud"],
        },
    )


def from_token(token: str) -> auth.User:
    """MONAI Label's :func:`monailabel.endpoints.user.auth.from_token`, with every check of :func:`decode`."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    payload = decode(token, TokenPolicy.from_env())
    roles: object = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    username = payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME) or payload.get("sub")
    if not isinstance(username, str) or not username:
        raise jwt.MissingRequiredClaimError(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME)
    return auth.User(
        username=username,
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=[r for r in roles if isinstance(r, str)] if isinstance(roles, list) else [],
    )


def install() -> None:
    """Use :func:`from_token` for every request (MONAI Label's dependency looks the name up per call), and check
    the token settings now so that a bad value stops the start rather than every request."""
    if settings.MONAI_LABEL_AUTH_ENABLE:
        TokenPolicy.from_env()
    auth.from_token = from_token
