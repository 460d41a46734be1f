"""Denoise a CT volume file or DICOM series with the shipped LangMamba weights, optionally with explanations."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import CheckpointError, ConfigError
from .io import CTVolume, read_volume, write_volume
from .io.atomic import atomic_output, check_not_input

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "langmamba"


def default_weights() -> Path:
    """``$LANGMAMBA_WEIGHTS`` or the repository's shipped ``weights/langmamba``."""
    path = Path(os.environ.get("LANGMAMBA_WEIGHTS", DEFAULT_WEIGHTS))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no LangMamba weights at {path}; pass --weights or set LANGMAMBA_WEIGHTS")
    return path


def denoise_volume(model, volume: CTVolume, *, blend: float = 1.0, batch_size: int = 4, device: str = "auto",
                   progress: bool = False) -> CTVolume:
    """The denoised volume (same geometry and DICOM header); ``blend`` mixes output (1) and input (0)."""
    from .infer import denoise_slices

    if not 0.0 <= blend <= 1.0:
        raise ConfigError(f"blend must be between 0 and 1, got {blend}")
    output = denoise_slices(model, volume.hu, batch_size=batch_size, device=device, progress=progress)
    return volume.with_hu(blend * output + (1.0 - blend) * volume.hu)


def _write_label_map(labels: np.ndarray, like: CTVolume, path: Path, overwrite: bool) -> Path:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(labels.astype(np.int16))
    image.SetSpacing(like.spacing)
    image.SetOrigin(like.origin)
    image.SetDirection(tuple(like.direction.flatten()))
    with atomic_output(path, as_folder=False, overwrite=overwrite) as staging:
        sitk.WriteImage(image, str(staging / path.name), True)
    return path


def run_denoise(source: str | Path, destination: str | Path, *, weights: str | Path | None = None,
                explain: str | Path | None = None, labels: str | Path | None = None, level: int = 2,
                blend: float = 1.0, batch_size: int = 4, device: str = "auto", overwrite: bool = False,
                progress: bool = True) -> dict[str, Path]:
    """Read, denoise, write; optionally the explanations JSON and a region label map with its colour table.

    Returns the written paths by caption. Outputs are checked against the input before any work starts.
    """
    from .checkpoint import load_checkpoint
    from .explain import explain_volume, explanation_label_map, write_color_table
    from .evaluate import write_json
    from .infer import resolve_device

    outputs = [Path(p) for p in (destination, explain, labels) if p is not None]
    for path in outputs:
        check_not_input(path, [source])
    volume = read_volume(source)
    model = load_checkpoint(weights or default_weights())
    device = str(resolve_device(device))
    denoised = denoise_volume(model, volume, blend=blend, batch_size=batch_size, device=device, progress=progress)
    written = {"denoised": write_volume(denoised, destination, series_description="LangMamba denoised",
                                        overwrite=overwrite, derived_from=volume)}
    if explain is not None or labels is not None:
        document = explain_volume(model, volume.hu, denoised.hu, volume, batch_size=batch_size, device=device,
                                  progress=progress)
        if explain is not None:
            written["explanations"] = write_json(document, Path(explain))
        if labels is not None:
            label_map, table = explanation_label_map(document, level, volume.shape)
            labels = Path(labels)
            written["label map"] = _write_label_map(label_map, volume, labels, overwrite)
            written["colour table"] = write_color_table(table, labels.with_name(labels.name.split(".")[0] + ".ctbl"))
    return written
