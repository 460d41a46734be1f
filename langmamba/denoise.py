"""Denoise CT studies from files with the shipped LangMamba weights: one study, or a folder of studies.

One study (:func:`denoise_study`): a volume file or a DICOM series folder in, the same kind out, through one
:class:`langmamba.job.DenoiseJob`. A folder of studies (:func:`denoise_study_folder`): every sub-folder (a DICOM
series) and every volume file (NIfTI, NRRD, MetaImage) directly inside ``IN`` is one study, named after the
sub-folder, or the file name without its extension. The outputs of study ``S`` inside ``OUT`` are

- ``OUT/S/``: the denoised, derived DICOM series (DICOM input), or ``OUT/<input file name>`` (file input);
- ``OUT/S.explanations.json``, ``OUT/S.labels.nrrd`` with its colour table ``OUT/S.labels.ctbl``, and
  ``OUT/S.report.html``, each only when asked for.

Every file is written atomically, so a study counts as finished exactly when all its requested outputs exist; a
rerun skips finished studies (unless ``overwrite``) and redoes the others, replacing the outputs an interrupted
run left. Under ``torchrun`` each rank takes the studies ``rank::world_size`` of the sorted list (see
:class:`langmamba.runtime.TorchrunRank`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError, ConfigError, InputError, LangMambaError
from .io.atomic import check_not_input
from .io.formats import has_dicom_magic, suffix_of
from .job import DenoiseJob, JobOutputs, color_table_path
from .runtime import default_weights

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
"""File studies of a folder run: the volume formats langmamba reads and writes (not single DICOM files)."""
_DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")


def denoise_study(
    source: str | Path,
    destination: str | Path,
    *,
    weights: str | Path | None = None,
    explain: str | Path | None = None,
    labels: str | Path | None = None,
    report: str | Path | None = None,
    level: int = 2,
    explain_levels: Sequence[int] = (0, 1, 2),
    top_k: int = 3,
    blend: float = 1.0,
    batch_size: int | None = None,
    device: str = "auto",
    tta: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    model=None,
) -> dict[str, Path]:
    """Denoise one study (a volume file or DICOM series folder) into ``destination``; optionally the
    explanations JSON, a region label map of ``level`` with its colour table (``<labels without extension>.ctbl``)
    and an HTML report (:mod:`langmamba.report`).

    Returns the written paths by caption. Outputs are checked against the input before any work starts.
    ``model``: an already loaded LangMamba (else loaded from ``weights``, by default
    :func:`langmamba.runtime.default_weights`); the other arguments are :class:`langmamba.job.DenoiseJob`'s.
    """
    from .checkpoint import load_checkpoint

    if model is None:
        weights = Path(weights or default_weights())
        model = load_checkpoint(weights)
    job = DenoiseJob(
        model,
        blend=blend,
        batch_size=batch_size,
        device=device,
        tta=tta,
        explain_levels=explain_levels,
        top_k=top_k,
        level=level,
        overwrite=overwrite,
        progress=progress,
        run_info={"weights": str(weights) if weights else "given model"},
    )
    return job.run(source, JobOutputs(destination, explain, labels, report)).written


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
            "denoised": f"{folder / self.name}{os.sep}" if self.dicom else folder / self.path.name
        }
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
        return (
            f"{total} studies: {len(self.done)} done, {len(self.skipped)} skipped (finished earlier), "
            f"{len(self.failed)} failed"
        )

    def merge(self, others: list[FolderSummary]) -> FolderSummary:
        merged = FolderSummary()
        for part in [self, *others]:
            merged.done += part.done
            merged.skipped += part.skipped
            merged.failed += part.failed
        return merged


def denoise_study_folder(
    source: str | Path,
    destination: str | Path,
    *,
    weights: str | Path | None = None,
    explain: bool = False,
    labels: bool = False,
    report: bool = False,
    level: int = 2,
    explain_levels: Sequence[int] = (0, 1, 2),
    top_k: int = 3,
    blend: float = 1.0,
    batch_size: int | None = None,
    device: str = "auto",
    tta: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    echo: Callable[[str], None] = print,
) -> FolderSummary:
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
        raise ConfigError(
            f"{destination}: a folder of studies needs an output folder, not a {suffix_of(destination)} file"
        )
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
            job = DenoiseJob(
                model,
                blend=blend,
                batch_size=batch_size,
                device=device,
                tta=tta,
                explain_levels=explain_levels,
                top_k=top_k,
                level=level,
                overwrite=overwrite or partial,
                progress=progress,
                run_info={"weights": str(weights)},
            )
            job.run(
                study.path,
                JobOutputs(
                    outputs["denoised"], outputs.get("explanations"), outputs.get("label map"), outputs.get("report")
                ),
            )
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
