"""REST client of the LangMamba MONAI Label server (Python standard library only).

The stock MONAI Label Slicer plugin asks for ``.nrrd``/uint8 results and loads them as segmentations;
LangMamba returns a float32 or int16 HU volume plus an explanation document, so this client talks to
the REST API directly:

- ``GET /info/``: the app's name, its models (``langmamba_denoise`` with its config and vocabulary).
- ``POST /infer/<model>?image=<id>&output=all``: multipart form with ``params`` (JSON string) and an
  optional ``file`` (the input volume as NRRD). The answer is MONAI Label's multipart/form-data with a
  ``params`` part (JSON; ``"explanations"`` holds the explanation document) and an image part (NRRD).

Every failure becomes a :class:`ClientError` subclass with a one-line message for the user's panel.
Requests can be cancelled from another thread with a :class:`CancelToken` (it closes the socket, so a
request blocked on a slow server returns at once). The multipart answer is parsed with the ``email``
package (``cgi`` is gone from Python 3.13).
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import http.client
import json
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode, urlsplit

ProgressCallback = Callable[[str, float | None], None]
"""``progress(phase, fraction)``: phase ``"upload"``, ``"server"`` or ``"download"``; fraction in
[0, 1] or ``None`` when unknown."""

_CHUNK = 1 << 20


class ClientError(Exception):
    """A request to the server failed; ``str(error)`` is a one-line message for the user."""


class ServerUnreachableError(ClientError):
    """No server answers at the URL (refused, unknown host, network down)."""


class ServerTimeoutError(ClientError):
    """The server did not answer within the timeout."""


class ServerResponseError(ClientError):
    """The server answered with an HTTP error status."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status, self.reason, self.detail = status, reason, detail
        super().__init__(f"server error {status} {reason}: {detail}" if detail else f"server error {status} {reason}")


class ProtocolError(ClientError):
    """The server's answer is not what the API promises (wrong content type, missing part ...)."""


class RequestCancelled(ClientError):
    """The user cancelled the request."""


class CancelToken:
    """Cancels a running request from another thread: sets a flag and shuts its socket down."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        self._event.set()
        with self._lock:
            sock = self._connection.sock if self._connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def attach(self, connection: http.client.HTTPConnection | None) -> None:
        with self._lock:
            self._connection = connection

    def check(self) -> None:
        if self.cancelled:
            raise RequestCancelled("cancelled")


@dataclass
class InferenceResult:
    """The server's answer: ``params`` (the result JSON, ``{}`` if none), the image bytes (``None`` if
    none), the image part's file name and content type."""

    params: dict = field(default_factory=dict)
    image: bytes | None = None
    image_name: str = ""
    image_type: str = ""

    @property
    def explanation(self) -> dict | None:
        """The explanation document (``params["explanations"]``), if the server sent one."""
        document = self.params.get("explanations")
        return document if isinstance(document, dict) else None


