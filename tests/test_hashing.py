"""Crash-safe writes: a failed write leaves the previous folder; debris of a killed stage is
cleared by the next stage that starts."""

import pytest

from quantbuild.hashing import remove_staging_debris, staged_dir


def test_a_failed_write_leaves_the_previous_folder(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as staging:
        (staging / "a").write_text("first")
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "a").write_text("second")
        raise RuntimeError("killed")
    assert (final / "a").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_debris_of_a_killed_stage_is_removed_and_nothing_else(tmp_path):
    (tmp_path / "eval" / ".baseline.partial" / "x").mkdir(parents=True)
    (tmp_path / "quantized" / ".v.previous").mkdir(parents=True)
    (tmp_path / "quantized" / "v" / "model").mkdir(parents=True)
    (tmp_path / ".hidden.partial.txt").write_text("a file, not staging")
    removed = remove_staging_debris(tmp_path)
    assert sorted(p.name for p in removed) == [".baseline.partial", ".v.previous"]
    assert (tmp_path / "quantized" / "v" / "model").is_dir() and (tmp_path / ".hidden.partial.txt").is_file()
