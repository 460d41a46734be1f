"""Issue 12's attacks on a real MONAI Label server with the LangMamba app (auth off), each tried and refused.

One server (module scope) serves a local datastore with: ``chest`` (3 slices of 128²), ``long`` (120 slices of
128², about 10 s of CPU), ``empty`` (a 0-byte file), ``victim`` whose result name ``victim_langmamba.nrrd`` is a
symlink to a file outside the studies folder, ``own`` beside a user's own image ``own_langmamba``, and a stale
temporary of an interrupted write. The crash test runs
its own servers (one is killed with SIGKILL while it saves).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import http.client
import json
import os
import select
import signal
import struct
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from langmamba.io import CTVolume, read_volume, write_volume
from langmamba.sample_data import sample_path
from tests.servers import MonaiLabelServer, crop

pytestmark = pytest.mark.server  # every test here starts a real server

SECRET = b"outside the studies folder: must never be read or written\n"
PATIENT_FILE_NAME = "DOE^JANE_1957-03-02.nrrd"  # an upload's name, as a client might send it


@pytest.fixture(scope="module")
def lung2():
    return read_volume(sample_path("lung2"))


def _tiled(volume: CTVolume, slices: int) -> CTVolume:
    hu = np.concatenate([volume.hu] * (slices // volume.shape[0] + 1))[:slices]
    return CTVolume(
        hu=np.ascontiguousarray(hu), spacing=volume.spacing, origin=volume.origin, direction=volume.direction
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, lung2):
    tmp = tmp_path_factory.mktemp("security")
    studies = tmp / "studies"
    outside = tmp / "outside"
    studies.mkdir()
    outside.mkdir()
    chest = crop(lung2, slice(28, 31), slice(160, 288), slice(128, 256))
    write_volume(chest, studies / "chest.nrrd")
    write_volume(_tiled(crop(lung2, slice(0, 61), slice(160, 288), slice(128, 256)), 120), studies / "long.nrrd")
    write_volume(chest, studies / "victim.nrrd")
    write_volume(chest, studies / "own.nrrd")
    (studies / "own_langmamba.nrrd").write_bytes((studies / "own.nrrd").read_bytes())  # a user's own image
    (studies / "empty.nrrd").write_bytes(b"")
    (outside / "secret.nrrd").write_bytes(SECRET)
    (outside / "target.nrrd").write_bytes(SECRET)
    (studies / "victim_langmamba.nrrd").symlink_to(outside / "target.nrrd")
    stale = studies / ".chest_langmamba.nrrd.tmp-0123abcd"
    stale.mkdir()
    (stale / "chest_langmamba.nrrd").write_bytes(b"half a file")
    srv = MonaiLabelServer(
        studies,
        tmp,
        conf={"max_queue": "3", "max_per_client": "2", "audit_log": str(tmp / "audit.jsonl")},
        env={"LANGMAMBA_WORKERS": "0"},
    )
    srv.studies, srv.outside, srv.audit = studies, outside, tmp / "audit.jsonl"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_upload(tmp_path_factory, lung2) -> Path:
    path = tmp_path_factory.mktemp("upload") / PATIENT_FILE_NAME
    write_volume(crop(lung2, slice(30, 31), slice(192, 256), slice(160, 224)), path)
    return path


def _audit(server) -> list[dict]:
    return [json.loads(line) for line in server.audit.read_text().splitlines()]


# --- confinement ------------------------------------------------------------------------------------------------


def test_start_up_removed_the_stale_temporary(server):
    assert not any(p.name.startswith(".chest_langmamba") for p in server.studies.iterdir())


@pytest.mark.parametrize(
    "image",
    [
        "no-such-image",
        "{outside}/secret.nrrd",
        "../outside/secret",
        "../../../../etc/passwd",
        "/etc/passwd",
        "{studies}/chest.nrrd",
        "chest.nrrd",
        "chest/../chest",
        "./chest",
        "..",
        "chest\\..\\chest",
        "~root",
        "empty",
        "labels/final/chest",
    ],
    ids=[
        "unknown",
        "absolute-outside",
        "dotdot-outside",
        "dotdot-etc",
        "etc-passwd",
        "absolute-inside",
        "with-extension",
        "dotdot-inside",
        "dot-slash",
        "dotdot",
        "backslashes",
        "home",
        "zero-byte",
        "labels-path",
    ],
)
def test_image_ids_name_datastore_entries_only_with_one_error(server, image):
    image = image.format(outside=server.outside, studies=server.studies)
    before = _snapshot(server.studies)
    response = server.infer(image=image, output="image", params={"explain": False})
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["error"] == "ImageNotFoundError"
    assert body["detail"] == f"the datastore holds no usable image with id {image!r}"  # same wording for all
    assert SECRET not in response.content
    assert _snapshot(server.studies) == before


def test_result_is_never_written_through_a_symlink(server):
    for params in ({"explain": False}, {"explain": False, "overwrite": True}):
        response = server.infer(image="victim", output="json", params=params)
        assert response.status_code == 409, response.text
        assert "symbolic link" in response.json()["detail"]
    assert (server.outside / "target.nrrd").read_bytes() == SECRET
    assert (server.studies / "victim_langmamba.nrrd").is_symlink()


def test_a_users_own_image_at_the_result_name_is_never_replaced(server):
    mine = (server.studies / "own_langmamba.nrrd").read_bytes()
    for params in ({"explain": False}, {"explain": False, "overwrite": True}):
        response = server.infer(image="own", output="json", params=params)
        assert response.status_code == 409, response.text
    assert "not an earlier LangMamba result" in response.json()["detail"]
    assert (server.studies / "own_langmamba.nrrd").read_bytes() == mine
    assert not (server.studies / "own_langmamba.explanations.json").exists()


def test_results_never_overwrite_unless_asked_and_never_chain(server):
    first = server.infer(image="chest", output="json", params={"explain": False})
    assert first.status_code == 200, first.text
    assert first.json()["saved"]["image_id"] == "chest_langmamba"
    stored = server.studies / "chest_langmamba.nrrd"
    before = stored.read_bytes()

    again = server.infer(image="chest", output="json", params={"explain": False, "blend": 0.5})
    assert again.status_code == 409 and "overwrite" in again.json()["detail"], again.text
    assert stored.read_bytes() == before
    bad = server.infer(image="chest", output="json", params={"explain": False, "overwrite": "yes"})
    assert bad.status_code == 422 and "overwrite" in bad.json()["detail"]

    replaced = server.infer(image="chest", output="json", params={"explain": False, "blend": 0.5, "overwrite": True})
    assert replaced.status_code == 200, replaced.text
    assert stored.read_bytes() != before
    info = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert info["objects"]["chest_langmamba"]["image"]["info"]["params"]["blend"] == 0.5

    chained = server.infer(image="chest_langmamba", output="json", params={"explain": False})
    assert chained.status_code == 422 and "itself a LangMamba result" in chained.json()["detail"]
    assert not (server.studies / "chest_langmamba_langmamba.nrrd").exists()
    unsaved = server.infer(image="chest_langmamba", output="json", params={"explain": False, "save": False})
    assert unsaved.status_code == 200, unsaved.text


def test_stored_files_have_the_servers_extension_only(server):
    names = {p.name for p in server.studies.iterdir()}
    written = {n for n in names if n.startswith("chest_langmamba")}
    assert written <= {"chest_langmamba.nrrd", "chest_langmamba.explanations.json"}


# --- routes, CORS, docs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/datastore/image?image=../outside/x"),
        ("PUT", "/datastore/image?image=x"),
        ("DELETE", "/datastore/image?id=chest"),
        ("PUT", "/datastore/label?image=chest&tag=../../x"),
        ("DELETE", "/datastore/label?id=chest&tag=final"),
        ("GET", "/datastore/image?image=chest"),
        ("GET", "/datastore/dataset"),
        ("POST", "/batch/infer/langmamba_denoise?run_sync=true"),
        ("POST", "/train/"),
        ("PUT", "/model/langmamba_denoise"),
        ("GET", "/model/langmamba_denoise"),
        ("PUT", "/session/"),
        ("GET", "/logs/"),
        ("POST", "/activelearning/random"),
        ("POST", "/scoring/"),
        ("POST", "/infer/other_model?image=chest"),
        ("GET", "/proxy/dicom/studies"),
        ("POST", "/reload"),
        ("GET", "/ohif/"),
    ],
    ids=lambda v: str(v),
)
def test_stock_routes_the_product_does_not_need_are_off(server, method, path):
    before = _snapshot(server.studies)
    response = requests.request(
        method, f"{server.url}{path}", files={"file": ("x.nrrd.sh", b"#!/bin/sh\n")}, timeout=30
    )
    assert response.status_code == 404, (path, response.text)
    assert _snapshot(server.studies) == before
    assert not (server.tmpdir.parent / "x.nrrd.sh").exists()


def test_docs_list_only_the_served_routes(server):
    assert requests.get(f"{server.url}/docs", timeout=30).status_code == 200  # auth off: docs open
    paths = requests.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    assert set(paths) == {"/info/", "/datastore/", "/infer/langmamba_denoise"}
    assert set(paths["/datastore/"]) == {"get"}


def test_cors_is_off_without_an_origin_allow_list(server):
    evil = {"Origin": "http://evil.example"}
    response = requests.get(f"{server.url}/info/", headers=evil, timeout=30)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers
    preflight = requests.options(
        f"{server.url}/infer/langmamba_denoise", timeout=30, headers={**evil, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


# --- parameters, result names, audit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ("{not json", "JSON"),
        ("[1, 2]", "JSON object"),
        ("[" * 100_000, "longer than"),
        ("[" * 1500 + "]" * 1500, "JSON object"),
        (json.dumps({"blend": 0.5, "pirate": True}), "unknown params key"),
        (json.dumps({"image": "/etc/passwd"}), "unknown params key"),
        (json.dumps({"upload": "/etc/passwd"}), "unknown"),
    ],
    ids=["malformed", "array", "too-long", "too-deep", "unknown-key", "image-key", "upload-key"],
)
def test_bad_params_are_422_never_500(server, params, words):
    response = requests.post(
        f"{server.url}/infer/langmamba_denoise",
        params={"image": "chest", "output": "json"},
        data={"params": params},
        timeout=60,
    )
    assert response.status_code == 422, response.text
    assert words in response.json()["detail"]


def test_stock_client_results_do_not_collide_and_audit_has_no_file_names(server, small_upload, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server.url, tmpdir=str(tmp_path))
    first, params = client.infer("langmamba_denoise", "", {"explain": False}, file=str(small_upload))
    second, _ = client.infer("langmamba_denoise", "", {"explain": False, "blend": 0.0}, file=str(small_upload))
    assert params["saved"] is None and first != second
    assert Path(first).exists() and Path(second).exists()
    assert not np.array_equal(read_volume(first).hu, read_volume(second).hu)

    records = _audit(server)
    uploads = [r for r in records if r["image"] == "upload" and r["status"] == 200]
    assert len(uploads) >= 2
    for record in records:
        assert set(record) == {"time", "user", "client", "image", "status", "outcome", "duration_s", "saved"}
        assert record["user"] == "anonymous" and record["client"].startswith("127.") and record["duration_s"] >= 0
    assert any(r["image"] == "chest" and r["outcome"] == "OverwriteError" and r["status"] == 409 for r in records)
    assert "DOE" not in server.audit.read_text() and "DOE" not in server.log.read_text()


# --- queue, per-client limit, cancellation ----------------------------------------------------------------------


def _hold(server, image: str, source: str) -> http.client.HTTPConnection:
    """Send a denoise request by id from ``source`` (a loopback address) without reading the answer."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        f"{json.dumps({'explain': False, 'save': False})}\r\n--{boundary}--\r\n"
    ).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120, source_address=(source, 0))
    connection.request(
        "POST",
        f"/infer/langmamba_denoise?image={image}&output=json",
        body=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    return connection


def _status(connection: http.client.HTTPConnection) -> int:
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


def test_queue_limits_and_cancellation_on_disconnect(server):
    reference = server.infer(image="chest", output="json", params={"explain": False, "save": False})
    assert reference.status_code == 200
    per_slice = reference.json()["timings_s"]["denoise"] / 3
    full = 120 * per_slice  # what one request on "long" costs

    held = [_hold(server, "long", "127.0.0.1"), _hold(server, "long", "127.0.0.1")]
    time.sleep(1.0)
    assert _status(_hold(server, "chest", "127.0.0.1")) == 429  # a third from the same client
    held.append(_hold(server, "long", "127.0.0.2"))
    time.sleep(1.0)
    assert _status(_hold(server, "chest", "127.0.0.3")) == 429  # the queue of 3 is full
    started = time.perf_counter()
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200
    assert time.perf_counter() - started < 2.0

    for connection in held:  # the clients go away: their work must stop between batches
        connection.sock.shutdown(2)
        connection.close()
    disconnected = time.perf_counter()
    while (
        response := server.infer(image="chest", output="json", params={"explain": False, "save": False}, timeout=300)
    ).status_code == 429:
        time.sleep(0.2)  # the cancelled requests give their places back as they stop
    waited = time.perf_counter() - disconnected
    assert response.status_code == 200, response.text
    assert waited < 0.5 * full, (waited, full)  # not behind three full runs, nor even one
    time.sleep(1.0)
    records = _audit(server)
    assert sum(r["status"] == 429 and r["outcome"] == "TooBusyError" for r in records) >= 2
    cancelled = [r for r in records if r["image"] == "long"]
    assert len(cancelled) == 3 and all(r["outcome"] == "CancelledError" for r in cancelled), cancelled
    assert not (server.studies / "long_langmamba.nrrd").exists()


# --- crash safety -----------------------------------------------------------------------------------------------

IN_CREATE = 0x100
IMAGE_STAGING = ".crash_langmamba.nrrd.tmp-"  # langmamba.io.atomic's temporary folder of the result image


class CreationWatch:
    """inotify on a folder: :meth:`wait` returns the name of the next entry created there (or None on timeout),
    within microseconds of the ``mkdir``, without polling."""

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self._libc.inotify_init()
        assert self.fd >= 0 and self._libc.inotify_add_watch(self.fd, str(folder).encode(), IN_CREATE) >= 0
        self._pending: list[str] = []

    def wait(self, timeout: float) -> str | None:
        if not self._pending:
            if not select.select([self.fd], [], [], timeout)[0]:
                return None
            data = os.read(self.fd, 65536)
            while data:
                _, _, _, length = struct.unpack_from("iIII", data)
                self._pending.append(data[16 : 16 + length].rstrip(b"\0").decode())
                data = data[16 + length :]
        return self._pending.pop(0)

    def close(self) -> None:
        os.close(self.fd)


def _overwrite_quietly(server, blend: float) -> None:
    with contextlib.suppress(requests.RequestException):  # the server was killed under it
        server.infer(
            image="crash", output="json", timeout=300, params={"explain": False, "blend": blend, "overwrite": True}
        )


def _kill(process) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)
    for child in children:
        child.kill()
    process.wait()


