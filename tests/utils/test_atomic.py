"""Staged writes: the destination is whole or untouched, and no staging file is left behind."""

from __future__ import annotations

import pytest

from respec.utils.atomic import staged_dir, write_text_atomic


def test_write_text_atomic_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "timings.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["timings.json"]


def test_staged_dir_replaces_an_existing_directory_whole(tmp_path):
    out = tmp_path / "head"
    with staged_dir(out) as staging:
        (staging / "old.txt").write_text("old")
    with staged_dir(out) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["head"]


def test_staged_dir_leaves_the_destination_untouched_on_error(tmp_path):
    out = tmp_path / "head"
    with staged_dir(out) as staging:
        (staging / "good.txt").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"), staged_dir(out) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in out.iterdir()] == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["head"]
