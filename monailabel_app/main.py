"""MONAI Label app hosting LangMamba low-dose CT denoising with explanations.

Start it with ``monailabel start_server --app monailabel_app --studies <folder or DICOMweb URL>`` (or ``make run``
for the sample study). ``--conf`` keys (all optional):

- ``weights``: LangMamba checkpoint folder (default: the shipped ``weights/langmamba``, or ``$LANGMAMBA_WEIGHTS``);
- ``max_upload_mb``: largest accepted request body in MiB (default 1024);
- ``max_voxels``: largest accepted volume in voxels, checked from the header before reading (default
  512 x 512 x 2000);
- ``save``: ``true`` (default) to store every result computed for a datastore image back into the datastore;
- ``max_queue``: requests admitted at once, queued or running (default 16; more get 429);
- ``max_per_client``: requests one client (user, or address without auth) may have admitted (default 4);
- ``audit_log``: a file the audit records are appended to (JSON lines; default: the server log only);
- ``insecure``: ``true`` to serve beyond loopback without authentication (refused otherwise);
- ``cors_origins``: comma-separated origins (``https://viewer.example``) whose pages may call the server
  (default: none, CORS off).

Results of requests by image id are saved: on a local datastore as a new *image* ``<id>_langmamba`` (NRRD, float32
HU) with ``<id>_langmamba.explanations.json`` beside it; on DICOMweb as a new derived CT series in the same study
(STOW-RS), with the explanations kept in the server's DICOMweb cache. An existing result is replaced only when
the request says ``"overwrite": true``; results of results are not saved. See ``SECURITY.md`` for the defaults.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from filelock import FileLock
from lib import auth
from lib.admission import Admission
from lib.audit import AuditLog
from lib.confine import (
    ImageNotFoundError,
    check_image_id,
    check_servable,
    not_found,
    remove_stale_temporaries,
    result_path,
)
from lib.endpoint import MODEL, install_route
from lib.exposure import check_exposure
from lib.routes import parse_origins, secure_app
from lib.task import DenoiseParams, DenoiseResult, LangMambaDenoise
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import strtobool

import langmamba
from langmamba.errors import ConfigError, OverwriteError
from langmamba.io import write_volume
from langmamba.io.atomic import atomic_output
from langmamba.runtime import default_weights

logger = logging.getLogger(__name__)

DERIVED_SUFFIX = "_langmamba"
SERIES_DESCRIPTION = "LangMamba denoised"


class LangMambaApp(MONAILabelApp):
    """One infer task, ``langmamba_denoise``; no training, no active learning."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        self.weights = Path(conf["weights"]).expanduser() if conf.get("weights") else default_weights()
        self.max_upload_bytes = int(float(conf.get("max_upload_mb", 1024)) * (1 << 20))
        self.max_voxels = int(float(conf.get("max_voxels", 512 * 512 * 2000)))
        self.save_results = bool(strtobool(str(conf.get("save", "true"))))
        self.admission = Admission(int(conf.get("max_queue", 16)), int(conf.get("max_per_client", 4)))
        self.audit = AuditLog(conf.get("audit_log") or None)
        self.cors_origins = parse_origins(conf.get("cors_origins", ""))
        check_exposure(bool(strtobool(str(conf.get("insecure", "false")))))
        self._fetch_lock = threading.Lock()
        if not studies.startswith(("http://", "https://")):
            remove_stale_temporaries(Path(studies))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LangMamba",
            description="Low-dose CT denoising with LangMamba (language-guided Mamba decoder) and per-region word "
            "explanations. Image-to-image: results are CT volumes, not segmentations.",
            version=langmamba.__version__,
            labels={},
        )
        auth.install()
        self._warn_unservable()
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app"):
            install_route(server.app, lambda: self)
            secure_app(server.app, self.cors_origins)

    def _warn_unservable(self) -> None:
        """Log the local datastore's entries that will be refused (empty or unreadable files)."""
        datastore = self.datastore()
        if not isinstance(datastore, LocalDatastore):
            return
        bad = 0
        for image_id in datastore.list_images():
            try:
                check_servable(Path(datastore.get_image_uri(image_id)), image_id)
            except ImageNotFoundError:
                bad += 1
        if bad:
            logger.warning("%d datastore image(s) are empty or unreadable and will not be served", bad)

    def init_infers(self) -> dict[str, LangMambaDenoise]:
        return {MODEL: LangMambaDenoise(self.weights, max_voxels=self.max_voxels)}

    def init_strategies(self) -> dict:
        return {}

    # --- inference --------------------------------------------------------------------------------------------

    def _image_path(self, image_id: str, datastore: Any) -> Path:
        """The file or DICOM folder of datastore image ``image_id`` (DICOMweb series are fetched into the cache).

        Every id that is not a usable entry (unknown, a path, empty or unreadable) raises the same
        :class:`ImageNotFoundError`.
        """
        check_image_id(image_id)
        try:
            with self._fetch_lock:
                uri = datastore.get_image_uri(image_id)
        except Exception as err:  # DICOMweb clients raise HTTP errors of several types for unknown series
            logger.info("datastore lookup failed: %s", type(err).__name__)
            raise not_found(image_id) from err
        if not uri or not os.path.exists(uri):
            raise not_found(image_id)
        path = check_servable(Path(uri), image_id)
        if not isinstance(datastore, DICOMWebDatastore) or path.is_dir():
            return path
        # The DICOMweb datastore converts a newly fetched series to NIfTI in a temporary file, copies it into
        # its cache beside the DICOM folder and returns the temporary file, which it never removes. Read the
        # DICOM folder itself, so the result can go back as a derived series of the same study.
        cached = Path(LocalDatastore.get_image_uri(datastore, image_id))
        if cached != path and path.parent == Path(tempfile.gettempdir()):
            path.unlink(missing_ok=True)
        series = cached.parent / image_id
        return check_servable(series if series.is_dir() else cached, image_id)

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Denoise ``request["upload"]`` (a file path) or datastore image ``request["image"]``.

        Returns MONAI Label's result dict: ``file``/``label`` = a temporary NRRD, ``explanations_file`` = the
        explanation document as a temporary JSON file (or ``None``), both for the caller to remove, and ``params``
        = the summary with ``saved`` (where the result was stored, for datastore images); the response's
        ``params`` add the document as ``explanations`` (see :mod:`lib.endpoint`).
        """
        task = self._infers.get(request.get("model", ""))
        if not isinstance(task, LangMambaDenoise):
            return super().infer(request, datastore)
        datastore = datastore or self.datastore()
        params = DenoiseParams.from_request(request, task.levels)
        image = request.get("image") or ""
        upload = request.get("upload") or ""
        should_stop = request.get("should_stop")
        image_id = None
        target = None
        if upload:
            path = Path(upload)
        else:
            image_id = image
            path = self._image_path(image_id, datastore)
            if self.save_results if params.save is None else params.save:
                target = self._save_target(image_id, params, datastore)
        result = task.run(path, params, should_stop=should_stop)
        summary = {**result.summary, "saved": None}
        try:
            if target is not None:
                summary["saved"] = self._persist(image_id, result, datastore, target, params.overwrite)
        except Exception:
            result.remove_files()
            raise
        explanations = str(result.explanations_file) if result.explanations_file is not None else None
        return {
            "label": str(result.image_file),
            "tag": DefaultLabelTag.ORIGINAL,
            "file": str(result.image_file),
            "params": summary,
            "explanations_file": explanations,
        }

    # --- persistence ------------------------------------------------------------------------------------------

    def _save_target(self, image_id: str, params: DenoiseParams, datastore: Any) -> Path | str | None:
        """Where the result of ``image_id`` will be saved, checked before any work: a file in the studies folder
        (local), ``"dicomweb"``, or ``None`` (not saved). Refuses results of results (422) and existing entries
        that the request may not replace (409)."""
        if isinstance(datastore, DICOMWebDatastore):
            return "dicomweb"
        if not isinstance(datastore, LocalDatastore) or settings.MONAI_LABEL_DATASTORE_READ_ONLY:
            logger.info("results are not saved: the datastore is read-only or of another kind")
            return None
        source_info = datastore.get_image_info(image_id) or {}
        if image_id.endswith(DERIVED_SUFFIX) or source_info.get("derived_from"):
            raise ConfigError(
                f'image {image_id!r} is itself a LangMamba result; denoise its source instead, or pass "save": false'
            )
        new_id = f"{image_id}{DERIVED_SUFFIX}"
        existing = datastore._datastore.objects.get(new_id)
        replaceable = (
            existing is not None
            and existing.image.ext == ".nrrd"
            and existing.image.info.get("derived_from") == image_id
        )
        studies = Path(datastore._datastore.image_path())
        target = result_path(
            studies, new_id, listed=existing is not None, overwrite=params.overwrite, replaceable=replaceable
        )
        explanations = target.with_name(f"{new_id}.explanations.json")
        if explanations.is_symlink() or (explanations.exists() and not (params.overwrite and replaceable)):
            raise OverwriteError(
                f"the datastore folder already holds {explanations.name!r}; it is never replaced "
                "by another image's result"
            )
        return target

    def _persist(
        self, image_id: str, result: DenoiseResult, datastore: Any, target: Path | str, overwrite: bool
    ) -> dict | None:
        if target == "dicomweb":
            return self._store_series(image_id, result, datastore)
        return self._store_image(image_id, result, datastore, Path(target), overwrite)

    def _store_image(
        self, image_id: str, result: DenoiseResult, datastore: LocalDatastore, target: Path, overwrite: bool
    ) -> dict:
        """Add the result as image ``<id>_langmamba`` (``target``, in the studies folder) with its explanations
        JSON beside it; each file is written to a temporary sibling and renamed into place, the JSON first."""
        new_id = target.name[: -len(".nrrd")]
        info = {
            "derived_from": image_id,
            "model": MODEL,
            "params": {k: result.summary[k] for k in ("blend", "level", "explain", "top_k", "device")},
        }
        if result.explanations_file is not None:
            explanations = _copy_file(result.explanations_file, target.with_name(f"{new_id}.explanations.json"))
            info["explanations"] = explanations.name
        try:
            with atomic_output(target, as_folder=False, overwrite=overwrite) as staging:
                shutil.copyfile(result.image_file, staging / target.name)
        except OverwriteError as err:  # another request saved the same result meanwhile
            raise OverwriteError(
                f"the datastore already holds {new_id!r} (saved by another request meanwhile)"
            ) from err
        if result.explanations_file is None:  # an earlier result's document would no longer match the image
            target.with_name(f"{new_id}.explanations.json").unlink(missing_ok=True)
        info.update({"ts": int(time.time()), "name": target.name})
        with FileLock(datastore._lock_file):
            datastore._datastore.objects[new_id] = ImageLabelModel(image=DataModel(info=info, ext=".nrrd"))
            datastore._update_datastore_file(lock=False)
        return {
            "datastore": "local",
            "image_id": new_id,
            **({"explanations": info["explanations"]} if "explanations" in info else {}),
        }

    def _store_series(self, image_id: str, result: DenoiseResult, datastore: DICOMWebDatastore) -> dict:
        """STOW-RS the result as a new derived CT series in the original's study; the explanations go to the
        DICOMweb cache beside the downloaded series."""
        with tempfile.TemporaryDirectory(prefix="langmamba-stow-") as tmp:
            series = write_volume(
                result.denoised, Path(tmp) / "series", series_description=SERIES_DESCRIPTION, derived_from=result.source
            )
            datasets = [pydicom.dcmread(str(p)) for p in sorted(series.iterdir())]
            # the datastore's own client carries its URL prefixes and credentials
            datastore._client.store_instances(datasets=datasets)
        series_uid = str(datasets[0].SeriesInstanceUID)
        saved = {
            "datastore": "dicomweb",
            "series_uid": series_uid,
            "study_uid": str(datasets[0].StudyInstanceUID),
            "instances": len(datasets),
        }
        if result.explanations_file is not None:
            cache = Path(result.source.source).parent if result.source.source else None
            if cache is not None and cache.is_dir():
                saved["explanations"] = str(
                    _copy_file(result.explanations_file, cache / f"{series_uid}.explanations.json")
                )
        list_images = getattr(type(datastore).list_images, "cache_clear", None)
        if list_images is not None:
            list_images()
        return saved


def _copy_file(source: Path, target: Path) -> Path:
    """Copy ``source`` to ``target`` atomically (written beside it, then renamed into place, replacing it)."""
    with atomic_output(target, as_folder=False, overwrite=True) as staging:
        shutil.copyfile(source, staging / target.name)
    return target
