"""repro.io.atomic: writes by temporary file and rename, and the cleanup of killed writers."""

from __future__ import annotations

import os

import pytest

from repro.io.atomic import atomic_path, remove_stale_temporaries, write_text_atomic


def test_atomic_path_renames_on_success_with_the_usual_mode(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    with atomic_path(path) as temporary:
        assert temporary.parent == path.parent and temporary.name.startswith(".a.bin.")
        temporary.write_bytes(b"new")
        assert not path.exists()
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["a.bin"]
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(OSError, match="disk full"), atomic_path(path) as temporary:
        temporary.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_remove_stale_temporaries_removes_only_temporaries(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "kept")
    (tmp_path / ".a.txt.x1y2.tmp").write_text("half")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".a.txt.x1y2.tmp"]
    assert os.listdir(tmp_path) == ["a.txt"]
    assert remove_stale_temporaries(tmp_path / "missing") == []
