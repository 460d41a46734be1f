"""MONAI Label app hosting LangMamba low-dose CT denoising with explanations.

Start it with ``monailabel start_server --app monailabel_app --studies <folder or DICOMweb URL>`` (or ``make run``
for the sample study). ``--conf`` keys (all optional):

- ``weights``: LangMamba checkpoint folder (default: the shipped ``weights/langmamba``, or ``$LANGMAMBA_WEIGHTS``);
- ``max_upload_mb``: largest accepted request body in MiB (default 1024);
- ``max_voxels``: largest accepted volume in voxels, checked from the header before reading (default
  512 x 512 x 2000);
- ``save``: ``true`` (default) to store every result computed for a datastore image back into the datastore.

Results of requests by image id are saved: on a local datastore as a new *image* ``<id>_langmamba`` (NRRD, float32
HU) with ``<id>_langmamba.explanations.json`` beside it; on DICOMweb as a new derived CT series in the same study
(STOW-RS), with the explanations kept in the server's DICOMweb cache.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.utils.others.generic import strtobool

import langmamba
from langmamba.denoise import default_weights
from langmamba.evaluate import write_json
from langmamba.io import write_volume

from lib import auth
from lib.endpoint import MODEL, ImageNotFoundError, install_route
from lib.task import DenoiseParams, DenoiseResult, LangMambaDenoise

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
        self._fetch_lock = threading.Lock()
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
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app"):
            install_route(server.app, lambda: self)

    def init_infers(self) -> dict[str, LangMambaDenoise]:
        return {MODEL: LangMambaDenoise(self.weights, max_voxels=self.max_voxels)}

    def init_strategies(self) -> dict:
        return {}

    # --- inference --------------------------------------------------------------------------------------------

    def _image_path(self, image_id: str, datastore: Any) -> Path:
        """The file or DICOM folder of datastore image ``image_id`` (DICOMweb series are fetched into the cache)."""
        try:
            with self._fetch_lock:
                uri = datastore.get_image_uri(image_id)
        except Exception as err:  # DICOMweb clients raise HTTP errors of several types for unknown series
            raise ImageNotFoundError(f"image {image_id!r} could not be fetched from the datastore ({err})") from err
        if not uri or not os.path.exists(uri):
            raise ImageNotFoundError(f"the datastore holds no image with id {image_id!r}")
        path = Path(uri)
        if not isinstance(datastore, DICOMWebDatastore) or path.is_dir():
            return path
        # The DICOMweb datastore converts a newly fetched series to NIfTI in a temporary file, copies it into
        # its cache beside the DICOM folder and returns the temporary file, which it never removes. Read the
        # DICOM folder itself, so the result can go back as a derived series of the same study.
        cached = Path(LocalDatastore.get_image_uri(datastore, image_id))
        if cached != path and path.parent == Path(tempfile.gettempdir()):
            path.unlink(missing_ok=True)
        series = cached.parent / image_id
        return series if series.is_dir() else cached

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """Denoise ``request["upload"]`` (a file path) or datastore image ``request["image"]``.

        Returns MONAI Label's result dict: ``file``/``label`` = a temporary NRRD the caller removes, ``params`` =
        the summary with ``explanations`` (the document, or ``None``) and ``saved`` (where the result was stored,
        for datastore images).
        """
        task = self._infers.get(request.get("model", ""))
        if not isinstance(task, LangMambaDenoise):
            return super().infer(request, datastore)
        datastore = datastore or self.datastore()
        params = DenoiseParams.from_request(request, task.levels)
        image = request.get("image") or ""
        upload = request.get("upload") or ""
        image_id = None
        if upload:
            path = Path(upload)
        elif os.path.isabs(image) and os.path.exists(image):
            path = Path(image)  # MONAI Label's generic route and batch inference pass files by path
        else:
            image_id = image
            path = self._image_path(image_id, datastore)
        started = time.perf_counter()
        volume = task.read(path)
        read_s = time.perf_counter() - started
        result = task.run(volume, params)
        started = time.perf_counter()
        file = task.write_result(result)
        timings = {"read": round(read_s, 3), **result.summary["timings_s"],
                   "write": round(time.perf_counter() - started, 3)}
        summary = {**result.summary, "timings_s": timings, "saved": None}
        try:
            save = self.save_results if params.save is None else params.save
            if image_id and save:
                summary["saved"] = self._persist(image_id, result, file, datastore)
        except Exception:
            file.unlink(missing_ok=True)
            raise
        summary["explanations"] = result.explanations
        return {"label": str(file), "tag": DefaultLabelTag.ORIGINAL, "file": str(file), "params": summary}

    # --- persistence ------------------------------------------------------------------------------------------

    def _persist(self, image_id: str, result: DenoiseResult, file: Path, datastore: Any) -> dict | None:
        if isinstance(datastore, DICOMWebDatastore):
            return self._store_series(image_id, result, datastore)
        if isinstance(datastore, LocalDatastore) and not settings.MONAI_LABEL_DATASTORE_READ_ONLY:
            return self._store_image(image_id, result, file, datastore)
        logger.info("results are not saved: the datastore is read-only or of another kind")
        return None

    def _store_image(self, image_id: str, result: DenoiseResult, file: Path, datastore: LocalDatastore) -> dict:
        """Add the result as a new image ``<id>_langmamba`` beside the original, with its explanations JSON."""
        new_id = f"{image_id}{DERIVED_SUFFIX}"
        folder = Path(datastore.get_image_uri(image_id)).parent
        info = {"derived_from": image_id, "model": MODEL,
                "params": {k: result.summary[k] for k in ("blend", "level", "explain", "top_k", "device")}}
        if result.explanations is not None:
            explanations = write_json(result.explanations, folder / f"{new_id}.explanations.json")
            info["explanations"] = explanations.name
        datastore.add_image(new_id, str(file), info)
        return {"datastore": "local", "image_id": new_id, **({"explanations": info["explanations"]}
                                                               if "explanations" in info else {})}

    def _store_series(self, image_id: str, result: DenoiseResult, datastore: DICOMWebDatastore) -> dict:
        """STOW-RS the result as a new derived CT series in the original's study; the explanations go to the
        DICOMweb cache beside the downloaded series."""
        with tempfile.TemporaryDirectory(prefix="langmamba-stow-") as tmp:
            series = write_volume(result.denoised, Path(tmp) / "series", series_description=SERIES_DESCRIPTION,
                                  derived_from=result.source)
            datasets = [pydicom.dcmread(str(p)) for p in sorted(series.iterdir())]
            # the datastore's own client carries its URL prefixes and credentials
            datastore._client.store_instances(datasets=datasets)
        series_uid = str(datasets[0].SeriesInstanceUID)
        saved = {"datastore": "dicomweb", "series_uid": series_uid,
                 "study_uid": str(datasets[0].StudyInstanceUID), "instances": len(datasets)}
        if result.explanations is not None:
            cache = Path(result.source.source).parent if result.source.source else None
            if cache is not None and cache.is_dir():
                saved["explanations"] = str(write_json(result.explanations,
                                                       cache / f"{series_uid}.explanations.json"))
        list_images = getattr(type(datastore).list_images, "cache_clear", None)
        if list_images is not None:
            list_images()
        return saved