def _stop(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP ``pid`` and wait until every one of its threads is stopped: a thread inside a system call (the
    save's rename) finishes that call before it stops, so the files are only still until all show state T."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in "TtZX" for state in states):  # stopped or exited
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def test_kill_9_during_save_leaves_the_previous_result_and_restart_cleans_up(tmp_path, lung2):
    studies = tmp_path / "studies"
    studies.mkdir()
    write_volume(crop(lung2, slice(26, 34), slice(128, 384), slice(128, 384)), studies / "crash.nrrd")
    (studies / "hollow.nrrd").write_bytes(b"")
    env = {"LANGMAMBA_WORKERS": "0"}
    first = MonaiLabelServer(studies, tmp_path / "first", env=env)
    image = studies / "crash_langmamba.nrrd"
    caught = None
    watch = CreationWatch(studies)
    try:
        response = first.infer(image="crash", output="json", params={"explain": False})
        assert response.status_code == 200, response.text
        for attempt in range(20):
            previous = image.read_bytes()  # each attempt's blend differs, so a finished save changes the bytes
            thread = threading.Thread(target=_overwrite_quietly, args=(first, 0.5 + 0.02 * attempt), daemon=True)
            thread.start()
            while thread.is_alive() or watch._pending:
                name = watch.wait(0.5)
                if name is None or not name.startswith(IMAGE_STAGING):
                    continue
                _stop(first.process.pid)  # frozen mid-save; checked, then killed
                staging = studies / name
                if staging.is_dir() and image.read_bytes() == previous:
                    caught = sorted(p.name for p in staging.iterdir())
                    _kill(first.process)
                    break
                os.kill(first.process.pid, signal.SIGCONT)  # too late: the rename was done
            if caught is not None:
                break
            thread.join()
        assert caught is not None, "no save of the image was caught in progress in 20 tries"
        assert (studies / name).is_dir()  # the killed write's temporary folder is left ...
        assert image.read_bytes() == previous  # ... and the previous result is whole
    finally:
        watch.close()
        first.stop()

    second = MonaiLabelServer(
        studies,
        tmp_path / "second",
        env=env,
        conf={"cors_origins": "http://viewer.example, https://other.example:8443"},
    )
    try:
        assert not (studies / name).exists()  # start-up removed the interrupted write's temporaries
        assert not [p for p in studies.iterdir() if ".tmp-" in p.name]
        assert image.read_bytes() == previous
        assert read_volume(image).shape == (8, 256, 256)
        listed = requests.get(f"{second.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        assert listed["crash_langmamba"]["image"]["info"]["derived_from"] == "crash"
        hollow = second.infer(image="hollow", output="image", params={"explain": False})
        assert hollow.status_code == 404 and hollow.content != b"", hollow.text  # a 0-byte entry is never served
        # with an allow-list, listed origins are allowed and others are not
        allowed = requests.get(f"{second.url}/info/", headers={"Origin": "http://viewer.example"}, timeout=30)
        assert allowed.headers.get("access-control-allow-origin") == "http://viewer.example"
        evil = requests.get(f"{second.url}/info/", headers={"Origin": "http://evil.example"}, timeout=30)
        assert "access-control-allow-origin" not in evil.headers
    finally:
        second.stop()


# --- uploads: zip bombs, detached data files, declared sizes ----------------------------------------------------


def _peak_rss(server) -> int:
    process = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_zip_bomb_upload_is_refused_quickly_without_unpacking(server, tmp_path):
    import zipfile

    bomb = tmp_path / "series.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(4):  # 4 × 512 MiB of zeros: about 2 MB compressed, 2 GiB unpacked
            with archive.open(f"{index}.dcm", "w", force_zip64=True) as member:
                block = bytes(1 << 20)
                for _ in range(512):
                    member.write(block)
    assert bomb.stat().st_size < 4 << 20
    before_rss, before_cpu = _peak_rss(server), psutil.Process(server.process.pid).cpu_times()
    started = time.monotonic()
    response = server.infer(upload=bomb, params={"explain": False})
    elapsed = time.monotonic() - started
    after_cpu = psutil.Process(server.process.pid).cpu_times()
    assert response.status_code == 413, response.text
    assert elapsed < 10 and (after_cpu.user + after_cpu.system) - (before_cpu.user + before_cpu.system) < 10
    assert _peak_rss(server) - before_rss < 1 << 30
    assert not list(server.tmpdir.rglob("*.dcm")), "nothing of the archive may stay on disk"


def test_detached_header_upload_cannot_read_another_file(server, tmp_path):
    header = tmp_path / "scan.nhdr"
    header.write_text(
        "NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 1\nencoding: raw\n"
        f"data file: {server.outside / 'secret.nrrd'}\n\n"
    )
    response = server.infer(upload=header, params={"explain": False, "blend": 0.0}, output="image")
    assert response.status_code == 400, response.text
    assert SECRET not in response.content and b"secret" not in response.content


def test_a_tiny_header_declaring_gigabytes_is_refused_before_allocating(server, tmp_path):
    header = tmp_path / "huge.nrrd"
    header.write_bytes(
        b"NRRD0004\ntype: double\ndimension: 3\nsizes: 512 512 1900\nencoding: raw\nendian: little\n\n" + bytes(64)
    )
    before = _peak_rss(server)
    response = server.infer(upload=header, params={"explain": False})
    assert response.status_code == 413, response.text
    assert _peak_rss(server) - before < 1 << 30
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200
