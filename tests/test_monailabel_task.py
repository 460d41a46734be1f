"""The ``langmamba_denoise`` infer task in-process (no server): MONAI Label's ``__call__`` interface."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from langmamba.explain import validate_explanation
from langmamba.io import read_volume, write_volume
from langmamba.runtime import default_weights
from langmamba.sample_data import sample_path
from tests.servers import APP_DIR, crop


@pytest.fixture(scope="module")
def task_module():
    """``monailabel_app/lib/task.py`` under its own name, so no ``lib`` package lands on ``sys.path``."""
    name = "_langmamba_monailabel_task"
    spec = importlib.util.spec_from_file_location(name, APP_DIR / "lib" / "task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def test_call_returns_the_document_path_without_reading_it(task_module, tmp_path):
    volume = crop(read_volume(sample_path("lung2")), slice(30, 31), slice(192, 224), slice(160, 192))
    source = tmp_path / "small.nrrd"
    write_volume(volume, source)
    task = task_module.LangMambaDenoise(default_weights())
    image, params = task({"image": str(source), "level": 1, "device": "cpu"})
    image_file, document_file = Path(image), Path(params["explanations_file"])
    try:
        assert "explanations" not in params
        assert params["level"] == 1 and params["shape_zyx"] == [1, 32, 32]
        assert image_file.is_file() and document_file.is_file()
        document = json.loads(document_file.read_text(encoding="utf-8"))
        validate_explanation(document)
        assert len(document["slices"]) == 1
    finally:
        image_file.unlink(missing_ok=True)
        document_file.unlink(missing_ok=True)

    image, params = task({"image": str(source), "explain": False, "device": "cpu"})
    Path(image).unlink()
    assert params["explanations_file"] is None
