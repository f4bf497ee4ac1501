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


# ---------------------------------------------------------------------------- output folders


def test_names_from_tables_are_checked_and_made_safe():
    from LymphNodeClassifierLib.fileio import name_problem, safe_file_name

    for name in ("P0001-S1", "LIDC-IDRI-0069_R_1", "case 7", "ü-umlaut"):
        assert name_problem(name) is None, name
    for name, words in (("../../escaped", "separator"), ("a/b", "separator"), ("a\\b", "separator"), ("x\x00y", "control"),
                        ("line\nbreak", "control"), (".", "dot"), ("..", "dot"), (".staging-1", "dot"), ("  ", "empty"), ("", "empty")):
        assert words in name_problem(name), name
        assert name_problem(safe_file_name(name)) is None and "/" not in safe_file_name(name)
    assert safe_file_name("../../escaped") == "escaped" and safe_file_name("a b/c") == "a_b_c" and safe_file_name("..") == "case"


def test_path_inside_refuses_names_that_would_leave_the_folder(tmp_path):
    from LymphNodeClassifierLib.errors import InputError
    from LymphNodeClassifierLib.fileio import path_inside

    assert path_inside(tmp_path, "C1") == tmp_path / "C1"
    for name in ("../x", "/etc", "..", "a/../../b"):
        with pytest.raises(InputError, match="cannot be used for an output"):
            path_inside(tmp_path, name)


def test_check_writable_refuses_a_file_or_a_folder_that_cannot_be_written(tmp_path):
    from LymphNodeClassifierLib.errors import InputError
    from LymphNodeClassifierLib.fileio import check_writable_file, check_writable_folder

    assert check_writable_folder(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, the probe file gone
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="^--out .*file is a file, not a folder"):
        check_writable_folder(blocker)
    with pytest.raises(InputError, match="^--out .*sub lies in .*file, which is a file, not a folder"):
        check_writable_folder(blocker / "sub")
    with pytest.raises(InputError, match="is a folder; give a file name such as"):
        check_writable_file(tmp_path)
    with pytest.raises(InputError, match="which is a file, not a folder"):
        check_writable_file(blocker / "model.pt")
    assert check_writable_file(tmp_path / "m" / "model.pt") == tmp_path / "m" / "model.pt"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
    except OSError:  # permissions hold (not root): the folder and a folder to be made in it are refused
        for target, verb in ((locked, "write into"), (locked / "new", "create")):
            with pytest.raises(InputError, match=f"^Cannot {verb} the output folder .*Permission denied"):
                check_writable_folder(target)
    else:
        (locked / "probe").unlink()
    locked.chmod(0o755)


def test_stale_staging_of_a_dead_process_is_removed_a_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from LymphNodeClassifierLib.fileio import remove_stale_staging, staging_folder

    mine = staging_folder(tmp_path)
    assert mine.name.startswith(f".staging-{os.getpid()}-")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    stale = tmp_path / "case" / f".staging-{dead.stdout.strip()}-abc"
    stale.mkdir(parents=True)
    (stale / "nodes.csv").write_text("half")
    unnamed = tmp_path / ".staging-x7k2"  # an older version's name, without a process id
    unnamed.mkdir()
    deep = tmp_path / "a" / "b" / ".staging-1-zz"  # deeper than asked
    deep.mkdir(parents=True)
    removed = remove_stale_staging(tmp_path)
    assert sorted(removed) == sorted([stale, unnamed])
    assert mine.is_dir() and deep.is_dir() and not stale.exists() and (tmp_path / "case").is_dir()


def test_replace_folder_swaps_a_folder_a_file_or_a_symlink_as_a_whole(tmp_path):
    from LymphNodeClassifierLib.fileio import replace_folder, staging_folder

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    for old in ("folder", "file", "symlink", "nothing"):
        target = tmp_path / f"target-{old}"
        if old == "folder":
            target.mkdir()
            (target / "report.png").write_text("old")
        elif old == "file":
            target.write_text("old")
        elif old == "symlink":
            target.symlink_to(outside, target_is_directory=True)
        staging = staging_folder(tmp_path)
        (staging / "nodes.csv").write_text("new")
        replace_folder(staging, target)
        assert target.is_dir() and not target.is_symlink() and sorted(p.name for p in target.iterdir()) == ["nodes.csv"], old
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".staging-*"))
