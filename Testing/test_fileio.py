"""Atomic writes: the old file or the new one, never half; failed writes leave the target alone."""

import json
import os
import stat

import pytest

from LymphNodeClassifierLib.fileio import atomic_path, atomic_write_json, atomic_write_text


def test_replaces_content_and_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "data.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["data.json"]


def test_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "note.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["note.txt"]


def test_permissions_follow_the_umask_not_owner_only(tmp_path):
    previous = os.umask(0o022)
    try:
        target = tmp_path / "shared.txt"
        atomic_write_text(target, "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_ensure_folder_creates_parents_and_refuses_files_in_one_line(tmp_path):
    from LymphNodeClassifierLib.errors import InputError
    from LymphNodeClassifierLib.fileio import ensure_folder

    made = ensure_folder(tmp_path / "a" / "b", "unused")
    assert made.is_dir() and ensure_folder(made, "unused") == made  # an existing folder is fine
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(InputError, match="^blocker is a file$"):
        ensure_folder(blocker, "blocker is a file")
    with pytest.raises(InputError, match=r"^Cannot create the model folder .*file\.txt.sub \(.+\); pick another\.$"):
        ensure_folder(blocker / "sub", "unused", what="model folder", advice="pick another")
