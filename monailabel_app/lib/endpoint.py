"""``POST /infer/langmamba_denoise``: MONAI Label's infer contract, served without blocking the server.

MONAI Label 0.8.5's generic ``/infer/{model}`` route is an ``async`` function that runs inference inline, so
one denoising request (seconds to minutes on CPU) freezes every other call, ``/info/`` included; a failing
request returns a bare 500 and leaves its upload in the temporary folder. This module registers a route for
this one model, ahead of the generic one, with the same URL, query (``image``, ``output``), form fields
(``params``, ``file``), authentication (MONAI Label's RBAC dependency) and responses (``image``: the NRRD,
``json``: the result params, ``all``: MONAI Label's multipart of both), and adds:

- inference in a worker thread (the task's lock queues concurrent requests in order);
- a 4xx JSON body ``{"error": <kind>, "detail": <message>}`` for every bad request (413 too large, 415
  unsupported format, 422 bad or unknown parameters, 404 no such image, 409 the result would replace an
  existing entry, 429 queue full, 400 any other unusable input);
- upload size limits enforced while the body streams in, and removal of every temporary file;
- admission (:mod:`.admission`): a bounded queue and per-client limit, and cancellation between batches when
  the client disconnects;
- an audit record per request (:mod:`.audit`);
- a unique result name per request (``denoised-<hex>.nrrd``), so that clients saving under the response's file
  name (the stock MONAI Label client) never overwrite each other's results;
- responses streamed from files: the explanation document, which the task streams to a temporary file, goes into
  the response's ``params`` as ``explanations`` without ever being held in memory, as does the NRRD.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.exception import MONAILabelException
from requests_toolbelt import MultipartEncoder
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from langmamba.errors import (
    CancelledError,
    ConfigError,
    EmptyInputError,
    InputError,
    OverwriteError,
    UnsupportedFormatError,
    VolumeTooLargeError,
)
from langmamba.io.archive import extract_zip_series
from langmamba.io.formats import suffix_of

from .admission import TooBusyError, watch_disconnect
from .confine import ImageNotFoundError
from .task import DenoiseParams

logger = logging.getLogger(__name__)

MODEL = "langmamba_denoise"
ROUTE_NAME = "langmamba_denoise_infer"
OUTPUTS = ("image", "json", "all")
TIMINGS_HEADER = "X-LangMamba-Timings"  # the result's timings_s (seconds) with output=image, which has no params
_DRAIN_FACTOR = 4  # bodies up to this many times the limit are read and dropped so the client sees the 413
MAX_PARAMS_CHARS = 4096  # the params JSON: a handful of scalars
_BUSY_DRAIN_BYTES = 1 << 18  # a 429 reads at most _DRAIN_FACTOR times this much of the body first


class _BodyTooLarge(Exception):
    pass


def error_response(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


def status_of(err: Exception) -> int:
    """The HTTP status of a request that raised ``err``."""
    if isinstance(err, VolumeTooLargeError):
        return 413
    if isinstance(err, UnsupportedFormatError):
        return 415
    if isinstance(err, ConfigError):
        return 422
    if isinstance(err, ImageNotFoundError):
        return 404
    if isinstance(err, OverwriteError):
        return 409
    return 400


def parse_params(text: object) -> dict:
    """The request's params: a flat JSON object of known keys (:class:`ConfigError` otherwise, never a 500)."""
    if text is None or text == "":
        return {}
    if not isinstance(text, str):
        raise ConfigError("params must be a form field holding a JSON object, not a file")
    if len(text) > MAX_PARAMS_CHARS:
        raise ConfigError(f"params is longer than {MAX_PARAMS_CHARS} characters")
    try:
        params = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"params must be a JSON object ({type(err).__name__})") from err
    if not isinstance(params, dict):
        raise ConfigError("params must be a JSON object")
    unknown = sorted(set(params) - set(DenoiseParams.KEYS))
    if unknown:
        raise ConfigError(
            f"unknown params key(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; "
            f"known: {', '.join(DenoiseParams.KEYS)}"
        )
    return params


def result_name() -> str:
    """A file name for one response's result, unique per request."""
    return f"denoised-{uuid.uuid4().hex[:16]}.nrrd"


def _upload_suffix(filename: str | None) -> str:
    """The lower-case suffix of an uploaded file's name (``.nii.gz`` as one), if it is a plain one (checked
    later by the reader); else ``""``."""
    suffix = suffix_of(filename or "")
    return suffix if suffix == ".nii.gz" or re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ""