def _detail(body: bytes) -> str:
    """The human part of an error body: FastAPI's ``{"detail": ...}`` or the first line of text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text.splitlines()[0][:300] if text else ""
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list):
        detail = "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    return str(detail)[:300]


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str, str, bytes]]:
    """Parts of a multipart/form-data body: ``name -> (filename, content type, bytes)``."""
    header = f"MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise ProtocolError(f"expected a multipart answer, got {content_type!r}")
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True)
        parts[str(name)] = (part.get_filename() or "", part.get_content_type(), payload or b"")
    return parts


class LangMambaClient:
    """Client of one MONAI Label server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (http or https; a path prefix is kept).
        timeout: seconds to wait for any answer of the server (an inference on CPU can take minutes).
        connect_timeout: seconds to wait for the connection itself.
    """

    def __init__(self, base_url: str, timeout: float = 600.0, connect_timeout: float = 10.0) -> None:
        url = (base_url or "").strip()
        if "://" not in url:
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"not a server URL: {base_url!r} (expected e.g. http://127.0.0.1:8000)")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            raise ClientError(f"not a server URL: {base_url!r} ({error})") from None
        self.scheme, self.host = parts.scheme, parts.hostname
        self.prefix = parts.path.rstrip("/")
        self.base_url = f"{parts.scheme}://{parts.netloc}{self.prefix}"
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)

    # --- API ------------------------------------------------------------------------------------

    def info(self, cancel: CancelToken | None = None) -> dict:
        """``GET /info/``: the app's description (``name``, ``models`` ...)."""
        status, headers, body = self._request("GET", "/info/", cancel=cancel)
        return _json_object(body, "the answer of /info/")

    def infer(
        self,
        model: str,
        params: dict,
        *,
        file_bytes: bytes | None = None,
        file_name: str = "input.nrrd",
        image_id: str = "",
        output: str = "all",
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> InferenceResult:
        """``POST /infer/<model>``: run the model on an uploaded volume (``file_bytes``) or on the
        datastore image ``image_id``.

        Args:
            model: the model's name in ``/info/`` (``langmamba_denoise``).
            params: the inference parameters, sent as the JSON form field ``params``.
            file_bytes: the input volume's file (NRRD by default); ``file_name``'s suffix tells the
                server its format.
            image_id: a datastore image id, used when no file is sent.
            output: ``all`` (image and JSON), ``image`` or ``json``.
        """
        if file_bytes is None and not image_id:
            raise ClientError("nothing to denoise: give an input volume or a datastore image id")
        if output not in ("all", "image", "json"):
            raise ClientError(f"output must be all, image or json, got {output!r}")
        boundary = uuid.uuid4().hex
        head = _form_field(boundary, "params", json.dumps(params))
        if file_bytes is not None:
            head += (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            chunks = [head, file_bytes, f"\r\n--{boundary}--\r\n".encode("ascii")]
        else:
            chunks = [head, f"--{boundary}--\r\n".encode("ascii")]
        query = urlencode({"image": image_id, "output": output})
        status, headers, body = self._request(
            "POST",
            f"/infer/{quote(model, safe='')}?{query}",
            chunks=chunks,
            content_type=f"multipart/form-data; boundary={boundary}",
            progress=progress,
            cancel=cancel,
        )
        content_type = headers.get("content-type", "")
        if content_type.startswith("multipart/"):
            parts = parse_multipart(body, content_type)
            result = InferenceResult()
            if "params" in parts:
                result.params = _json_object(parts["params"][2], "the params part")
            for name, (filename, ctype, payload) in parts.items():
                if name != "params":
                    result.image, result.image_name, result.image_type = payload, filename, ctype
            return result
        if content_type.startswith("application/json"):
            return InferenceResult(params=_json_object(body, "the answer"))
        disposition = headers.get("content-disposition", "")
        name = disposition.split("filename=", 1)[1].strip('"; ') if "filename=" in disposition else ""
        return InferenceResult(image=body, image_name=name, image_type=content_type)

    # --- transport ------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=self.connect_timeout)

    def _request(
        self,
        method: str,
        path: str,
        *,
        chunks: list[bytes] | None = None,
        content_type: str = "",
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        cancel = cancel or CancelToken()
        cancel.check()
        connection = self._connection()
        cancel.attach(connection)
        where = f"{self.base_url}{path.split('?')[0]}"
        try:
            connection.connect()
            connection.sock.settimeout(self.timeout)
            cancel.check()
            connection.putrequest(method, self.prefix + path)
            connection.putheader("Accept", "*/*")
            if chunks is not None:
                total = sum(len(c) for c in chunks)
                connection.putheader("Content-Type", content_type)
                connection.putheader("Content-Length", str(total))
            connection.endheaders()
            if chunks is not None:
                sent = 0
                for chunk in chunks:
                    view = memoryview(chunk)
                    for start in range(0, len(view), _CHUNK):
                        cancel.check()
                        piece = view[start : start + _CHUNK]
                        connection.send(piece)
                        sent += len(piece)
                        if progress:
                            progress("upload", sent / total)
            if progress:
                progress("server", None)
            response = connection.getresponse()
            length = response.getheader("Content-Length")
            expected = int(length) if length and length.isdigit() else 0
            body = bytearray()
            while True:
                cancel.check()
                piece = response.read(_CHUNK)
                if not piece:
                    break
                body += piece
                if progress:
                    progress("download", min(1.0, len(body) / expected) if expected else None)
            cancel.check()
            headers = {k.lower(): v for k, v in response.getheaders()}
            if response.status >= 400:
                raise ServerResponseError(response.status, response.reason, _detail(bytes(body)))
            if expected and len(body) != expected:
                raise ProtocolError(f"{where}: the answer was cut off ({len(body)} of {expected} bytes)")
            return response.status, headers, bytes(body)
        except ClientError:
            raise
        except TimeoutError:
            if cancel.cancelled:
                raise RequestCancelled("cancelled") from None
            raise ServerTimeoutError(f"{where}: no answer within {self.timeout:g} s") from None
        except (ConnectionRefusedError, socket.gaierror) as error:
            raise ServerUnreachableError(f"no server at {self.base_url} ({_reason(error)})") from None
        except (OSError, http.client.HTTPException) as error:
            if cancel.cancelled:
                raise RequestCancelled("cancelled") from None
            raise ServerUnreachableError(f"{where}: connection failed ({_reason(error)})") from None
        finally:
            cancel.attach(None)
            connection.close()


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _form_field(boundary: str, name: str, value: str) -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()


def _json_object(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as error:
        raise ProtocolError(f"{what} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return value
