"""The MONAI Label app on a real ``monailabel start_server`` over HTTP: contract, persistence, robustness.

One server (module scope) serves a local datastore holding a small crop of the held-out lung2 volume; the
shipped weights denoise it on CPU. Uploads use small crops so each request takes about a second.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import SimpleITK as sitk
from requests_toolbelt.multipart.decoder import MultipartDecoder

from langmamba.checkpoint import load_checkpoint
from langmamba.cli import main as cli_main
from langmamba.explain import validate_explanation
from langmamba.infer import denoise_ct_volume
from langmamba.io import read_volume, write_volume
from langmamba.runtime import default_weights
from langmamba.sample_data import sample_path
from tests.servers import MonaiLabelServer, crop

pytestmark = pytest.mark.server  # every test here starts a real server

UPLOAD_LIMIT_MB = 8


@pytest.fixture(scope="module")
def lung2():
    return read_volume(sample_path("lung2"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, lung2):
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = tmp / "studies"
    studies.mkdir()
    write_volume(crop(lung2, slice(28, 31), slice(160, 288), slice(128, 256)), studies / "chest.nrrd")
    # Two langmamba.workers processes, forked inside the server, read and write the DICOM of the requests.
    # max_per_client 8: the concurrency test sends 8 requests at once from this one client
    srv = MonaiLabelServer(
        studies,
        tmp,
        conf={"max_upload_mb": str(UPLOAD_LIMIT_MB), "max_voxels": "4000000", "max_per_client": "8"},
        env={"LANGMAMBA_WORKERS": "2"},
    )
    srv.studies = studies
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_upload(tmp_path_factory, lung2) -> Path:
    path = tmp_path_factory.mktemp("upload") / "small.nrrd"
    write_volume(crop(lung2, slice(30, 32), slice(192, 320), slice(160, 288)), path)
    return path


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(default_weights())


def _image(content: bytes, tmp: Path) -> sitk.Image:
    path = tmp / "response.nrrd"
    path.write_bytes(content)
    return sitk.ReadImage(str(path))


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_info_describes_the_denoising_task(server, model):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    task = info["models"]["langmamba_denoise"]
    assert task["type"] == "others" and task["labels"] == {} and task["output"] == "image"
    assert {"blend", "level", "device", "explain"} <= set(task["config"])
    assert task["vocabulary"] == list(model.langae.vocabulary)
    assert info["trainers"] == {}


def test_upload_output_image_is_the_denoised_volume_on_the_input_grid(server, small_upload, model, tmp_path):
    response = server.infer(upload=small_upload, output="image", params={"explain": False})
    assert response.status_code == 200, response.text
    result = _image(response.content, tmp_path)
    source = sitk.ReadImage(str(small_upload))
    _same_geometry(result, source)
    assert result.GetPixelID() == sitk.sitkFloat32
    expected = denoise_ct_volume(model, read_volume(small_upload), device="cpu").hu
    got = sitk.GetArrayFromImage(result)
    np.testing.assert_allclose(got, expected, atol=0.5)
    assert np.abs(got - sitk.GetArrayFromImage(source)).mean() > 1.0  # the model changed the image


def test_blend_zero_returns_the_input(server, small_upload, tmp_path):
    response = server.infer(upload=small_upload, output="image", params={"explain": False, "blend": 0.0})
    assert response.status_code == 200, response.text
    got = sitk.GetArrayFromImage(_image(response.content, tmp_path))
    np.testing.assert_allclose(got, sitk.GetArrayFromImage(sitk.ReadImage(str(small_upload))), atol=1e-3)


def test_by_image_id_json_has_explanations_and_saves_a_new_image(server):
    response = server.infer(image="chest", output="json", params={"level": 1, "top_k": 2})
    assert response.status_code == 200, response.text
    params = response.json()
    document = params["explanations"]
    validate_explanation(document)
    assert [level["level"] for level in document["levels"]] == [1] and document["top_k"] == 2
    assert len(document["slices"]) == 3
    saved = params["saved"]
    assert saved["image_id"] == "chest_langmamba"
    stored = read_volume(server.studies / "chest_langmamba.nrrd")
    original = read_volume(server.studies / "chest.nrrd")
    assert stored.shape == original.shape and np.allclose(stored.origin, original.origin)
    on_disk = json.loads((server.studies / saved["explanations"]).read_text())
    assert on_disk["summary"] == document["summary"]
    datastore = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    entry = datastore["objects"]["chest_langmamba"]
    assert entry["labels"] == {} and entry["image"]["info"]["derived_from"] == "chest"


def test_save_false_stores_nothing(server):
    before = sorted(p.name for p in server.studies.iterdir())
    response = server.infer(image="chest", output="json", params={"save": False, "explain": False})
    assert response.status_code == 200, response.text
    assert response.json()["saved"] is None and response.json()["explanations"] is None
    assert sorted(p.name for p in server.studies.iterdir()) == before


def test_zipped_dicom_series_upload(server, lung2, tmp_path, dicom_series_writer):
    volume = crop(lung2, slice(30, 32), slice(192, 256), slice(160, 240))
    files = dicom_series_writer(
        tmp_path / "series", volume.hu, spacing=volume.spacing, origin=volume.origin, direction=volume.direction
    )
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in files:
            zipped.write(path, f"study/series/{path.name}")
    response = server.infer(upload=archive, output="image", params={"explain": False})
    assert response.status_code == 200, response.text
    result = _image(response.content, tmp_path)
    assert result.GetSize() == (80, 64, 2)
    np.testing.assert_allclose(result.GetSpacing(), volume.spacing, rtol=1e-5)
    np.testing.assert_allclose(result.GetOrigin(), volume.origin, atol=1e-3)
    # the series was read by the server's two worker processes, forked beside its threads
    assert len(psutil.Process(server.process.pid).children()) == 2


def test_output_all_is_multipart_params_and_image(server, tmp_path):
    response = server.infer(image="chest", output="all", params={"level": 0, "explain": True, "save": False})
    assert response.status_code == 200, response.text
    parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
    by_name = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p for p in parts}
    params = json.loads(by_name["params"].content)
    assert params["level"] == 0 and [lv["level"] for lv in params["explanations"]["levels"]] == [0]
    _same_geometry(_image(by_name["image"].content, tmp_path), sitk.ReadImage(str(server.studies / "chest.nrrd")))


def test_server_and_cli_give_the_same_outputs_for_the_same_volume(server, small_upload, tmp_path):
    """The server and ``langmamba denoise`` run one denoise job: same file and parameters, same results."""
    response = server.infer(upload=small_upload, output="all", params={"level": 1, "top_k": 2, "blend": 0.8})
    assert response.status_code == 200, response.text
    parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
    by_name = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p for p in parts}
    served = json.loads(by_name["params"].content)
    served_hu = sitk.GetArrayFromImage(_image(by_name["image"].content, tmp_path))

    out = tmp_path / "cli"
    out.mkdir()
    # the server's task denoises 4 slices per batch on the CPU ("auto" here)
    assert (
        cli_main(
            [
                "denoise",
                str(small_upload),
                str(out / "denoised.nrrd"),
                "--explain",
                str(out / "e.json"),
                "--explain-levels",
                "1",
                "--top-k",
                "2",
                "--blend",
                "0.8",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    cli_hu = read_volume(out / "denoised.nrrd").hu
    document = json.loads((out / "e.json").read_text())

    assert served_hu.dtype == np.float32 and served_hu.shape == cli_hu.shape
    np.testing.assert_array_equal(served_hu, cli_hu)
    validate_explanation(document)
    assert [level["level"] for level in document["levels"]] == [1] and document["top_k"] == 2
    assert served["explanations"] == document  # the whole document: header, every slice's regions, summary


def _mr_dicom(tmp: Path, writer) -> Path:
    hu = np.random.default_rng(0).integers(0, 800, size=(1, 32, 32)).astype(np.float32)
    return writer(tmp / "mr", hu, modality="MR", intercept=0.0)[0]


def _picture(tmp: Path) -> Path:
    path = tmp / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 48), dtype=np.uint8)), str(path))
    return path


def _truncated(tmp: Path, source: Path) -> Path:
    path = tmp / "truncated.nrrd"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def _huge_header(tmp: Path) -> Path:
    path = tmp / "huge.nrrd"
    path.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4096 4096 4096\nencoding: raw\n"
        b"endian: little\nspace: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n\n" + b"\0" * 1024
    )
    return path


def _huge_body(tmp: Path) -> Path:
    path = tmp / "big.nrrd"
    path.write_bytes(b"\0" * ((UPLOAD_LIMIT_MB + 1) << 20))
    return path


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda tmp, src, writer: _write(tmp / "notes.txt", b"not an image at all\n"), 415, "unknown file type"),
        (lambda tmp, src, writer: _mr_dicom(tmp, writer), 400, "MR"),
        (lambda tmp, src, writer: _picture(tmp), 400, "picture"),
        (lambda tmp, src, writer: _write(tmp / "empty.nrrd", b""), 400, "empty"),
        (lambda tmp, src, writer: _truncated(tmp, src), 400, "truncated.nrrd"),
        (lambda tmp, src, writer: _huge_header(tmp), 413, "voxels"),
        (lambda tmp, src, writer: _huge_body(tmp), 413, "upload limit"),
    ],
    ids=["not-an-image", "mr", "2d-picture", "empty", "truncated", "huge-volume", "huge-upload"],
)
def test_bad_upload_is_a_clear_4xx_and_the_server_keeps_serving(
    server, small_upload, tmp_path, dicom_series_writer, make, status, words
):
    response = server.infer(upload=make(tmp_path, small_upload, dicom_series_writer), output="image")
    assert response.status_code == status, response.text
    body = response.json()
    assert words.lower() in body["detail"].lower(), body
    assert str(server.tmpdir) not in body["detail"]  # the server's temporary paths are not shown
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("query", "params", "status", "words"),
    [
        ({"image": "chest", "output": "json"}, {"blend": 1.5}, 422, "blend"),
        ({"image": "chest", "output": "json"}, {"level": 7}, 422, "level"),
        ({"image": "chest", "output": "xml"}, {}, 422, "output"),
        ({"image": "chest", "output": "json"}, {"save": "no"}, 422, "save"),
        ({"image": "no-such-image", "output": "json"}, {}, 404, "no-such-image"),
        ({"output": "json"}, {}, 400, "image id"),
    ],
    ids=["blend", "level", "output", "save", "unknown-id", "nothing"],
)
def test_bad_request_is_a_clear_4xx(server, query, params, status, words):
    response = requests.post(
        f"{server.url}/infer/langmamba_denoise", params=query, data={"params": json.dumps(params)}, timeout=60
    )
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_concurrent_requests_all_complete_while_info_stays_responsive(server, small_upload, tmp_path):
    reference = server.infer(upload=small_upload, output="image", params={"explain": False})
    expected = sitk.GetArrayFromImage(_image(reference.content, tmp_path))
    done = threading.Event()
    info_latencies = []

    def poll_info():
        while not done.is_set():
            start = time.perf_counter()
            assert requests.get(f"{server.url}/info/", timeout=60).status_code == 200
            info_latencies.append(time.perf_counter() - start)
            time.sleep(0.05)

    poller = threading.Thread(target=poll_info)
    poller.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(lambda _: server.infer(upload=small_upload, output="all", params={"explain": False}), range(8))
            )
    finally:
        done.set()
        poller.join()
    denoise_s = []
    for response in responses:
        assert response.status_code == 200, response.text
        parts = MultipartDecoder(response.content, response.headers["content-type"]).parts
        params = json.loads(parts[0].content)
        denoise_s.append(params["timings_s"]["denoise"])
        np.testing.assert_allclose(sitk.GetArrayFromImage(_image(parts[1].content, tmp_path)), expected, atol=1e-3)
    # requests queue behind the model lock: the last one waited for several others
    assert max(
        json.loads(MultipartDecoder(r.content, r.headers["content-type"]).parts[0].content)["timings_s"]["queued"]
        for r in responses
    ) >= 2 * min(denoise_s)
    # /info/ kept answering during the queue, each time faster than one inference (a blocked server cannot)
    assert len(info_latencies) >= 8
    assert np.median(info_latencies) < np.median(denoise_s)


def test_no_temporary_files_are_left_behind(server):
    time.sleep(1.0)  # responses' background clean-up runs after the body is sent
    assert server.temp_files() == server.startup_files