async def _read_form(request: Request, limit: int) -> Any:
    """The multipart form, refusing bodies above ``limit`` bytes (declared or actually streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge(int(declared))
    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(received)
        return message

    return await Request(request.scope, receive).form(max_files=2, max_fields=16)


async def _drain(request: Request, limit: int) -> None:
    """Read and drop the rest of a too-large body (bounded), so the client gets to read the error."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > _DRAIN_FACTOR * limit:
        return
    total = 0
    try:
        while total <= _DRAIN_FACTOR * limit:
            message = await request.receive()
            total += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
    except ClientDisconnect:
        return


async def _save_upload(upload: UploadFile, folder: Path, limit: int) -> Path:
    path = folder / f"upload{_upload_suffix(upload.filename)}"
    size = 0
    with open(path, "wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise VolumeTooLargeError(f"the upload is larger than this server's limit of {limit:,} bytes")
            out.write(chunk)
    if size == 0:
        raise EmptyInputError("the uploaded file is empty (0 bytes)")
    if path.suffix == ".zip":
        return extract_zip_series(path, folder / "series", max_bytes=4 * limit)
    return path


def _message(err: Exception, upload: Path | None, filename: str | None) -> str:
    """The error message with the server's temporary path replaced by the name the client sent."""
    text = str(err)
    if upload is not None:
        shown = f"uploaded file {Path(filename).name!r}" if filename else "the uploaded file"
        text = text.replace(str(upload), shown)
    return text


def _params_file(params: dict, explanations: Path | None) -> Path:
    """``params`` as a JSON object in a new temporary file, with the explanation document of the file
    ``explanations`` (or ``null``) as its last key ``explanations``, copied in without parsing it."""
    head = json.dumps({**{k: v for k, v in params.items() if k != "explanations"}, "explanations": None})
    fd, name = tempfile.mkstemp(prefix="langmamba-params-", suffix=".json")
    with open(fd, "w", encoding="utf-8") as out:
        if explanations is None:
            out.write(head)
        else:
            out.write(head[: -len("null}")])
            with open(explanations, encoding="utf-8") as document:
                shutil.copyfileobj(document, out, 1 << 20)
            out.write("}")
    return Path(name)


def _multipart(params: Path, image: Path, name: str, cleanup: BackgroundTask) -> StreamingResponse:
    """MONAI Label's ``output=all`` response: a ``params`` JSON part (the file ``params``) and an ``image`` file
    part called ``name``, streamed from the files."""
    # The handles stay open while the response streams and are closed once it is sent.
    params_handle, image_handle = open(params, "rb"), open(image, "rb")  # noqa: SIM115
    encoder = MultipartEncoder(
        fields={
            "params": (None, params_handle, "application/json"),
            "image": (name, image_handle, "application/octet-stream"),
        }
    )

    def chunks() -> Any:
        try:
            while chunk := encoder.read(1 << 20):
                yield chunk
        finally:
            params_handle.close()
            image_handle.close()

    return StreamingResponse(
        chunks(), media_type=encoder.content_type, headers={"Content-Length": str(encoder.len)}, background=cleanup
    )


def _remove(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            path.unlink(missing_ok=True)


def make_endpoint(app_getter):
    """The route's handler; ``app_getter()`` returns the running :class:`LangMambaApp`."""

    async def infer_langmamba(request: Request, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        instance = app_getter()
        arrived = time.time()
        peer = request.client.host if request.client else "unknown"
        who = user.username if settings.MONAI_LABEL_AUTH_ENABLE else "anonymous"
        image = request.query_params.get("image") or None
        outcome = {"status": 500, "kind": "InternalError", "saved": None}
        try:
            with instance.admission.place(who if settings.MONAI_LABEL_AUTH_ENABLE else peer):
                response = await _serve(instance, request, outcome)
        except TooBusyError as err:
            await _drain(request, _BUSY_DRAIN_BYTES)  # small bodies only: a refused upload costs no bandwidth
            outcome.update(status=429, kind="TooBusyError")
            response = error_response(429, "TooBusyError", str(err))
            response.headers["Retry-After"] = "10"
        finally:
            instance.audit.record(
                user=who,
                client=peer,
                image=image,
                status=outcome["status"],
                outcome=outcome["kind"],
                started=arrived,
                saved=outcome["saved"],
            )
        return response

    return infer_langmamba


async def _serve(instance, request: Request, outcome: dict) -> Response:
    """The request's response; ``outcome`` receives its status, kind (``ok`` or the error) and saved id."""

    def refuse(status: int, kind: str, detail: str) -> Response:
        outcome.update(status=status, kind=kind)
        return error_response(status, kind, detail)

    limit = instance.max_upload_bytes
    output = request.query_params.get("output") or "all"
    if output not in OUTPUTS:
        return refuse(422, "ConfigError", f"output must be one of {', '.join(OUTPUTS)}, got {output[:40]!r}")
    try:
        form = await _read_form(request, limit)
    except _BodyTooLarge:
        await _drain(request, limit)
        return refuse(
            413, "VolumeTooLargeError", f"the request body is larger than this server's upload limit of {limit:,} bytes"
        )
    except ClientDisconnect:
        return refuse(400, "InputError", "the client disconnected before the upload finished")
    except Exception as err:  # python-multipart raises several types for malformed bodies
        return refuse(400, "InputError", f"the request body is not a valid multipart form ({type(err).__name__})")

    work = Path(tempfile.mkdtemp(prefix="langmamba-request-"))
    upload_path = None
    upload = form.get("file")
    filename = upload.filename if isinstance(upload, UploadFile) else None
    cancel = threading.Event()
    watcher = asyncio.ensure_future(watch_disconnect(request, cancel))
    try:
        params = parse_params(form.get("params"))
        image = request.query_params.get("image", "")
        if isinstance(upload, UploadFile):
            upload_path = await _save_upload(upload, work, limit)
        elif upload:
            raise InputError("the form field 'file' must be a file upload")
        elif not image:
            raise InputError("give an image id (?image=...) or upload a file in the form field 'file'")
        infer_request = {
            **params,
            "model": MODEL,
            "image": image,
            "upload": str(upload_path or ""),
            "should_stop": cancel.is_set,
        }
        result = await run_in_threadpool(instance.infer, infer_request)
    except CancelledError:
        logger.info("denoise request cancelled: the client disconnected")
        return refuse(499, "CancelledError", "the client disconnected; the request was cancelled")
    except (InputError, ConfigError, OverwriteError) as err:
        logger.info("denoise request refused: %s", type(err).__name__)
        return refuse(status_of(err), type(err).__name__, _message(err, upload_path, filename))
    except MONAILabelException as err:
        return refuse(400, "MONAILabelException", str(err.msg))
    except Exception:
        logger.exception("denoise request failed")
        return refuse(500, "InternalError", "the server failed to denoise this volume; see its log")
    finally:
        watcher.cancel()
        form_close = getattr(form, "close", None)
        if form_close is not None:
            await form_close()
        shutil.rmtree(work, ignore_errors=True)

    saved = result["params"].get("saved") or {}
    outcome.update(status=200, kind="ok", saved=saved.get("image_id") or saved.get("series_uid"))
    result_file = Path(result["file"])
    explanations = Path(result["explanations_file"]) if result.get("explanations_file") else None
    name = result_name()
    if output == "image":
        _remove(explanations)
        timings = json.dumps(result["params"].get("timings_s", {}))
        return FileResponse(
            result_file,
            media_type="application/octet-stream",
            filename=name,
            headers={TIMINGS_HEADER: timings},
            background=BackgroundTask(_remove, result_file),
        )
    try:  # in a worker thread: the document may be hundreds of MB, and the server keeps answering meanwhile
        params = await run_in_threadpool(_params_file, result["params"], explanations)
    except BaseException:
        _remove(result_file)
        raise
    finally:
        _remove(explanations)
    if output == "json":
        _remove(result_file)
        return FileResponse(params, media_type="application/json", background=BackgroundTask(_remove, params))
    try:
        return _multipart(params, result_file, name, BackgroundTask(_remove, params, result_file))
    except BaseException:
        _remove(params, result_file)
        raise


def install_route(fastapi_app: FastAPI, app_getter) -> None:
    """Put this model's route in front of MONAI Label's generic ``/infer/{model}`` (replacing an earlier copy
    after ``/reload``)."""
    path = f"{settings.MONAI_LABEL_API_STR}/infer/{MODEL}"
    routes = fastapi_app.router.routes
    routes[:] = [r for r in routes if getattr(r, "name", None) != ROUTE_NAME]
    route = APIRoute(
        path,
        make_endpoint(app_getter),
        methods=["POST"],
        name=ROUTE_NAME,
        tags=["Infer"],
        summary="LangMamba denoising: NRRD image and/or explanations JSON",
    )
    routes.insert(0, route)
    fastapi_app.openapi_schema = None
