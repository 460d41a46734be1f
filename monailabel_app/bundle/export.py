"""Assemble a self-contained copy of the LangMamba MONAI Bundle (weights inside ``models/``) for sharing.

In the repository the bundle references the shipped weights (``weights/langmamba``) instead of duplicating them;
``python monailabel_app/bundle/export.py OUT`` (or ``make bundle``) writes ``OUT/langmamba_ct_denoise`` with
``configs/``, ``docs/`` and ``models/langmamba`` (safetensors + config.json), which ``monai.bundle run`` uses
without this repository (``pip install langmamba`` is still needed for the network code).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

BUNDLE = Path(__file__).resolve().parent / "langmamba_ct_denoise"


def export_bundle(
    destination: str | os.PathLike, weights: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Write the bundle to ``destination/langmamba_ct_denoise`` atomically and return that folder."""
    from langmamba.errors import OverwriteError
    from langmamba.io.atomic import atomic_folder
    from langmamba.runtime import default_weights

    weights = Path(weights) if weights else default_weights()
    target = Path(destination) / BUNDLE.name
    if target.exists() and not overwrite:
        raise OverwriteError(f"{target} exists; remove it or pass --overwrite")
    with atomic_folder(target) as staging:
        for part in ("configs", "docs"):
            shutil.copytree(BUNDLE / part, staging / part)
        models = staging / "models" / "langmamba"
        models.mkdir(parents=True)
        for name in sorted(os.listdir(weights)):
            if (weights / name).is_file():
                shutil.copy2(weights / name, models / name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("destination", help="folder to write langmamba_ct_denoise/ into")
    parser.add_argument("--weights", default=None, help="LangMamba checkpoint folder (default: the shipped one)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    print(export_bundle(args.destination, args.weights, args.overwrite))


if __name__ == "__main__":
    main()
