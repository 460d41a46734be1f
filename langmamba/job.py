"""One denoise job: read a CT volume, denoise it in batches, explain it and write the outputs, streaming.

Every front-end runs this one path: ``langmamba denoise`` for one volume (:func:`langmamba.denoise.denoise_study`)
and for a folder of studies (:func:`langmamba.denoise.denoise_study_folder`), ``langmamba bench denoise`` and the
MONAI Label task. The outputs (:class:`JobOutputs`) are the denoised volume (a file, or a DICOM series folder
derived from a DICOM input) and, each only when asked for, the explanation document (JSON), the region label map
of one pyramid level with its colour table, and an HTML report. Every file is written atomically.

Host memory stays near two float32 volumes (input and output) plus one batch, whatever the number of slices: the
output is preallocated and filled batch by batch, the explanation document streams to disk slice by slice
(:func:`langmamba.explain.write_explanation`) keeping a few bytes per region of the chosen level, and the input
voxels are released before the int16 label map is painted and the outputs are written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from . import workers
from .errors import CancelledError, ConfigError
from .infer import denoise_ct_volume
from .io import CTVolume, read_volume, write_labels, write_volume
from .io.atomic import atomic_output, check_not_input
from .io.formats import Format, format_for_writing, suffix_of
from .io.itk_formats import write_array
from .io.limits import MAX_VOLUME_BYTES
from .io.validate import check_finite
from .runtime import default_batch_size, resolve_device

SERIES_DESCRIPTION = "LangMamba denoised"
LABELS_DESCRIPTION = "LangMamba explanation labels"


def color_table_path(labels: str | Path) -> Path:
    """The colour table written beside a label map: its extension replaced by ``.ctbl``."""
    labels = Path(labels)
    suffix = suffix_of(labels)
    return labels.with_name(labels.name[: len(labels.name) - len(suffix)] + ".ctbl")


@dataclass(frozen=True)
class JobOutputs:
    """Where one job writes: the ``denoised`` volume (a file, or a folder for a DICOM series), and optionally
    the ``explanations`` JSON, the ``labels`` map (its colour table beside it, :func:`color_table_path`) and the
    HTML ``report``."""

    denoised: str | Path
    explanations: str | Path | None = None
    labels: str | Path | None = None
    report: str | Path | None = None

    def paths(self) -> list[Path]:
        """Every file or folder the job may write."""
        paths = [
            self.denoised,
            self.explanations,
            self.labels,
            self.report,
            self.labels and color_table_path(self.labels),
        ]
        return [Path(p) for p in paths if p]


@dataclass
class JobResult:
    """What one job did: the ``written`` paths by caption (``denoised``, ``explanations``, ``label map``,
    ``colour table``, ``report``), the ``source`` geometry (its voxels released; DICOM header and source path
    kept), the ``denoised`` volume, the explanation document without its slices (``None`` when nothing was
    explained), the resolved ``device`` and ``batch_size``, and seconds per stage in ``timings``."""

    written: dict[str, Path]
    source: CTVolume
    denoised: CTVolume
    explanation: dict | None
    device: str
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class DenoiseJob:
    """Read, denoise, explain and write one CT volume with a loaded LangMamba ``model``.

    Args:
        model: a loaded LangMamba (see :func:`langmamba.checkpoint.load_checkpoint`).
        blend: ``blend * denoised + (1 - blend) * input``, in [0, 1].
        batch_size: slices per denoiser batch (default: :func:`langmamba.runtime.default_batch_size`); the
            explainer encodes input and output of every slice, so it takes half as many slices per batch.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        tta: average the denoiser over the 8 flips/rotations of every slice (8 times the denoising time; on the
            validation cases +0.05 dB, see the model card).
        explain_levels: quantizer pyramid levels of the explanation document (0 = coarsest).
        top_k: words listed per region in the explanation document.
        level: the pyramid level of the label map and the report (one of ``explain_levels``).
        float32: store a denoised volume file as float32 even when every value is an integer (a DICOM series
            is always int16).
        confined: read the input from that file or folder alone (see :func:`langmamba.io.read_volume`).
        max_bytes: refuse inputs whose header declares more float32 bytes (``None``: no limit).
        overwrite: replace existing outputs (never the input).
        progress: show progress bars.
        run_info: extra lines of the report's run table (e.g. the weights).
    """

    model: nn.Module
    blend: float = 1.0
    batch_size: int | None = None
    device: str = "auto"
    tta: bool = False
    explain_levels: Sequence[int] = (0, 1, 2)
    top_k: int = 3
    level: int = 2
    float32: bool = False
    confined: bool = False
    max_bytes: int | None = MAX_VOLUME_BYTES
    overwrite: bool = False
    progress: bool = False
    run_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = str(resolve_device(self.device))
        self.batch_size = default_batch_size(self.device) if self.batch_size is None else self.batch_size
        if not 0.0 <= self.blend <= 1.0:
            raise ConfigError(f"blend must be between 0 and 1, got {self.blend}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1, got {self.top_k}")
        self.explain_levels = tuple(int(level) for level in self.explain_levels)

    def run(
        self,
        source: str | Path,
        outputs: JobOutputs,
        *,
        should_stop: Callable[[], bool] | None = None,
        model_lock: AbstractContextManager | None = None,
    ) -> JobResult:
        """Read ``source`` (a volume file or DICOM series folder), denoise, explain and write ``outputs``.

        ``should_stop`` is checked between batches of the denoiser and of the explainer
        (:class:`CancelledError`); ``model_lock`` is held while the model runs (denoising and explaining), not
        while reading and writing; the wait for it is timed as ``queued``. Outputs are checked against the input
        before any work starts. ``timings`` of the result: ``read``, ``queued`` (with a lock), ``denoise``,
        ``explain`` (encoder and the streamed JSON), ``write`` (denoised volume, label map, colour table) and
        ``report``; with :mod:`langmamba.workers` processes the denoised volume is written during ``explain``.
        """
        if (outputs.labels or outputs.report) and self.level not in self.explain_levels:
            raise ConfigError(
                f"the label map and report show level {self.level}, which is not among the explained "
                f"levels {list(self.explain_levels)}"
            )
        for path in outputs.paths():
            check_not_input(path, [source])
        timings: dict[str, float] = {}
        start = time.perf_counter()
        volume = read_volume(source, progress=self.progress, confined=self.confined, max_bytes=self.max_bytes)
        start = _timed(timings, "read", start)
        written: dict[str, Path] = {}
        document = collector = None
        images: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        explaining = bool(outputs.explanations or outputs.labels or outputs.report)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="langmamba-write") as writer:
            background = None
            with model_lock if model_lock is not None else nullcontext():
                if model_lock is not None:
                    start = _timed(timings, "queued", start)
                denoised = denoise_ct_volume(
                    self.model,
                    volume,
                    blend=self.blend,
                    batch_size=self.batch_size,
                    device=self.device,
                    progress=self.progress,
                    should_stop=should_stop,
                    tta=self.tta,
                )
                start = _timed(timings, "denoise", start)
                write_denoised = partial(self._write_denoised, denoised, Path(outputs.denoised))
                # With worker processes, they write the denoised volume while the GPU and the other workers explain
                # it; without, the input is released first (on a 2-core machine nothing would run alongside anyway).
                _check_stop(should_stop, "after denoising")
                if explaining:
                    if workers.worker_count():
                        background = writer.submit(write_denoised, derived_from=volume, progress=False)
                    document, collector = self._explain(volume, denoised, outputs, should_stop)
                    if outputs.explanations:
                        written["explanations"] = Path(outputs.explanations)
                    if outputs.report:
                        images = {z: (volume.hu[z].copy(), denoised.hu[z].copy()) for z in collector.choose_slices()}
                    start = _timed(timings, "explain", start)
            volume = _geometry_only(volume)
            if outputs.labels:
                written.update(self._write_labels(collector, volume, Path(outputs.labels)))
            if background is None:
                written["denoised"] = write_denoised(derived_from=volume, progress=self.progress)
            else:
                written["denoised"] = background.result()
        start = _timed(timings, "write", start)
        if outputs.report:
            from .report import write_report

            info = {
                "input": Path(source).name,
                **self.run_info,
                "device": self.device,
                "batch size": self.batch_size,
                "blend": self.blend,
                "flip averaging": "8 flips/rotations" if self.tta else "off",
                "explained level": self.level,
                **{f"{stage} time": f"{seconds:.1f} s" for stage, seconds in timings.items()},
            }
            written["report"] = write_report(
                outputs.report, collector, document, images, run_info=info, overwrite=self.overwrite
            )
            _timed(timings, "report", start)
        order = ("denoised", "explanations", "label map", "colour table", "report")
        return JobResult(
            {key: written[key] for key in order if key in written},
            volume,
            denoised,
            document,
            self.device,
            self.batch_size,
            timings,
        )

    def _explain(
        self, volume: CTVolume, denoised: CTVolume, outputs: JobOutputs, should_stop: Callable[[], bool] | None
    ) -> tuple[dict, Any]:
        """Stream the explanation document to ``outputs.explanations`` (or nowhere, when only the label map or
        the report needs the words); returns it without its slices, and the report collector (or ``None``)."""
        from .explain import write_explanation
        from .report import ReportCollector

        # A few bytes per region: the label map is painted from it once the input voxels are released.
        collector = ReportCollector(self.level, volume.shape[0]) if outputs.labels or outputs.report else None

        def on_batch(batch: Any) -> None:
            if collector is not None:
                collector(batch)
            _check_stop(should_stop, "while explaining")

        with ExitStack() as stack:
            target: str | Path = os.devnull
            if outputs.explanations:
                path = Path(outputs.explanations)
                target = stack.enter_context(atomic_output(path, as_folder=False, overwrite=self.overwrite))
                target = target / path.name
            document = write_explanation(
                target,
                self.model,
                volume.hu,
                denoised.hu,
                volume,
                levels=self.explain_levels,
                top_k=self.top_k,
                batch_size=max(1, self.batch_size // 2),
                device=self.device,
                progress=self.progress,
                on_batch=on_batch,
            )
        return document, collector

    def _write_denoised(self, denoised: CTVolume, path: Path, *, derived_from: CTVolume, progress: bool) -> Path:
        if self.float32 and format_for_writing(path) is not Format.DICOM:
            return _write_float32(denoised, path, overwrite=self.overwrite)
        return write_volume(
            denoised,
            path,
            series_description=SERIES_DESCRIPTION,
            overwrite=self.overwrite,
            derived_from=derived_from,
            progress=progress,
        )

    def _write_labels(self, collector: Any, geometry: CTVolume, path: Path) -> dict[str, Path]:
        from .explain import color_table, write_color_table

        label_map, words = collector.label_map(geometry.shape)
        written = {
            "label map": write_labels(
                label_map, geometry, path, overwrite=self.overwrite, series_description=LABELS_DESCRIPTION
            )
        }
        del label_map
        table = color_table_path(path)
        with atomic_output(table, as_folder=False, overwrite=self.overwrite) as staging:
            write_color_table(color_table(words), staging / table.name)
        written["colour table"] = table
        return written


def _write_float32(volume: CTVolume, path: Path, *, overwrite: bool) -> Path:
    """``volume`` as a float32 file (NIfTI, NRRD, MetaImage) on its grid, atomically."""
    check_not_input(path, [volume.source])
    check_finite(volume.hu, "the volume to write")
    with atomic_output(path, as_folder=False, overwrite=overwrite) as staging:
        write_array(volume.hu.astype(np.float32, copy=False), volume, staging / path.name)
    return path


def _check_stop(should_stop: Callable[[], bool] | None, when: str) -> None:
    if should_stop is not None and should_stop():
        raise CancelledError(f"the job was stopped on request {when}")


def _geometry_only(volume: CTVolume) -> CTVolume:
    """``volume`` without its voxels (a zero-size broadcast view): geometry, DICOM header and source stay for
    the derived series' references while the input's memory is released before the output is written."""
    return volume.with_hu(np.broadcast_to(np.float32(0.0), volume.shape))


def _timed(timings: dict[str, float], stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + now - start
    return now
