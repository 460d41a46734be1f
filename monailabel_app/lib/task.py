"""The ``langmamba_denoise`` infer task: a CT volume in, the denoised CT (same geometry) and explanations out.

MONAI Label's task types are segmentation-centred; this one is of type ``others`` and returns an *image*: a
float32 NRRD in HU on the input's exact voxel grid (spacing, origin, direction), plus the explanation document
of :func:`langmamba.explain.explain_volume` in the result's ``params``. Geometry never passes through MONAI
transforms (``ToNumpyd`` would drop the affine): volumes stay :class:`langmamba.io.CTVolume` from reading to
writing.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from langmamba.checkpoint import load_checkpoint
from langmamba.denoise import denoise_volume
from langmamba.errors import CancelledError, ConfigError
from langmamba.explain import explain_volume
from langmamba.infer import resolve_device
from langmamba.io import CTVolume, read_volume, write_volume


logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
MAX_TOP_K = 5


@dataclass
class DenoiseParams:
    """Request parameters: ``blend`` in [0, 1], explanation ``level`` (0 = coarsest), ``device``, ``explain``,
    ``top_k`` words per explained region, ``save`` the result of a datastore image (``None``: the server's
    default), ``overwrite`` an earlier saved result of the same image."""

    blend: float = 1.0
    level: int = 2
    device: str = "auto"
    explain: bool = True
    top_k: int = 1
    save: bool | None = None
    overwrite: bool = False

    # what a client may send in params: the fields above, and the stock MONAI Label client's client_id
    KEYS: ClassVar[tuple[str, ...]] = ("blend", "level", "device", "explain", "top_k", "save", "overwrite",
                                       "client_id")

    @classmethod
    def from_request(cls, request: dict[str, Any], levels: int) -> DenoiseParams:
        """Validate the request's values; :class:`ConfigError` names the first bad key."""
        params = cls()
        if "blend" in request:
            blend = request["blend"]
            if isinstance(blend, bool) or not isinstance(blend, (int, float)) or not 0.0 <= float(blend) <= 1.0:
                raise ConfigError(f"blend must be a number between 0 and 1, got {blend!r}")
            params.blend = float(blend)
        if "level" in request:
            level = request["level"]
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < levels:
                raise ConfigError(f"level must be an integer from 0 to {levels - 1}, got {level!r}")
            params.level = level
        if "device" in request:
            device = request["device"]
            # MONAI Label fills absent keys from /info/'s config, where a choice list stands for its first entry
            device = device[0] if isinstance(device, list) and device else device
            if device not in DEVICES:
                raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
            if device == "cuda" and not torch.cuda.is_available():
                raise ConfigError("device 'cuda' was requested but this server has no CUDA GPU; use 'auto' or 'cpu'")
            params.device = device
        for key in ("explain", "save", "overwrite"):
            if key in request:
                if not isinstance(request[key], bool):
                    raise ConfigError(f"{key} must be true or false, got {request[key]!r}")
                setattr(params, key, request[key])
        if "top_k" in request:
            top_k = request["top_k"]
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
                raise ConfigError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
            params.top_k = top_k
        return params


@dataclass
class DenoiseResult:
    """What one request produced: the input and denoised volumes, the explanation document (or ``None``)
    and the response summary (parameters, device, timings in seconds)."""

    source: CTVolume
    denoised: CTVolume
    explanations: dict | None
    summary: dict = field(default_factory=dict)


