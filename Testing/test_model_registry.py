"""The user model folder: where it is, listing (bundled + user, broken files listed not raised),
the active model (atomic active_model.json) and installing models under unique names."""

import json
import os
from pathlib import Path

import pytest
import torch

from LymphNodeClassifierLib import model_registry
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.model import build_model, export_torchscript, new_card, read_card


def export_model(path: Path, name: str, test_auc: float | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model("custom_cnn", 3, 16).eval()
    card = new_card(
        architecture="custom_cnn",
        preprocessing={
            "window_low": -135.0, "window_high": 215.0, "window_preset": "abdomen", "spacing_mm": [3.0, 3.0, 3.0],
            "patch_size": 16, "field_of_view_mm": 48.0, "views": "triplanar", "mask_channel": False, "air_hu": -1024.0,
        },
        training={"command": "test", "seed": 0, "epochs": 0, "dataset": {}},
        metrics={"test": {"auc": test_auc}} if test_auc is not None else None,
        name=name,
    )
    return export_torchscript(model, card, path)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return export_model(tmp_path_factory.mktemp("source") / "trained.pt", "trained model", test_auc=0.91)


def test_folder_argument_beats_environment_beats_platform_default(monkeypatch, tmp_path):
    monkeypatch.delenv(model_registry.ENV_VAR, raising=False)
    default = model_registry.default_models_folder()
    assert default.parts[-2:] == ("LymphNodeClassifier", "models")
    monkeypatch.setenv(model_registry.ENV_VAR, str(tmp_path / "env"))
    assert model_registry.models_folder() == tmp_path / "env"
    assert model_registry.models_folder(tmp_path / "arg") == tmp_path / "arg"
    if os.name == "posix" and not str(os.sys.platform).startswith("darwin"):
        monkeypatch.delenv(model_registry.ENV_VAR)
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert model_registry.default_models_folder() == tmp_path / "xdg" / "LymphNodeClassifier" / "models"


def test_empty_or_missing_folders_list_nothing(tmp_path):
    assert model_registry.list_models(tmp_path / "missing", bundled_dir=tmp_path / "no-bundled") == []
    (tmp_path / "empty").mkdir()
    assert model_registry.list_models(tmp_path / "empty", bundled_dir=None) == []
    assert model_registry.active_model(tmp_path / "missing") is None


def test_list_models_reads_cards_and_lists_broken_files_with_their_error(tmp_path, model_file):
    folder, bundled = tmp_path / "models", tmp_path / "bundled"
    folder.mkdir()
    bundled.mkdir()
    export_model(bundled / "shipped.pt", "shipped model")
    installed = model_registry.install_model(folder, model_file)
    (folder / "broken.pt").write_bytes(b"not a zip")
    (folder / ".hidden.partial.pt").write_bytes(b"half a model")  # a job still writing: never listed
    (folder / "notes.txt").write_text("not a model")
    entries = model_registry.list_models(folder, bundled_dir=bundled)
    by_name = {e.path.name: e for e in entries}
    assert set(by_name) == {"shipped.pt", installed.name, "broken.pt"}
    assert entries[0].source == "bundled" and entries[0].name == "shipped model"
    good = by_name[installed.name]
    assert good.ok and good.name == "trained model" and good.created and good.test_auc == pytest.approx(0.91)
    assert "test AUC 0.910" in good.label()
    broken = by_name["broken.pt"]
    assert not broken.ok and "not a LymphNodeClassifier model" in broken.error and "unreadable" in broken.label()
    json.dumps([e.to_dict() for e in entries])  # JSON-ready


def test_install_copies_under_a_unique_name_and_can_make_active(tmp_path, model_file):
    folder = tmp_path / "models"
    first = model_registry.install_model(folder, model_file)
    second = model_registry.install_model(folder, model_file, make_active=True)
    assert first.name == "trained.pt" and second.name == "trained-2.pt"
    assert first.read_bytes() == second.read_bytes() == model_file.read_bytes()
    assert model_file.exists()  # copied, not moved
    assert model_registry.active_model(folder) == second
    assert json.loads((folder / model_registry.ACTIVE_FILE).read_text())["path"] == "trained-2.pt"  # relative: the folder can move
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    named = model_registry.install_model(folder, model_file, name="my model/v1")
    assert named.name == "my-model-v1.pt" and read_card(named)["name"] == "trained model"
    entries = model_registry.list_models(folder, bundled_dir=None)
    assert [e.active for e in entries].count(True) == 1 and next(e for e in entries if e.active).path == second


def test_install_move_and_refusals(tmp_path, model_file):
    folder = tmp_path / "models"
    staged = tmp_path / "staged.pt"
    staged.write_bytes(model_file.read_bytes())
    moved = model_registry.install_model(folder, staged, move=True, name="job-1")
    assert moved == folder / "job-1.pt" and not staged.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(InputError, match="not a LymphNodeClassifier model"):
        model_registry.install_model(folder, junk)
    with pytest.raises(InputError, match="does not exist"):
        model_registry.install_model(folder, tmp_path / "missing.pt")
    assert sorted(p.name for p in folder.iterdir()) == ["job-1.pt"]


def test_active_model_is_atomic_json_and_survives_bad_states(tmp_path, model_file):
    folder = tmp_path / "models"
    installed = model_registry.install_model(folder, model_file)
    assert model_registry.active_model(folder) is None
    assert model_registry.set_active_model(folder, installed) == installed.resolve()
    assert model_registry.active_model(folder) == installed
    outside = model_registry.set_active_model(folder, model_file)  # a model outside the folder: absolute path
    assert outside == model_file.resolve() and model_registry.active_model(folder) == model_file.resolve()
    with pytest.raises(InputError):
        model_registry.set_active_model(folder, tmp_path / "missing.pt")
    assert model_registry.active_model(folder) == model_file.resolve()  # unchanged by the refusal
    model_registry.set_active_model(folder, None)
    assert model_registry.active_model(folder) is None
    (folder / model_registry.ACTIVE_FILE).write_text("{broken")
    assert model_registry.active_model(folder) is None
    (folder / model_registry.ACTIVE_FILE).write_text(json.dumps({"path": "gone.pt"}))
    assert model_registry.active_model(folder) is None  # dangling: no active model
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_resolve_model_prefers_active_then_bundled(tmp_path, model_file):
    folder, bundled = tmp_path / "models", tmp_path / "bundled"
    assert model_registry.resolve_model(folder, bundled) is None
    bundled.mkdir()
    export_model(bundled / "another_lesion.pt", "another kind of lesion")
    assert model_registry.resolve_model(folder, bundled) is None  # only the default model is picked by itself
    shipped = export_model(bundled / "lymph_node_phantom.pt", "shipped")
    assert model_registry.resolve_model(folder, bundled) == shipped
    active = model_registry.install_model(folder, model_file, make_active=True)
    assert model_registry.resolve_model(folder, bundled) == active


def test_choose_model_takes_a_path_a_bundled_name_or_the_active_model(tmp_path, model_file, monkeypatch):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    default = export_model(bundled / "lymph_node_phantom.pt", "default")
    lung = export_model(bundled / "lung_nodule_lidc.pt", "lung")
    folder = tmp_path / "user"
    monkeypatch.setenv(model_registry.ENV_VAR, str(folder))
    assert model_registry.bundled_models(bundled) == {"lung_nodule_lidc": lung, "lymph_node_phantom": default}
    assert model_registry.choose_model(None, bundled_dir=bundled) == default  # nothing active: the bundled default
    assert model_registry.choose_model("lung_nodule_lidc", bundled_dir=bundled) == lung
    assert model_registry.choose_model("lung_nodule_lidc.pt", bundled_dir=bundled) == lung
    assert model_registry.choose_model(str(model_file), bundled_dir=bundled) == model_file
    model_registry.set_active_model(folder, model_file)
    assert model_registry.choose_model(None, bundled_dir=bundled) == model_file.resolve()  # like the Slicer panel
    for wrong in ("lung_nodule", "some/dir/lung_nodule_lidc", str(tmp_path / "missing.pt")):
        with pytest.raises(InputError, match="does not exist: no such file, and no bundled model has that name; .*lung_nodule_lidc, lymph_node_phantom"):
            model_registry.choose_model(wrong, bundled_dir=bundled)
    model_registry.set_active_model(folder, None)
    with pytest.raises(InputError, match="No model is active and the bundled default model is missing"):
        model_registry.choose_model(None, bundled_dir=tmp_path / "none")


def test_the_real_bundled_models_are_selectable_by_name():
    names = model_registry.bundled_models()
    assert {"lung_nodule_lidc", "lymph_node_phantom"} <= set(names)
    assert read_card(model_registry.choose_model("lung_nodule_lidc"))["name"].startswith("Lung nodule malignancy")
