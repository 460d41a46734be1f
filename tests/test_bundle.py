"""The MONAI Bundle: ``python -m monai.bundle run`` denoises a file onto the input's exact voxel grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from langmamba.checkpoint import load_checkpoint
from langmamba.infer import denoise_ct_volume
from langmamba.io import read_volume, write_volume
from langmamba.io.volume import CTVolume
from langmamba.runtime import default_weights
from langmamba.sample_data import sample_path
from tests.servers import REPO, crop

pytestmark = pytest.mark.slow  # each test exports and runs a whole MONAI Bundle (minutes)

BUNDLE = REPO / "monailabel_app" / "bundle" / "langmamba_ct_denoise"


def _run_bundle(bundle: Path, source: Path, output: Path, cwd: Path, *extra: str, env: dict | None = None) -> None:
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / "inference.json"),
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--bundle_root",
        str(bundle),
        "--input_file",
        str(source),
        "--output_file",
        str(output),
        "--device",
        "cpu",
        *extra,
    ]
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _oblique_crop(tmp: Path) -> tuple[Path, CTVolume]:
    """Two slices of lung2 with a rotated direction and shifted origin, so geometry errors would show."""
    volume = crop(read_volume(sample_path("lung2")), slice(30, 32), slice(200, 296), slice(160, 272))
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    volume = CTVolume(hu=volume.hu, spacing=(0.7, 0.6, 2.5), origin=(12.5, -40.0, 7.0), direction=rotation)
    path = tmp / "oblique.nrrd"
    write_volume(volume, path)
    return path, volume


def test_bundle_run_denoises_a_file_on_the_input_grid(tmp_path):
    source, volume = _oblique_crop(tmp_path)
    output = tmp_path / "denoised.nrrd"
    _run_bundle(BUNDLE, source, output, tmp_path)
    result, reference = sitk.ReadImage(str(output)), sitk.ReadImage(str(source))
    assert result.GetSize() == reference.GetSize() and result.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(result.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(result.GetDirection(), reference.GetDirection(), atol=1e-6)
    expected = denoise_ct_volume(load_checkpoint(default_weights()), volume, device="cpu").hu
    np.testing.assert_allclose(sitk.GetArrayFromImage(result), expected, atol=0.5)


def test_exported_bundle_carries_its_weights_and_runs(tmp_path):
    from monailabel_app.bundle.export import export_bundle

    exported = export_bundle(tmp_path / "shared")
    assert sorted(p.name for p in (exported / "models" / "langmamba").iterdir()) == sorted(
        p.name for p in default_weights().iterdir() if p.is_file()
    )
    source, volume = _oblique_crop(tmp_path)
    output = tmp_path / "half.nrrd"
    # no fallback to the repository's weights: the bundle must use its own copy
    _run_bundle(
        exported,
        source,
        output,
        tmp_path,
        "--blend",
        "0.5",
        env={"LANGMAMBA_WEIGHTS": str(tmp_path / "no-weights-here")},
    )
    denoised = denoise_ct_volume(load_checkpoint(default_weights()), volume, device="cpu").hu
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sitk.ReadImage(str(output))), 0.5 * denoised + 0.5 * volume.hu, atol=0.5
    )