class LangMambaDenoise(InferTask):
    """Denoise a CT volume with the shipped LangMamba weights; optionally explain one pyramid level.

    One model instance serves every request; a lock runs one inference at a time (the model moves between
    devices per request, and on CPU parallel runs would only split the same cores), so concurrent requests
    queue in arrival order while the server keeps answering other calls.
    """

    def __init__(self, weights: Path, *, max_voxels: int = 512 * 512 * 2000, batch_size: int = 4) -> None:
        self.weights = Path(weights)
        self.model = load_checkpoint(self.weights)
        self.max_voxels = max_voxels
        self.batch_size = batch_size
        self._lock = threading.Lock()
        langae = getattr(self.model, "langae", self.model)
        self.levels = int(langae.quantizer.num_levels)
        self.vocabulary = [str(w) for w in getattr(langae, "vocabulary", None) or []]
        super().__init__(
            type=InferType.OTHERS,
            labels={},
            dimension=3,
            description="LangMamba low-dose CT denoising (image output: float32 HU, input geometry) with "
            "per-region word explanations",
            config={"blend": 1.0, "level": self.levels - 1, "device": list(DEVICES), "explain": True, "top_k": 1},
        )

    def is_valid(self) -> bool:
        return (self.weights / "config.json").is_file()

    def info(self) -> dict[str, Any]:
        info = super().info()
        info.update(
            {
                "output": "image",
                "output_format": "nrrd (float32, HU, same voxel grid as the input)",
                "levels": self.levels,
                "vocabulary": self.vocabulary,
                "weights": self.weights.name,
                "params": {
                    "blend": "0..1, mix of denoised (1) and input (0)",
                    "level": f"explanation pyramid level 0..{self.levels - 1} (0 = coarsest, 2x2 regions)",
                    "device": "auto (CUDA when present) | cpu | cuda",
                    "explain": "add the explanation document to the response params",
                    "top_k": f"words listed per region, 1..{MAX_TOP_K}",
                },
            }
        )
        return info

    def read(self, path: str | Path) -> CTVolume:
        """The CT volume at ``path`` (file or DICOM folder), read from that file or folder alone (no detached data
        files, no links), refusing declared sizes above ``max_voxels`` float32 voxels before allocating them."""
        return read_volume(path, confined=True, max_bytes=4 * self.max_voxels)

    def _acquire(self, should_stop: Callable[[], bool] | None) -> None:
        """Wait for the model lock; give up (:class:`CancelledError`) as soon as ``should_stop()`` is true."""
        while not self._lock.acquire(timeout=0.25):
            if should_stop is not None and should_stop():
                raise CancelledError("the request was cancelled while it waited in the queue")

    def run(self, volume: CTVolume, params: DenoiseParams,
            should_stop: Callable[[], bool] | None = None) -> DenoiseResult:
        """Denoise ``volume`` (and explain ``params.level``) under the model lock; ``should_stop`` is checked
        while queued and between batches (:class:`CancelledError`)."""
        queued = time.perf_counter()
        self._acquire(should_stop)
        try:
            started = time.perf_counter()
            device = str(resolve_device(params.device))
            denoised = denoise_volume(self.model, volume, blend=params.blend, batch_size=self.batch_size,
                                      device=device, should_stop=should_stop)
            denoise_s = time.perf_counter() - started
            document = None
            if should_stop is not None and should_stop():
                raise CancelledError("the request was cancelled after denoising")
            if params.explain:
                document = explain_volume(self.model, volume.hu, denoised.hu, volume, levels=(params.level,),
                                          top_k=params.top_k, batch_size=self.batch_size, device=device)
            finished = time.perf_counter()
        finally:
            self._lock.release()
        summary = {
            "model": "langmamba_denoise",
            "blend": params.blend,
            "level": params.level,
            "explain": params.explain,
            "top_k": params.top_k,
            "device": device,
            "shape_zyx": list(volume.shape),
            "spacing_mm": [float(s) for s in volume.spacing],
            "timings_s": {
                "queued": round(started - queued, 3),
                "denoise": round(denoise_s, 3),
                "explain": round(finished - started - denoise_s, 3),
            },
        }
        return DenoiseResult(volume, denoised, document, summary)

    @staticmethod
    def write_result(result: DenoiseResult) -> Path:
        """The denoised volume as a new temporary ``.nrrd`` file (float32 HU, input geometry); the caller
        removes it."""
        denoised = result.denoised
        # float32 always: write_volume would store int16 when every value happens to be integral
        hu = denoised.hu.astype(np.float32)
        return write_volume(CTVolume(hu=hu, spacing=denoised.spacing, origin=denoised.origin,
                                     direction=denoised.direction),
                            Path(tempfile.gettempdir()) / f"langmamba-result-{uuid.uuid4().hex}.nrrd")

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict]:
        """MONAI Label's task interface: ``request["image"]`` is a path; returns ``(nrrd path, params)``.

        The NRRD is a temporary file that the caller removes.
        """
        params = DenoiseParams.from_request(request, self.levels)
        result = self.run(self.read(request["image"]), params)
        path = self.write_result(result)
        return str(path), {**result.summary, "explanations": result.explanations}
