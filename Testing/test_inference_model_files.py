"""Model files as written by export_torchscript: the archive's own folder name, atomic writes."""

from __future__ import annotations

import zipfile

import pytest

from LymphNodeClassifierLib import model
from LymphNodeClassifierLib.fileio import atomic_path
from helpers import export_untrained_model


def _archive_roots(path):
    with zipfile.ZipFile(path) as archive:
        return {name.split("/", 1)[0] for name in archive.namelist()}


def test_archive_folder_is_named_after_the_model_file(tmp_path):
    path = export_untrained_model(tmp_path / "small.pt", size=16)
    # torch.jit.save names the top folder after the file it wrote: not a temporary file's name.
    assert _archive_roots(path) == {"small"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pt"]  # no temporary file or folder left
    assert model.read_card(path)["preprocessing"]["patch_size"] == 16
    assert model.load_model(path).patch_size == 16


def test_same_name_atomic_path_on_error_leaves_the_old_file_and_no_temporary_folder(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target, same_name=True) as temporary:
            assert temporary.name == "model.pt" and temporary.parent != tmp_path
            temporary.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
