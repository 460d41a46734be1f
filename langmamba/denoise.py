"""Denoise CT volumes with the shipped LangMamba weights, optionally with explanations, label maps and a report.

One volume (:func:`run_denoise`): a file or a DICOM series folder in, the same kind out. A folder of studies
(:func:`run_denoise_folder`): every sub-folder (a DICOM series) and every volume file (NIfTI, NRRD, MetaImage)
directly inside ``IN`` is one study, named after the sub-folder, or the file name without its extension. The
outputs of study ``S`` inside ``OUT`` are

- ``OUT/S/``: the denoised, derived DICOM series (DICOM input), or ``OUT/<input file name>`` (file input);
- ``OUT/S.explanations.json``, ``OUT/S.labels.nrrd`` with its colour table ``OUT/S.labels.ctbl``, and
  ``OUT/S.report.html``, each only when asked for.

Every file is written atomically, so a study counts as finished exactly when all its requested outputs exist; a
rerun skips finished studies (unless ``overwrite``) and redoes the others, replacing the outputs an interrupted
run left. Under ``torchrun`` each rank takes the studies ``rank::world_size`` of the sorted list on
``cuda:LOCAL_RANK`` (or the CPU) and rank 0 prints the summary of all ranks.

Host memory stays near two float32 volumes (input and output) plus one batch: the output is preallocated and
filled batch by batch, explanations stream to disk keeping a few bytes per region of the chosen level, and the
input voxels are released before the int16 label map is painted and the outputs are written.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np

from . import workers
from .errors import CheckpointError, ConfigError, InputError, LangMambaError
from .io import CTVolume, read_volume, write_labels, write_volume
from .io.atomic import atomic_output, check_not_input
from .io.formats import has_dicom_magic, suffix_of

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "langmamba"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File studies of a folder run: the volume formats langmamba reads and writes (not single DICOM files)."""
_DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")


def default_weights() -> Path:
    """``$LANGMAMBA_WEIGHTS`` or the repository's shipped ``weights/langmamba``."""
    path = Path(os.environ.get("LANGMAMBA_WEIGHTS", DEFAULT_WEIGHTS))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no LangMamba weights at {path}; pass --weights or set LANGMAMBA_WEIGHTS")
    return path


def denoise_volume(model, volume: CTVolume, *, blend: float = 1.0, batch_size: int = 4, device: str = "auto",
                   progress: bool = False, out: np.ndarray | None = None,
                   should_stop: Callable[[], bool] | None = None) -> CTVolume:
    """The denoised volume (same geometry and DICOM header); ``blend`` mixes output (1) and input (0).

    ``out``: an optional float32 ``(Z, Y, X)`` array to denoise into (see :func:`langmamba.infer.denoise_slices`).
    ``should_stop``: checked between batches; :class:`langmamba.errors.CancelledError` when it returns True.
    """
    from .infer import denoise_slices

    output = denoise_slices(model, volume.hu, batch_size=batch_size, device=device, progress=progress, blend=blend,
                            out=out, should_stop=should_stop)
    return volume.with_hu(output)


def default_batch_size(device: str = "auto") -> int:
    """Slices per batch when none is given: 4 on CUDA; 1 on the CPU, where it was both the fastest and the
    leanest (512² slices, shipped weights: 0.72 s/slice and +0.36 GB against 0.83 s/slice and +1.16 GB at 4)."""
    from .infer import resolve_device

    return 4 if resolve_device(device).type == "cuda" else 1


def color_table_path(labels: str | Path) -> Path:
    """The colour table written beside a label map: its extension replaced by ``.ctbl``."""
    labels = Path(labels)
    suffix = suffix_of(labels)
    return labels.with_name(labels.name[: len(labels.name) - len(suffix)] + ".ctbl")


def _write_color_table(words: dict[int, str], path: Path, overwrite: bool) -> Path:
    from .explain import color_table, write_color_table

    with atomic_output(path, as_folder=False, overwrite=overwrite) as staging:
        write_color_table(color_table(words), staging / path.name)
    return path


def _geometry_only(volume: CTVolume) -> CTVolume:
    """``volume`` without its voxels (a zero-size broadcast view): geometry, DICOM header and source stay for
    the derived series' references while the input's memory is released before the output is written."""
    return volume.with_hu(np.broadcast_to(np.float32(0.0), volume.shape))


def _timed(timings: dict[str, float], stage: str, start: float) -> float:
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + now - start
    return now


