"""Only the routes the product needs, CORS off unless an origin allow-list is set, docs behind auth when it is on.

MONAI Label 0.8.5 serves ~50 routes, among them writes and deletes of datastore images and labels (with ids that
may be paths), model upload, training, batch inference (inline, freezing the server), sessions, its log file,
a DICOMweb proxy that forwards the server's own PACS credentials, and ``/reload``, several open to the lowest
role. This app keeps (GET unless named):

- ``/info/``, ``POST /infer/langmamba_denoise`` (the app's own route) and ``/datastore/`` (the image list);
- ``/auth/...`` (token login through the realm) when authentication is on;
- ``/``, ``/docs``, ``/openapi.json`` (API docs; with authentication on they need a valid token of the user
  role), ``/favicon.ico`` and ``/static`` (MONAI Label's packaged files).

MONAI Label adds a CORS middleware that allows every origin with credentials when ``MONAI_LABEL_CORS_ORIGINS``
is empty; this app removes it then, so browsers refuse cross-origin calls. With an allow-list, only those
origins are allowed.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC
from starlette.routing import Mount

logger = logging.getLogger(__name__)

DOC_PATHS = ("/", "/docs", "/openapi.json")


def _kept(route: object, own: set[str]) -> bool:
    api = settings.MONAI_LABEL_API_STR
    if isinstance(route, Mount):
        return route.path == "/static"
    name = getattr(route, "name", None)
    path = getattr(route, "path", "")
    methods = getattr(route, "methods", None) or set()
    if name in own:
        return True
    if path in (f"{api}/info/", f"{api}/datastore/", "/favicon.ico") and methods <= {"GET", "HEAD"}:
        return True
    return settings.MONAI_LABEL_AUTH_ENABLE and path.startswith(f"{api}/auth/")


def _docs_routes(app: FastAPI) -> list[APIRoute]:
    """``/``, ``/docs`` and ``/openapi.json``, behind the user role when authentication is on."""
    dependencies = [Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))] if settings.MONAI_LABEL_AUTH_ENABLE else []

    async def swagger():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - APIs")

    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)

    async def openapi():
        return JSONResponse(app.openapi())

    return [APIRoute(path, endpoint, methods=["GET"], name=f"langmamba_docs_{index}", include_in_schema=False,
                     dependencies=dependencies)
            for index, (path, endpoint) in enumerate(zip(DOC_PATHS, (swagger, redoc, openapi)))]


def restrict_routes(app: FastAPI, own: set[str]) -> list[str]:
    """Drop every route the product does not need (``own``: names of this app's routes, kept); returns the
    paths removed."""
    app.openapi_url = None  # FastAPI's own /openapi.json (unauthenticated) is replaced by the one below
    app.docs_url = app.redoc_url = None
    routes = app.router.routes
    removed = [getattr(r, "path", "?") for r in routes if not _kept(r, own)]
    docs = _docs_routes(app)
    routes[:] = docs + [r for r in routes if _kept(r, own) and getattr(r, "path", None) not in DOC_PATHS]
    app.openapi_schema = None
    logger.info("routes off: %d stock MONAI Label routes not served", len(removed))
    return removed


def configure_cors(app: FastAPI) -> None:
    """Keep MONAI Label's CORS middleware only with an explicit origin allow-list (``MONAI_LABEL_CORS_ORIGINS``)."""
    origins = [str(o).rstrip("/") for o in settings.MONAI_LABEL_CORS_ORIGINS or []]
    kept = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    if origins:
        from starlette.middleware import Middleware

        kept.append(Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=True,
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app.user_middleware[:] = kept
    app.middleware_stack = app.build_middleware_stack()
    logger.info("CORS: %s", f"allowed for {len(origins)} origin(s)" if origins else "off (no origin allow-list)")
