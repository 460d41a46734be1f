"""Only the routes the product needs, CORS off unless an origin allow-list is set, docs behind auth when it is on.

MONAI Label 0.8.5 serves ~50 routes, among them writes and deletes of datastore images and labels (with ids that
may be paths), model upload, training, batch inference (inline, freezing the server), sessions, its log file,
a DICOMweb proxy that forwards the server's own PACS credentials, and ``/reload``, several open to the lowest
role. :class:`RouteGate` (an ASGI middleware in front of every route) answers 404 to all but (GET and HEAD unless
named):

- ``/info/``, ``POST /infer/langmamba_denoise`` (the app's own route) and ``/datastore/`` (the image list);
- ``/auth/...`` (token login through the realm) when authentication is on;
- ``/``, ``/docs``, ``/openapi.json`` (API docs, listing only these routes; with authentication on they need a
  bearer token of the user role), ``/favicon.ico`` and ``/static/...`` (MONAI Label's packaged files).

MONAI Label adds a CORS middleware that allows every origin with credentials when ``MONAI_LABEL_CORS_ORIGINS``
is empty (and 0.8.5 fails to start when it is set: it cannot print the parsed URLs). :func:`secure_app` removes
it; with the app's own allow-list (``--conf cors_origins https://viewer.example,https://other.example``) only
those origins are allowed, else none, so browsers refuse cross-origin calls.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from monailabel.config import settings
from starlette.middleware import Middleware

from langmamba.errors import ConfigError

logger = logging.getLogger(__name__)

DOC_PATHS = ("/", "/docs", "/openapi.json")
READ = frozenset({"GET", "HEAD"})


def allowed(method: str, path: str) -> bool:
    """Whether ``method path`` is one of the routes this app serves."""
    api = settings.MONAI_LABEL_API_STR
    if method == "POST" and path == f"{api}/infer/langmamba_denoise":
        return True
    if settings.MONAI_LABEL_AUTH_ENABLE and path.startswith(f"{api}/auth/") and method in READ | {"POST"}:
        return True
    if method not in READ:
        return False
    return path in (f"{api}/info/", f"{api}/datastore/", "/favicon.ico", *DOC_PATHS) or path.startswith("/static/")


class RouteGate:
    """ASGI middleware: 404 for every route :func:`allowed` refuses; for the docs, with auth on, a valid token of the
    user role."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        root = scope.get("root_path") or ""
        if root and path.startswith(root):  # behind a proxy prefix (--root_path), routes are matched without it
            path = path[len(root) :] or "/"
        if not allowed(method, path):
            return await _json(send, 404, {"error": "NotFound", "detail": "no such route on this server"})
        if path in DOC_PATHS and settings.MONAI_LABEL_AUTH_ENABLE and not _valid_bearer(scope):
            return await _json(
                send,
                401,
                {"error": "Unauthorized", "detail": "the API docs need a valid token"},
                {"www-authenticate": "Bearer"},
            )
        return await self.app(scope, receive, send)


def _valid_bearer(scope) -> bool:
    from monailabel.endpoints.user import auth

    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    if not header.lower().startswith("bearer "):
        return False
    try:
        user = auth.from_token(header[7:].strip())
    except Exception:  # any invalid token (PyJWT's errors, an unreachable key) means no access
        return False
    return settings.MONAI_LABEL_AUTH_ROLE_USER in user.roles


async def _json(send, status: int, body: dict, headers: dict | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def _filtered_openapi(app: FastAPI, original):
    def openapi() -> dict:
        schema = original()
        schema["paths"] = {
            path: {m: op for m, op in ops.items() if allowed(m.upper(), path)}
            for path, ops in schema.get("paths", {}).items()
        }
        schema["paths"] = {path: ops for path, ops in schema["paths"].items() if ops}
        return schema

    return openapi


def parse_origins(text: str) -> list[str]:
    """The comma-separated origin allow-list (``scheme://host[:port]`` each; no wildcard, no path)."""
    origins = []
    for origin in filter(None, (o.strip().rstrip("/") for o in (text or "").split(","))):
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or "*" in origin or parts.path or parts.query:
            raise ConfigError(f"cors_origins: {origin!r} is not an origin like https://viewer.example:8443")
        origins.append(origin)
    return origins


def secure_app(app: FastAPI, origins: list[str]) -> None:
    """Put :class:`RouteGate` in front of every route, allow CORS for ``origins`` only (none: CORS off), and list
    only the served routes in the API docs."""
    kept = [m for m in app.user_middleware if m.cls not in (CORSMiddleware, RouteGate)]
    if origins:
        kept.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_credentials=True,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    kept.append(Middleware(RouteGate))
    app.user_middleware[:] = kept
    app.middleware_stack = app.build_middleware_stack()
    if not getattr(app.openapi, "langmamba_filtered", False):
        app.openapi = _filtered_openapi(app, app.openapi)
        app.openapi.langmamba_filtered = True
    app.openapi_schema = None
    logger.info(
        "CORS: %s; stock MONAI Label routes other than info, datastore list and docs are off",
        f"allowed for {len(origins)} origin(s)" if origins else "off (no origin allow-list)",
    )