def process_volume(model, source: str | Path, destination: str | Path, *, explain: str | Path | None = None,
                   labels: str | Path | None = None, report: str | Path | None = None, level: int = 2,
                   blend: float = 1.0, batch_size: int | None = None, device: str = "auto",
                   overwrite: bool = False, progress: bool = True, timings: dict[str, float] | None = None,
                   run_info: dict | None = None) -> dict[str, Path]:
    """Read, denoise, explain and write one volume with a loaded ``model``; returns the written paths.

    ``timings`` (if given) receives seconds per stage: ``read``, ``denoise``, ``explain`` (encoder and the
    streamed JSON), ``write`` (denoised volume, label map, colour table) and ``report``. With
    :mod:`langmamba.workers` processes the denoised volume is written during ``explain``, and ``write`` counts
    the rest.
    """
    from .explain import write_explanation

    timings = {} if timings is None else timings
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if not 0.0 <= blend <= 1.0:
        raise ConfigError(f"blend must be between 0 and 1, got {blend}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    for path in (destination, explain, labels, report, labels and color_table_path(labels)):
        if path:
            check_not_input(Path(path), [source])
    start = time.perf_counter()
    volume = read_volume(source, progress=progress)
    start = _timed(timings, "read", start)
    denoised = denoise_volume(model, volume, blend=blend, batch_size=batch_size, device=device, progress=progress)
    start = _timed(timings, "denoise", start)

    written: dict[str, Path] = {}
    collector = document = None
    images = {}
    explaining = bool(explain or labels or report)
    write_denoised = partial(write_volume, denoised, destination, series_description="LangMamba denoised",
                             overwrite=overwrite)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="langmamba-write") as writer:
        # With worker processes, they write the denoised volume while the GPU and the other workers explain it;
        # without, the input is released first (on a 2-core machine nothing would run alongside anyway).
        background = None
        if explaining and workers.worker_count():
            background = writer.submit(write_denoised, derived_from=volume, progress=False)
        if explaining:
            from .report import ReportCollector

            # A few bytes per region: the label map is painted from it once the input voxels are released.
            collector = ReportCollector(level, volume.shape[0]) if labels or report else None
            # The explainer encodes input and output of every slice: half the slices per batch keeps the encoder's
            # activations (host memory on the CPU) at the denoiser's ``batch_size`` images.
            kwargs = dict(batch_size=max(1, batch_size // 2), device=device, progress=progress, on_batch=collector)
            with ExitStack() as stack:
                target = os.devnull
                if explain:
                    explain = Path(explain)
                    target = stack.enter_context(atomic_output(explain, as_folder=False, overwrite=overwrite))
                    target = target / explain.name
                document = write_explanation(target, model, volume.hu, denoised.hu, volume, **kwargs)
            if explain:
                written["explanations"] = explain
            if report:
                images = {z: (volume.hu[z].copy(), denoised.hu[z].copy()) for z in collector.choose_slices()}
            start = _timed(timings, "explain", start)

        volume = _geometry_only(volume)
        if labels:
            labels = Path(labels)
            label_map, words = collector.label_map(volume.shape)
            written["label map"] = write_labels(label_map, volume, labels, overwrite=overwrite,
                                                series_description="LangMamba explanation labels")
            del label_map
            written["colour table"] = _write_color_table(words, color_table_path(labels), overwrite)
        if background is None:
            written["denoised"] = write_denoised(derived_from=volume, progress=progress)
        else:
            written["denoised"] = background.result()
    start = _timed(timings, "write", start)
    if report:
        from .report import write_report

        info = {"input": Path(source).name, **(run_info or {}), "device": str(device), "batch size": batch_size,
                "blend": blend, "explained level": level,
                **{f"{stage} time": f"{seconds:.1f} s" for stage, seconds in timings.items()}}
        written["report"] = write_report(report, collector, document, images, run_info=info, overwrite=overwrite)
        _timed(timings, "report", start)
    return {key: written[key] for key in ("denoised", "explanations", "label map", "colour table", "report")
            if key in written}


def run_denoise(source: str | Path, destination: str | Path, *, weights: str | Path | None = None,
                explain: str | Path | None = None, labels: str | Path | None = None, level: int = 2,
                blend: float = 1.0, batch_size: int | None = None, device: str = "auto", overwrite: bool = False,
                progress: bool = True, report: str | Path | None = None, model=None,
                timings: dict[str, float] | None = None) -> dict[str, Path]:
    """Read, denoise, write one volume; optionally the explanations JSON, a region label map with its colour
    table (``<labels without extension>.ctbl``) and an HTML report (:mod:`langmamba.report`).

    Returns the written paths by caption. Outputs are checked against the input before any work starts.
    ``model``: an already loaded LangMamba (else loaded from ``weights``); ``timings``: see
    :func:`process_volume`.
    """
    from .checkpoint import load_checkpoint
    from .infer import resolve_device

    if model is None:
        weights = Path(weights or default_weights())
        model = load_checkpoint(weights)
    device = str(resolve_device(device))
    info = {"weights": str(weights) if weights else "given model"}
    return process_volume(model, source, destination, explain=explain, labels=labels, report=report, level=level,
                          blend=blend, batch_size=batch_size, device=device, overwrite=overwrite, progress=progress,
                          timings=timings, run_info=info)


# --- folders of studies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One study of a folder run: ``name``, its input ``path`` and whether it is a DICOM series folder."""

    name: str
    path: Path
    dicom: bool

    def outputs(self, folder: Path, *, explain: bool, labels: bool, report: bool) -> dict[str, Path | str]:
        """The study's output paths inside ``folder`` by caption (see the module docstring)."""
        paths: dict[str, Path | str] = {
            "denoised": f"{folder / self.name}{os.sep}" if self.dicom else folder / self.path.name}
        if explain:
            paths["explanations"] = folder / f"{self.name}.explanations.json"
        if labels:
            paths["label map"] = folder / f"{self.name}.labels.nrrd"
            paths["colour table"] = color_table_path(paths["label map"])
        if report:
            paths["report"] = folder / f"{self.name}.report.html"
        return paths


def _is_dicom_file(path: Path) -> bool:
    return path.is_file() and (suffix_of(path) in _DICOM_FILE_SUFFIXES or has_dicom_magic(path))


def find_studies(folder: str | Path) -> list[Study]:
    """The studies directly inside ``folder``, sorted by name: sub-folders (DICOM series) and volume files
    (:data:`VOLUME_SUFFIXES`). Hidden entries (``.name``, e.g. staging folders) and other files are ignored.

    Raises:
        InputError: two studies share a name (e.g. ``a.nrrd`` and ``a.nii.gz``), or there is none.
    """
    folder = Path(folder)
    studies = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            studies.append(Study(entry.name, entry, True))
        elif suffix_of(entry) in VOLUME_SUFFIXES:
            studies.append(Study(entry.name[: len(entry.name) - len(suffix_of(entry))], entry, False))
    if not studies:
        raise InputError(f"{folder}: no DICOM series sub-folders or volume files ({', '.join(VOLUME_SUFFIXES)})")
    names = [s.name for s in studies]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise InputError(f"{folder}: several studies would be named {', '.join(clashes)}; rename one of each")
    return studies


def is_study_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder of studies: a folder holding no DICOM file itself but at least one
    sub-folder or volume file (a folder with DICOM files is one series)."""
    path = Path(path)
    if not path.is_dir():
        return False
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if any(_is_dicom_file(e) for e in entries):
        return False
    return any(e.is_dir() or suffix_of(e) in VOLUME_SUFFIXES for e in entries)


def _exists(path: Path | str) -> bool:
    return Path(path).exists()


def _remove_stale_staging(paths: list[Path | str]) -> None:
    """Delete staging files/folders an interrupted run left beside the outputs (see langmamba.io.atomic)."""
    for path in paths:
        path = Path(path)
        pattern = re.compile(re.escape(f".{path.name}.tmp-") + "[0-9a-f]{8}$")
        if not path.parent.is_dir():
            continue
        for entry in path.parent.iterdir():
            if pattern.match(entry.name):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


@dataclass
class FolderSummary:
    """Outcome of a folder run (of one rank, or all ranks once merged): study names per outcome."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        total = len(self.done) + len(self.skipped) + len(self.failed)
        return (f"{total} studies: {len(self.done)} done, {len(self.skipped)} skipped (finished earlier), "
                f"{len(self.failed)} failed")

    def merge(self, others: list["FolderSummary"]) -> "FolderSummary":
        merged = FolderSummary()
        for part in [self, *others]:
            merged.done += part.done
            merged.skipped += part.skipped
            merged.failed += part.failed
        return merged


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables; ``(0, 1, 0)`` without."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as error:
        raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}") from error
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return rank, world, local


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The device of one rank: ``cuda:LOCAL_RANK`` when ``device`` is ``auto`` (with CUDA) or ``cuda``."""
    import torch

    from .infer import resolve_device

    resolved = resolve_device(device)
    if world_size > 1 and resolved.type == "cuda" and resolved.index is None:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        return f"cuda:{local_rank}"
    return str(resolved)


def run_denoise_folder(source: str | Path, destination: str | Path, *, weights: str | Path | None = None,
                       explain: bool = False, labels: bool = False, report: bool = False, level: int = 2,
                       blend: float = 1.0, batch_size: int | None = None, device: str = "auto",
                       overwrite: bool = False, progress: bool = True, rank: int = 0, world_size: int = 1,
                       echo: Callable[[str], None] = print) -> FolderSummary:
    """Denoise every study of the folder ``source`` into the folder ``destination`` (naming: module docstring).

    A study whose requested outputs all exist is skipped unless ``overwrite``; a study that fails is reported
    with one line through ``echo`` and the run goes on. With ``world_size > 1`` this process handles the
    studies ``rank::world_size`` of the sorted list. Returns this process's summary.
    """
    from .checkpoint import load_checkpoint

    source, destination = Path(source), Path(destination)
    if destination.exists() and not destination.is_dir():
        raise ConfigError(f"{destination} is a file; a folder of studies needs an output folder")
    if suffix_of(destination) in VOLUME_SUFFIXES:
        raise ConfigError(f"{destination}: a folder of studies needs an output folder, not a {suffix_of(destination)} "
                          "file")
    check_not_input(destination, [source])
    if not 0.0 <= blend <= 1.0:
        raise ConfigError(f"blend must be between 0 and 1, got {blend}")
    studies = find_studies(source)[rank::world_size]
    weights = Path(weights or default_weights())
    model = None
    summary = FolderSummary()
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    for i, study in enumerate(studies, 1):
        outputs = study.outputs(destination, explain=explain, labels=labels, report=report)
        if not overwrite and all(_exists(p) for p in outputs.values()):
            summary.skipped.append(study.name)
            echo(f"{prefix}[{i}/{len(studies)}] {study.name}: skipped, all outputs exist")
            continue
        partial = any(_exists(p) for p in outputs.values())
        _remove_stale_staging(list(outputs.values()))
        started = time.perf_counter()
        try:
            if model is None:
                model = load_checkpoint(weights)
            process_volume(model, study.path, outputs["denoised"], explain=outputs.get("explanations"),
                           labels=outputs.get("label map"), report=outputs.get("report"), level=level, blend=blend,
                           batch_size=batch_size, device=device, overwrite=overwrite or partial, progress=progress,
                           run_info={"weights": str(weights)})
        except (LangMambaError, OSError) as error:
            summary.failed.append((study.name, str(error)))
            echo(f"{prefix}[{i}/{len(studies)}] {study.name}: FAILED: {error}")
            if isinstance(error, CheckpointError):
                raise
            continue
        except Exception as error:  # a bug or an unforeseen input: report it, go on with the next study
            logger.exception("study %s failed", study.name)
            summary.failed.append((study.name, f"{type(error).__name__}: {error}"))
            echo(f"{prefix}[{i}/{len(studies)}] {study.name}: FAILED: {type(error).__name__}: {error}")
            continue
        summary.done.append(study.name)
        echo(f"{prefix}[{i}/{len(studies)}] {study.name}: done in {time.perf_counter() - started:.1f} s")
    return summary


def gather_summaries(summary: FolderSummary, world_size: int) -> FolderSummary | None:
    """All ranks' summaries merged on rank 0 (``None`` on the others), through a gloo process group that
    torchrun's environment describes; this rank's own summary without one."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return summary
    # The slowest rank may finish hours after the fastest; the others wait here for it.
    dist.init_process_group("gloo", timeout=timedelta(days=7))
    try:
        parts: list = [None] * world_size
        dist.all_gather_object(parts, summary)
        return summary.merge(parts[1:]) if dist.get_rank() == 0 else None
    finally:
        dist.destroy_process_group()


def check_study_outputs(explain, labels, report, folder_mode: bool) -> None:
    """``--explain``/``--labels``/``--report`` take a path for one volume and none for a folder of studies
    (``True`` stands for the option given without a path)."""
    for name, value in (("explain", explain), ("labels", labels), ("report", report)):
        if value is None:
            continue
        if folder_mode and value is not True:
            named = {"explain": "explanations.json", "labels": "labels.nrrd", "report": "report.html"}[name]
            raise ConfigError(f"--{name} takes no path when IN is a folder of studies: the outputs are named "
                              f"OUT/<study>.{named}")
        if not folder_mode and value is True:
            raise ConfigError(f"--{name} needs a file name when IN is one volume")
