"""The ``langmamba_denoise`` infer task: a CT volume in, the denoised CT (same geometry) and explanations out.

MONAI Label's task types are segmentation-centred; this one is of type ``others`` and returns an *image*: a
float32 NRRD in HU on the input's exact voxel grid (spacing, origin, direction), plus the explanation document
described by ``explanation.schema.json`` in the result's ``params``. It runs the same
:class:`langmamba.job.DenoiseJob` as ``langmamba denoise``: the document streams to a temporary JSON file slice by
slice, so a long volume needs no more host memory here than on the command line. Geometry never passes through
MONAI transforms (``ToNumpyd`` would drop the affine): volumes stay :class:`langmamba.io.CTVolume` from reading
to writing.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from langmamba.checkpoint import load_checkpoint
from langmamba.errors import CancelledError, ConfigError
from langmamba.io import CTVolume
from langmamba.job import DenoiseJob, JobOutputs

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
    KEYS: ClassVar[tuple[str, ...]] = ("blend", "level", "device", "explain", "top_k", "save", "overwrite", "client_id")

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
    """What one request produced: the ``source`` geometry (voxels released), the ``denoised`` volume, the
    temporary files of the denoised NRRD (``image_file``) and of the explanation document
    (``explanations_file``, ``None`` when not asked for), which the caller removes (:meth:`remove_files`), and
    the response summary (parameters, device, timings in seconds)."""

    source: CTVolume
    denoised: CTVolume
    image_file: Path
    explanations_file: Path | None
    summary: dict = field(default_factory=dict)

    def remove_files(self) -> None:
        for path in (self.image_file, self.explanations_file):
            if path is not None:
                path.unlink(missing_ok=True)


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

    def job(self, params: DenoiseParams) -> DenoiseJob:
        """The denoise job of one request: ``params``' blend, level, top-k and device; the input read from its
        file or folder alone (no detached data files, no links), refusing declared sizes above ``max_voxels``
        float32 voxels before allocating them; the denoised NRRD always float32."""
        return DenoiseJob(
            self.model,
            blend=params.blend,
            batch_size=self.batch_size,
            device=params.device,
            explain_levels=(params.level,),
            top_k=params.top_k,
            level=params.level,
            float32=True,
            confined=True,
            max_bytes=4 * self.max_voxels,
        )

    def _acquire(self, should_stop: Callable[[], bool] | None) -> None:
        """Wait for the model lock; give up (:class:`CancelledError`) as soon as ``should_stop()`` is true."""
        while not self._lock.acquire(timeout=0.25):
            if should_stop is not None and should_stop():
                raise CancelledError("the request was cancelled while it waited in the queue")

    @contextmanager
    def _model_lock(self, should_stop: Callable[[], bool] | None) -> Iterator[None]:
        self._acquire(should_stop)
        try:
            yield
        finally:
            self._lock.release()

    def run(
        self, path: str | Path, params: DenoiseParams, should_stop: Callable[[], bool] | None = None
    ) -> DenoiseResult:
        """Read the volume at ``path`` (a file or DICOM folder), denoise it and explain ``params.level`` under the
        model lock, and write the results to new temporary files; ``should_stop`` is checked while queued and
        between batches (:class:`CancelledError`)."""
        stem = Path(tempfile.gettempdir()) / f"langmamba-result-{uuid.uuid4().hex}"
        outputs = JobOutputs(
            stem.with_name(stem.name + ".nrrd"),
            stem.with_name(stem.name + ".explanations.json") if params.explain else None,
        )
        try:
            done = self.job(params).run(
                path, outputs, should_stop=should_stop, model_lock=self._model_lock(should_stop)
            )
        except BaseException:
            for written in outputs.paths():
                written.unlink(missing_ok=True)
            raise
        volume = done.source
        timings = {
            stage: round(done.timings.get(stage, 0.0), 3) for stage in ("read", "queued", "denoise", "explain", "write")
        }
        summary = {
            "model": "langmamba_denoise",
            "blend": params.blend,
            "level": params.level,
            "explain": params.explain,
            "top_k": params.top_k,
            "device": done.device,
            "shape_zyx": list(volume.shape),
            "spacing_mm": [float(s) for s in volume.spacing],
            "timings_s": timings,
        }
        return DenoiseResult(
            volume,
            done.denoised,
            Path(outputs.denoised),
            Path(outputs.explanations) if outputs.explanations else None,
            summary,
        )

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict]:
        """MONAI Label's task interface (abstract in ``InferTask``, so it must exist; the app's ``infer`` calls
        :meth:`run` instead): ``request["image"]`` is a path; returns ``(nrrd path, params)`` with the path of the
        explanation document (or ``None``) in ``params["explanations_file"]``, as ``infer`` returns it.

        Both files are temporary files that the caller removes; the document is never read into memory here.
        """
        params = DenoiseParams.from_request(request, self.levels)
        result = self.run(request["image"], params)
        document = str(result.explanations_file) if result.explanations_file is not None else None
        return str(result.image_file), {**result.summary, "explanations_file": document}
