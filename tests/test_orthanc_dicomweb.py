"""The app on a real Orthanc (DICOMweb): denoise a series by id, the result comes back as a derived series.

Orthanc and its DICOMweb plugin are Debian packages that ``.ci/run`` installs; without them this test fails
(it does not skip). Four slices of lung2 (256² crop) are written as DICOM by the tests' own pydicom writer and
uploaded to Orthanc as one study.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from langmamba.io import read_volume
from langmamba.sample_data import sample_path
from tests.conftest import write_ct_series
from tests.servers import MonaiLabelServer, Orthanc, crop

pytestmark = pytest.mark.server  # every test here starts a real server


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("orthanc")
    orthanc = Orthanc(tmp)
    source = crop(read_volume(sample_path("lung2")), slice(28, 32), slice(128, 384), slice(128, 384))
    study_uid, series_uid = generate_uid(), generate_uid()
    files = write_ct_series(
        tmp / "series",
        source.hu,
        spacing=source.spacing,
        origin=source.origin,
        direction=source.direction,
        study_uid=study_uid,
        series_uid=series_uid,
    )
    orthanc.upload(files)
    orthanc.study_uid, orthanc.series_uid, orthanc.source = study_uid, series_uid, source
    yield orthanc
    orthanc.stop()


def _series(orthanc: Orthanc, study_uid: str) -> list[str]:
    found = requests.get(f"{orthanc.dicomweb}/studies/{study_uid}/series", timeout=30).json()
    return [item["0020000E"]["Value"][0] for item in found]


def test_dicomweb_result_is_stored_back_as_a_derived_series(pacs, tmp_path):
    server = MonaiLabelServer(pacs.dicomweb, tmp_path)
    try:
        status = requests.get(f"{server.url}/datastore/", timeout=60).json()
        assert status["total"] == 1  # the CT series found through QIDO-RS
        response = server.infer(image=pacs.series_uid, output="json", params={"level": 0})
        assert response.status_code == 200, response.text
        saved = response.json()["saved"]
        assert requests.get(f"{server.url}/datastore/", timeout=60).json()["total"] == 2
        # ids name series of the PACS only: paths and unknown UIDs get the same answer
        for bad in ("../../../etc/passwd", "/etc/passwd", "1.2.826.0.1.3680043.8.498.1"):
            refused = server.infer(image=bad, output="json", params={"save": False})
            assert refused.status_code == 404, refused.text
            assert refused.json()["detail"] == f"the datastore holds no usable image with id {bad!r}"
        assert server.temp_files() == server.startup_files
        log = server.log.read_text()
    finally:
        server.stop()
    assert "dcmqi" not in log.lower()  # started offline: no download of the DICOM SEG tools
    assert saved["datastore"] == "dicomweb" and saved["study_uid"] == pacs.study_uid
    assert sorted(_series(pacs, pacs.study_uid)) == sorted([pacs.series_uid, saved["series_uid"]])

    folder = tmp_path / "derived"
    folder.mkdir()
    instances = requests.get(f"{pacs.url}/series", timeout=30).json()
    for orthanc_id in instances:
        info = requests.get(f"{pacs.url}/series/{orthanc_id}", timeout=30).json()
        if info["MainDicomTags"]["SeriesInstanceUID"] != saved["series_uid"]:
            continue
        for k, instance in enumerate(info["Instances"]):
            data = requests.get(f"{pacs.url}/instances/{instance}/file", timeout=30).content
            (folder / f"{k:03d}.dcm").write_bytes(data)
    derived = read_volume(folder)
    source = pacs.source
    assert derived.shape == source.shape
    np.testing.assert_allclose(derived.spacing, source.spacing, rtol=1e-5)
    np.testing.assert_allclose(derived.origin, source.origin, atol=1e-3)
    np.testing.assert_allclose(derived.direction, source.direction, atol=1e-6)
    header = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    assert header.Modality == "CT" and "DERIVED" in header.ImageType
    assert header.StudyInstanceUID == pacs.study_uid and header.SeriesInstanceUID != pacs.series_uid
    assert np.abs(derived.hu - source.hu).mean() > 1.0  # denoised, not a copy
