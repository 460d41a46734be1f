"""io.atomic's folder writer: a folder langmamba owns is replaced whole or not at all."""

from __future__ import annotations

import pytest

from langmamba.io.atomic import atomic_folder


def test_atomic_folder_swaps_in_a_new_folder_and_leaves_no_staging(tmp_path):
    target = tmp_path / "cache" / "entry"
    with atomic_folder(target) as staging:
        assert staging.parent == target.parent and staging.name.startswith(".entry.tmp-")
        (staging / "a.txt").write_text("first")
        assert not target.exists()  # nothing visible until the writer is done
    assert (target / "a.txt").read_text() == "first"
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # the old folder is gone whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]


def test_atomic_folder_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "kept.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), atomic_folder(target) as staging:
        (staging / "partial.txt").write_text("new")
        raise RuntimeError("failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt"]


def test_atomic_folder_replaces_a_file_of_that_name(tmp_path):
    target = tmp_path / "entry"
    target.write_text("a stale file")
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("x")
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
