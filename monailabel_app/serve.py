"""``make run``: start the LangMamba MONAI Label server on embedded defaults and say how to connect.

Defaults: the shipped weights (``weights/langmamba``), the held-out sample study ``lung2`` copied from the data
cache into ``out/studies`` (the cache's files are only read), ``127.0.0.1:8000``, CUDA when present else CPU.
``--studies`` takes another folder or a DICOMweb URL (e.g. Orthanc's ``http://host:8042/dicom-web``).

Binding beyond loopback (``--host 0.0.0.0`` or an interface address) is refused unless authentication is on
(``MONAI_LABEL_AUTH_ENABLE=true``) or ``--insecure`` is given, which prints a warning. See ``SECURITY.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lib.exposure import is_loopback

APP_DIR = Path(__file__).resolve().parent
REPO = APP_DIR.parent
DEFAULT_STUDIES = REPO / "out" / "studies"


def prepare_sample_studies(folder: Path) -> Path:
    """``folder`` with ``lung2.nrrd`` (copied once from the sample cache, which is never written)."""
    from langmamba.io.atomic import atomic_output
    from langmamba.sample_data import sample_path

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "lung2.nrrd"
    if not target.exists():
        with atomic_output(target, as_folder=False) as staging:
            shutil.copyfile(sample_path("lung2", "image"), staging / target.name)
    return folder


def auth_enabled() -> bool:
    """MONAI Label's ``MONAI_LABEL_AUTH_ENABLE`` as the server will read it."""
    return os.environ.get("MONAI_LABEL_AUTH_ENABLE", "").strip().lower() in ("1", "true", "yes", "on")


def banner(url: str, studies: str, device: str) -> str:
    from langmamba.runtime import default_weights

    return f"""
LangMamba MONAI Label server
  URL:      {url}   (API docs: {url}/docs, app info: {url}/info/)
  studies:  {studies}
  weights:  {default_weights()}
  device:   {device}

Connect from 3D Slicer:
  1. Install the LangMamba Denoise extension (slicer_extension/ in this repository; see its README).
  2. Load a CT, open the module 'LangMamba Denoise', set the server to {url} and press Connect.
  3. Pick the input volume and press Denoise: the denoised CT appears as '<input> (LangMamba)' beside the input,
     and the explanation browser lists the words of every region. (MONAI Label's stock Slicer plugin lists only
     segmentation tasks.)
  Requests by datastore image id also save the result as a new image '<image>_langmamba' (an existing one
  is replaced only when params say "overwrite": true).
From a shell:
  curl -X POST '{url}/infer/langmamba_denoise?image=lung2&output=image' -F 'params={{"explain": false}}' -o out.nrrd
Stop the server with Ctrl+C.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--studies", default="", help="studies folder or DICOMweb URL (default: the sample study)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve beyond loopback without authentication (anyone who reaches it reads every study)",
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host) and not auth_enabled():
        if not args.insecure:
            parser.error(
                f"refusing to serve on {args.host} without authentication: anyone who can reach it could "
                "read every study. Turn authentication on (MONAI_LABEL_AUTH_ENABLE=true, see SECURITY.md), "
                "keep --host 127.0.0.1 behind a TLS reverse proxy, or pass --insecure"
            )
        print(
            f"WARNING: --insecure: serving on {args.host} WITHOUT authentication; every client that reaches this "
            "address can read every study and run the model.",
            file=sys.stderr,
            flush=True,
        )

    import torch

    studies = args.studies or str(prepare_sample_studies(DEFAULT_STUDIES))
    device = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else "cpu"
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    print(banner(f"http://{host}:{args.port}", studies, device), flush=True)
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(APP_DIR),
        "--studies",
        studies,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if args.insecure:
        command += ["--conf", "insecure", "true"]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
