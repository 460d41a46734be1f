"""The module's server logic: which MONAI Label server to use, what to ask it, and the requests themselves.

No Qt and no MRML: every method may run in a worker thread, and the logic is tested without Slicer.
"""

from __future__ import annotations

from . import client as lmclient

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
MODEL_NAME = "langmamba_denoise"


def request_parameters(
    blend: float = 1.0, level: int = 2, device: str = "auto", explain: bool = True, top_k: int = 3
) -> dict:
    """The ``params`` JSON of an inference request (``blend`` in [0, 1]; ``top_k``: words listed per region)."""
    if not 0.0 <= float(blend) <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    return {
        "blend": float(blend),
        "level": int(level),
        "device": str(device),
        "explain": bool(explain),
        "top_k": int(top_k),
    }


def describe_info(info: dict) -> str:
    """One line for the status label: app name, models, LangMamba's settings and vocabulary size."""
    models = info.get("models") or {}
    model = models.get(MODEL_NAME) or {}
    config = model.get("config") or {}
    vocabulary = model.get("vocabulary") or config.get("vocabulary") or []
    parts = [f"Connected to {info.get('name') or 'MONAI Label'}", "models: " + ", ".join(sorted(models))]
    settings = ", ".join(
        f"{k}={'/'.join(map(str, config[k])) if isinstance(config[k], list) else config[k]}"
        for k in ("blend", "level", "device", "explain", "top_k")
        if k in config
    )
    if settings:
        parts.append(f"{MODEL_NAME} defaults: {settings}")
    if vocabulary:
        parts.append(f"vocabulary: {len(vocabulary)} words")
    return "; ".join(parts)


class ServerLogic:
    """Talks to one LangMamba MONAI Label server.

    Args:
        url: the server's base URL; :class:`~LangMambaDenoiseLib.client.ClientError` if malformed.
        timeout: seconds a request may wait for the server's next byte.
    """

    def __init__(self, url: str = DEFAULT_SERVER_URL, timeout: float = 600.0) -> None:
        self.timeout = float(timeout)
        self.client: lmclient.LangMambaClient | None = None
        self.setServerUrl(url)

    @property
    def serverUrl(self) -> str:
        return self.client.base_url

    def setServerUrl(self, url: str) -> None:
        """Use the server at ``url`` with the current :attr:`timeout`; the previous server is kept if malformed."""
        self.client = lmclient.LangMambaClient(url, timeout=self.timeout)

    def fetchInfo(self, cancel=None) -> dict:
        """``/info/`` of the server; ProtocolError if it has no ``langmamba_denoise`` model."""
        info = self.client.info(cancel=cancel)
        models = info.get("models") or {}
        if MODEL_NAME not in models:
            names = ", ".join(sorted(models)) or "none"
            raise lmclient.ProtocolError(f"the server offers no {MODEL_NAME} model (models: {names})")
        return info

    def requestDenoise(self, fileBytes: bytes, parameters: dict, progress=None, cancel=None):
        """Upload ``fileBytes`` (NRRD) and run the model. Returns the client's
        :class:`~LangMambaDenoiseLib.client.InferenceResult`."""
        return self.client.infer(
            MODEL_NAME,
            parameters,
            file_bytes=fileBytes,
            file_name="input.nrrd",
            output="all",
            progress=progress,
            cancel=cancel,
        )

    def requestDenoiseById(self, imageId: str, parameters: dict, progress=None, cancel=None):
        """Run the model on an image of the server's datastore (no upload). The server keeps the result as
        ``<imageId>_langmamba``; running again replaces that earlier result (``overwrite``), never another image."""
        return self.client.infer(
            MODEL_NAME,
            {**parameters, "overwrite": True},
            image_id=imageId,
            output="all",
            progress=progress,
            cancel=cancel,
        )
