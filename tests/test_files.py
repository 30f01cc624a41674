"""The one atomic writer: files and folders appear whole, with the user's usual permissions."""

from __future__ import annotations

import os
import stat

import pytest

from lenscope.files import atomic_dir, atomic_path, atomic_write


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                                (0o077, 0o600, 0o700)])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    atomic_write(tmp_path / "a.json", "{}\n")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "lens") as folder:
        (folder / "config.json").write_text("{}")
    assert mode(tmp_path / "a.json") == file_mode
    assert mode(tmp_path / "b.bin") == file_mode
    assert mode(tmp_path / "lens") == folder_mode
    assert mode(tmp_path / "lens" / "config.json") == file_mode


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write(tmp_path / "results.json", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "results.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk went away")
    assert (tmp_path / "results.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_folder_leaves_the_old_folder_and_no_temporary(tmp_path):
    with atomic_dir(tmp_path / "lens") as folder:
        (folder / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "lens") as folder:
        (folder / "w").write_text("half")
        raise RuntimeError("crash")
    assert (tmp_path / "lens" / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["lens"]


def test_a_folder_made_meanwhile_is_kept_when_asked(tmp_path):
    with atomic_dir(tmp_path / "model", replace=False) as folder:
        (folder / "w").write_text("mine")
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "w").write_text("theirs")
    assert (tmp_path / "model" / "w").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
