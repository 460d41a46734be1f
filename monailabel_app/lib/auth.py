"""Token checking that works with PyJWT 2 (MONAI Label 0.8.5's does not).

MONAI Label 0.8.5 calls ``jwt.decode(token, key, options=...)`` without ``algorithms``; PyJWT 2 (the version
installed, which fixed the algorithm-confusion attacks of 1.x) then rejects every token, so with
``MONAI_LABEL_AUTH_ENABLE`` on no one can log in. :func:`install` replaces MONAI Label's ``from_token`` with the
same function restricted to the asymmetric algorithms a realm (Keycloak) signs with.
"""

from __future__ import annotations

import jwt
from monailabel.config import settings
from monailabel.endpoints.user import auth

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def from_token(token: str) -> auth.User:
    """MONAI Label's :func:`monailabel.endpoints.user.auth.from_token`, with the signature algorithms given."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return auth.DEFAULT_USER
    key = auth.get_public_key(settings.MONAI_LABEL_AUTH_REALM_URI)
    payload = jwt.decode(token, key, algorithms=ALGORITHMS,
                         options={"verify_signature": True, "verify_aud": False, "verify_exp": True})
    roles: object = payload
    for part in settings.MONAI_LABEL_AUTH_TOKEN_ROLES.split("#"):
        roles = roles.get(part) if isinstance(roles, dict) else None
    return auth.User(
        username=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_USERNAME),
        email=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_EMAIL),
        name=payload.get(settings.MONAI_LABEL_AUTH_TOKEN_NAME),
        roles=list(roles) if isinstance(roles, list) else [],
    )


def install() -> None:
    """Use :func:`from_token` for every request (MONAI Label's dependency looks the name up per call)."""
    auth.from_token = from_token
