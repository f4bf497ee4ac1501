"""Hostile inputs (issue 10): each one generated here, run through the command line, and held to one
contract -- the expected exit code; on refusal exactly ONE line on stderr ("error: ..."), no
traceback, and no new file in the output folder (nor anywhere outside it). The kill, rerun and
closed-pipe cases run real processes (`python -m LymphNodeClassifierLib`).

Images are tiny synthetic CTs (anisotropic spacing, a tilted direction) with two ball-shaped nodes,
classified by an untrained 16 px model: the plumbing is under test, not the model.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeClassifierLib import __version__, cli
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.model import CARD_FILE_NAME
from helpers import TILTED, export_untrained_model, rotation

MODULE_DIR = Path(__file__).resolve().parents[1] / "LymphNodeClassifier"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DICOM = SHARED / "totalsegmentator-ct" / "dicom"
SPACING = (1.4, 1.1, 2.5)  # anisotropic
SHAPE = (16, 40, 40)  # k, j, i
FAST = ["--no-gradcam", "--no-report"]


# ----------------------------------------------------------------------------------- builders


def to_image(array: np.ndarray, spacing=SPACING, origin=(-30.0, -20.0, 5.0), direction=TILTED) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return image


def ct_array(seed: int = 0) -> np.ndarray:
    """Air around a soft-tissue body with two brighter nodes (HU), noisy."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(SHAPE)
    body = (j - 20) ** 2 + (i - 20) ** 2 < 16 ** 2
    array = np.where(body, 40.0, -1000.0) + rng.normal(0, 8, SHAPE)
    array[label_array() > 0] += 30
    return array.astype(np.int16)


def label_array() -> np.ndarray:
    k, j, i = np.indices(SHAPE)
    labels = np.zeros(SHAPE, np.uint8)
    labels[((k - 7) / 2.5) ** 2 + ((j - 14) / 4) ** 2 + ((i - 14) / 4) ** 2 <= 1] = 1
    labels[((k - 9) / 2.5) ** 2 + ((j - 26) / 5) ** 2 + ((i - 25) / 5) ** 2 <= 1] = 2
    return labels


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def make_dataset(folder: Path, cases: int = 2, case_ids=None) -> Dataset:
    dataset = Dataset.create(folder, "fuzz")
    for number in range(cases):
        case_id = case_ids[number] if case_ids else f"C{number + 1}"
        ct = write(to_image(ct_array(number)), folder / "images" / f"c{number}_ct.nrrd")
        labels = write(to_image(label_array()), folder / "images" / f"c{number}_labels.nrrd")
        dataset.add_case(case_id, f"P{number + 1}", ct, labels)
        for value in (1, 2):
            dataset.add_node(case_id, value, (number + value) % 2)
    dataset.save()
    return dataset


def rewrite_card(source: Path, target: Path, change) -> Path:
    """A copy of a model file whose card was edited after export (what a user's text editor does)."""
    extra = {CARD_FILE_NAME: ""}
    module = torch.jit.load(str(source), _extra_files=extra)
    card = json.loads(extra[CARD_FILE_NAME])
    change(card)
    torch.jit.save(module, str(target), _extra_files={CARD_FILE_NAME: json.dumps(card)})
    return target


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: owner-only read/execute, or (as root, whom permissions do
    not stop) a folder of the read-only /sys file system; skip when neither is available."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except OSError:
        return folder
    (folder / "probe").unlink()
    for candidate in (Path("/sys/fs/lymphnode-out"), Path("/proc/lymphnode-out")):
        try:
            candidate.mkdir()
        except OSError:
            return candidate
        candidate.rmdir()
    pytest.skip("no read-only place to write to on this machine (root without a read-only file system)")


def files_under(folder: Path) -> set[str]:
    """Every path under `folder` (hidden ones too), relative; an absent folder is empty."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def python_module(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(MODULE_DIR))
    return subprocess.Popen([sys.executable, "-m", "LymphNodeClassifierLib", *map(str, args)], cwd=MODULE_DIR, env=env, **kwargs)


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The inputs every case starts from: a model, one case as files, a two-case dataset."""
    root = tmp_path_factory.mktemp("fuzz")
    model = export_untrained_model(root / "model.pt", size=16, spacing_mm=2.0)
    ct = write(to_image(ct_array()), root / "ct.nrrd")
    labels = write(to_image(label_array()), root / "labels.nrrd")
    dataset = make_dataset(root / "dataset")
    return {"root": root, "model": model, "ct": ct, "labels": labels, "dataset": dataset.folder}


@pytest.fixture(autouse=True)
def no_active_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LYMPHNODECLASSIFIER_MODELS", str(tmp_path / "user-models"))  # the user's own choice stays out of the tests


def classify_case(world, out, *extra, ct=None, labels=None, model=None):
    return ["classify", "--ct", ct or world["ct"], "--labels", labels or world["labels"], "--out", out,
            "--model", model or world["model"], *FAST, *extra]


# ----------------------------------------------------------------------------------- refused inputs: one line, nothing written


def _truncated_ct(world, tmp_path):
    path = write(sitk.ReadImage(str(world["ct"])), tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the first half of the file, as a cut-off copy
    return {"ct": path}, ("ct.nii.gz",)


def _ct_plus_1024(world, tmp_path):
    return {"ct": write(to_image((ct_array().astype(np.int32) + 1024).astype(np.int16)), tmp_path / "ct.nrrd")}, ("HU",)


def _mr_like(world, tmp_path):
    rng = np.random.default_rng(3)
    return {"ct": write(to_image(rng.uniform(0, 4000, SHAPE).astype(np.int16)), tmp_path / "mr.nrrd")}, ("HU",)


def _label_outside(world, tmp_path):
    return {"labels": write(to_image(label_array(), origin=(970.0, -20.0, 5.0)), tmp_path / "far.nrrd")}, ("overlap",)


def _label_partly_outside(world, tmp_path):
    ct = sitk.ReadImage(str(world["ct"]))
    shifted = to_image(label_array())
    shifted.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint((22.0, 0.0, 0.0)))  # the second node now crosses the CT's edge
    return {"labels": write(shifted, tmp_path / "part.nrrd")}, ("lie outside the CT",)


def _empty_label(world, tmp_path):
    return {"labels": write(to_image(np.zeros(SHAPE, np.uint8)), tmp_path / "empty.nrrd")}, ("empty",)


def _card_patch_size_edited(world, tmp_path):
    def change(card):
        card["preprocessing"]["patch_size"] = 12
    return {"model": rewrite_card(world["model"], tmp_path / "edited.pt", change)}, ()


def _card_spacing_edited(world, tmp_path):
    def change(card):
        card["preprocessing"]["spacing_mm"] = [3.0, 3.0, 3.0]
    return {"model": rewrite_card(world["model"], tmp_path / "edited.pt", change)}, ()


@pytest.mark.parametrize("channels", [1, 4])
def test_a_card_whose_channels_do_not_fit_the_network_is_refused(world, tmp_path, capsys, channels):
    def change(card):
        card["preprocessing"]["views"] = "axial" if channels == 1 else "triplanar"
        card["preprocessing"]["mask_channel"] = channels == 4
        card["preprocessing"]["channels"] = ["axial"] if channels == 1 else ["axial", "coronal", "sagittal", "mask"]
        card.pop("integrity", None)  # even without the recorded digest the zero-batch run refuses it
    model = rewrite_card(world["model"], tmp_path / f"c{channels}.pt", change)
    out = tmp_path / "out"
    code, _, err = run(classify_case(world, out, model=model), capsys)
    assert_refused(code, err)
    assert files_under(out) == set()


def _unknown_model_name(world, tmp_path):
    return {"model": "lung_nodule_lidcc"}, ("does not exist", "lung_nodule_lidc")


@pytest.mark.parametrize("make_input", [
    _truncated_ct, _ct_plus_1024, _mr_like, _label_outside, _label_partly_outside, _empty_label, _card_patch_size_edited, _card_spacing_edited,
    _unknown_model_name,
], ids=lambda f: f.__name__.strip("_"))
def test_a_bad_input_is_one_line_exit_2_and_nothing_written(world, tmp_path, capsys, make_input):
    changes, words = make_input(world, tmp_path)
    out = tmp_path / "out"
    before = files_under(tmp_path)
    code, _, err = run(classify_case(world, out, **changes), capsys)
    assert_refused(code, err, *words)
    assert files_under(out) == set(), "something was written into --out"
    assert files_under(tmp_path) - before <= {"out"}, "something was written next to --out"


def test_the_output_location_is_checked_before_any_work(world, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    locked = unwritable_folder(tmp_path)
    for out, words in ((blocker, ("is a file",)), (locked / "sub", ("Cannot",)), (locked, ())):
        code, _, err = run(classify_case(world, out), capsys)
        assert_refused(code, err, *words)
        code, _, err = run(["classify", "--dataset", world["dataset"], "--out", out, "--model", world["model"], *FAST], capsys)
        assert_refused(code, err, *words)
        code, _, err = run(["evaluate", "--dataset", world["dataset"], "--out", out, "--model", world["model"], "--bootstrap", 0], capsys)
        assert_refused(code, err, *words)
    assert blocker.read_text() == "keep me"


def test_train_refuses_an_unwritable_model_file_before_training(world, tmp_path, capsys):
    locked = unwritable_folder(tmp_path)
    for out, words in ((locked / "model.pt", ("Cannot",)), (tmp_path, ("is a folder",))):
        code, _, err = run(["train", "--dataset", world["dataset"], "--out", out, "--epochs", 1, "--patch-size", 16], capsys)
        assert_refused(code, err, *words)
        # checked before anything else is even read: with a dataset that does not exist, the output is still the complaint
        code, _, err = run(["train", "--dataset", tmp_path / "no-such-dataset", "--out", out, "--patch-size", 16], capsys)
        assert_refused(code, err, *words)
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("argv, words", [
    (["train", "--patch-size", "7"], ("--patch-size 7", "8 to 1024")),
    (["train", "--patch-size", "16", "--val-fraction", "0.6", "--test-fraction", "0.5"], ("--val-fraction",)),
    (["classify", "--frobnicate"], ("unrecognized arguments", "--help")),
    (["explore", "--frobnicate"], ("unrecognized arguments", "--help")),
    (["evaluate"], ("required",)),
], ids=["patch-size", "fractions", "classify-option", "explore-option", "evaluate-missing"])
def test_bad_options_are_one_line(world, tmp_path, capsys, argv, words):
    required = {"train": ["--dataset", world["dataset"], "--out", tmp_path / "m.pt"], "explore": ["--dataset", world["dataset"]],
                "classify": ["--ct", world["ct"], "--labels", world["labels"], "--out", tmp_path / "out"]}
    argv = [*argv, *required.get(argv[0], [])]
    code, _, err = run(argv, capsys)
    assert_refused(code, err, *words)
    assert files_under(tmp_path) == set()


def test_unknown_command_and_version(capsys):
    code, _, err = run(["frobnicate"], capsys)
    assert_refused(code, err, "unknown command", "classify")
    code, out, err = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"LymphNodeClassifierLib {__version__}" and err == ""


# ----------------------------------------------------------------------------------- datasets


def test_a_dataset_whose_images_moved_is_one_clear_error(world, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(world["dataset"], moved)
    shutil.move(str(moved / "images"), str(tmp_path / "elsewhere"))
    out = tmp_path / "out"
    code, _, err = run(["classify", "--dataset", moved, "--out", out, "--model", world["model"], *FAST], capsys)
    assert_refused(code, err, "does not exist", "relative to")
    code, _, err = run(["evaluate", "--dataset", moved, "--out", out, "--model", world["model"], "--bootstrap", 0], capsys)
    assert_refused(code, err, "does not exist")
    code, _, err = run(["train", "--dataset", moved, "--out", out / "model.pt", "--patch-size", 16], capsys)
    assert_refused(code, err, "does not exist")
    assert files_under(out) == set()


def test_symlinked_output_files_are_replaced_never_written_through(world, tmp_path, capsys):
    outside = tmp_path / "outside.csv"
    outside.write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("nodes.csv", "report.png"):  # one this run writes, one it removes as an earlier run's
        (out / name).symlink_to(outside)
    code, _, err = run(classify_case(world, out), capsys)
    assert code == 0, err
    assert outside.read_text() == "mine"
    assert not (out / "nodes.csv").is_symlink() and (out / "nodes.csv").read_text().startswith("case_id,")
    assert not (out / "report.png").exists() and not (out / "report.png").is_symlink()


def test_every_case_skipped_is_an_error_and_writes_no_table(world, tmp_path, capsys):
    folder = tmp_path / "all-bad"
    dataset = make_dataset(folder)
    for case in dataset.cases:  # every label map empty
        write(to_image(np.zeros(SHAPE, np.uint8)), dataset.labels_path(case))
    out = tmp_path / "out"
    code, _, err = run(["classify", "--dataset", folder, "--out", out, "--model", world["model"], *FAST], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[-1].startswith("error: All 2 cases were skipped")
    assert sum(line.startswith("skipped ") for line in lines) == 2
    assert not (out / "nodes.csv").exists() and not [p for p in files_under(out) if not p.startswith(".")]


@pytest.mark.parametrize("case_id", ["../../escaped", "a/b", ".hidden", "tab\there"])
def test_an_unsafe_case_id_in_dataset_json_is_refused(world, tmp_path, capsys, case_id):
    folder = tmp_path / "hostile" / "deep" / "dataset"
    shutil.copytree(world["dataset"], folder)
    data = json.loads((folder / "dataset.json").read_text())
    data["cases"][0]["case_id"] = case_id
    for node in data["nodes"]:
        if node["case_id"] == "C1":
            node["case_id"] = case_id
    (folder / "dataset.json").write_text(json.dumps(data))
    out = tmp_path / "hostile" / "deep" / "out"
    before = files_under(tmp_path)
    code, _, err = run(["classify", "--dataset", folder, "--out", out, "--model", world["model"], *FAST], capsys)
    assert_refused(code, err, "case id")
    assert files_under(tmp_path) == before


def test_an_unsafe_case_id_in_an_imported_table_is_made_safe_and_nothing_leaves_out(world, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(world["dataset"] / "images", source)
    table = source / "labels.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "image", "mask", "Diagnosis"])
        writer.writerow(["../../escaped", "c0_ct.nrrd", "c0_labels.nrrd", "Malign"])
        writer.writerow(["ok\x07bell", "c1_ct.nrrd", "c1_labels.nrrd", "Benign"])
    work = tmp_path / "a" / "b"
    code, _, err = run(["import", "--labels", table, "--out", work / "dataset", "--case-col", "case", "--label-col", "Diagnosis",
                        "--positive", "Malign", "--negative", "Benign"], capsys)
    assert code == 0, err
    dataset = Dataset.load(work / "dataset")
    assert [c.case_id for c in dataset.cases] == ["escaped", "ok_bell"]
    assert dataset.cases[0].extra["source_case_id"] == "../../escaped"
    before = files_under(tmp_path)
    out = work / "out"
    code, _, err = run(["classify", "--dataset", work / "dataset", "--out", out, "--model", world["model"], *FAST], capsys)
    assert code == 0, err
    new = files_under(tmp_path) - before
    assert new and all(path.startswith(str(out.relative_to(tmp_path))) for path in new), sorted(new)
    assert (out / "escaped" / "nodes.csv").is_file() and not (tmp_path / "escaped").exists()


def test_a_symlink_in_place_of_a_case_folder_is_replaced_never_followed(world, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "C1").symlink_to(outside, target_is_directory=True)
    code, _, err = run(["classify", "--dataset", world["dataset"], "--out", out, "--model", world["model"], *FAST], capsys)
    assert code == 0, err
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"] and (outside / "precious.txt").read_text() == "mine"
    assert (out / "C1").is_dir() and not (out / "C1").is_symlink() and (out / "C1" / "nodes.csv").is_file()


def test_a_case_folder_with_foreign_files_is_never_replaced(world, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "C2").mkdir(parents=True)
    (out / "C2" / "my_notes.txt").write_text("mine")
    code, _, err = run(["classify", "--dataset", world["dataset"], "--out", out, "--model", world["model"], *FAST], capsys)
    assert_refused(code, err, "did not write")
    assert files_under(out) == {"C2", "C2/my_notes.txt"}


@pytest.mark.parametrize("option, value", [("--positive", "malignant"), ("--negative", "benign-ish")])
def test_import_label_values_that_match_no_row_are_an_error(world, tmp_path, capsys, option, value):
    source = tmp_path / "source"
    shutil.copytree(world["dataset"] / "images", source)
    (source / "labels.csv").write_text("image,mask,Diagnosis\nc0_ct.nrrd,c0_labels.nrrd,Malign\nc1_ct.nrrd,c1_labels.nrrd,Benign\n")
    labels = {"--positive": "Malign", "--negative": "Benign"}
    labels[option] = value
    out = tmp_path / "dataset"
    code, _, err = run(["import", "--labels", source / "labels.csv", "--out", out, "--label-col", "Diagnosis",
                        "--positive", labels["--positive"], "--negative", labels["--negative"]], capsys)
    assert_refused(code, err, option, repr(value), "Malign")
    assert not out.exists()


# ----------------------------------------------------------------------------------- H3's inputs that are not refusals


@pytest.mark.parametrize("how, words", [("shift", "origin offset (3, 0, 0) mm"), ("rotate", "rotated 30.0 deg"), ("scale", "spacing (2.1, 1.65, 3.75) mm")])
def test_a_label_on_another_grid_inside_the_ct_is_resampled_with_a_note_or_refused_when_strict(world, tmp_path, capsys, how, words):
    ct = sitk.ReadImage(str(world["ct"]))
    moved = to_image(label_array())
    if how == "shift":
        moved.SetOrigin(tuple(np.array(ct.GetOrigin()) + np.array([3.0, 0.0, 0.0])))
    elif how == "rotate":  # 30 degrees about the image's centre, so that the nodes stay inside the CT
        turn = rotation(2, 30)
        centre = np.array(moved.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in moved.GetSize()]))
        moved.SetOrigin(tuple(centre + turn @ (np.array(moved.GetOrigin()) - centre)))
        moved.SetDirection(tuple((turn @ np.asarray(TILTED)).ravel()))
    else:  # a 1.5x spacing map of the same place, cropped to lie inside the CT
        half = sitk.Resample(moved, [s // 2 + 1 for s in moved.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                             moved.GetOrigin(), tuple(1.5 * s for s in moved.GetSpacing()), moved.GetDirection(), 0, moved.GetPixelID())
        moved = half
    labels = write(moved, tmp_path / f"{how}.nrrd")
    out = tmp_path / "out"
    code, _, err = run(classify_case(world, out, labels=labels), capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "nodes.csv").open()))
    assert rows and all(words in row["notes"] for row in rows), rows[0]["notes"]
    strict_out = tmp_path / "strict"
    code, _, err = run(classify_case(world, strict_out, "--strict-geometry", labels=labels), capsys)
    assert_refused(code, err, "--strict-geometry")
    assert files_under(strict_out) == set()


def test_a_two_litre_component_gets_a_warning_not_a_plain_probability(world, tmp_path, capsys):
    spacing = (5.2, 5.2, 5.2)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:15, 4:36, 4:36] = 1  # 14 x 32 x 32 voxels of 140.6 mm3: 2.0 litres, 166 mm across
    ct_path = write(to_image(ct_array(), spacing=spacing, direction=np.eye(3)), tmp_path / "ct.nrrd")
    labels_path = write(to_image(labels, spacing=spacing, direction=np.eye(3)), tmp_path / "labels.nrrd")
    assert labels.sum() * np.prod(spacing) / 1e6 == pytest.approx(2.0, abs=0.05)
    out = tmp_path / "out"
    code, _, err = run(classify_case(world, out, ct=ct_path, labels=labels_path), capsys)
    assert code == 0, err
    rows = list(csv.DictReader((out / "nodes.csv").open()))
    assert len(rows) == 1 and rows[0]["warnings"], rows


@pytest.mark.skipif(not DICOM.is_dir(), reason=f"DICOM series not found at {DICOM} (only CI has ../shared beside the clone)")
def test_a_dicom_series_folder_is_read_as_the_ct(world, tmp_path, capsys):
    ct = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM)))
    size = ct.GetSize()
    labels = np.zeros(size[::-1], np.uint8)
    labels[8:12, size[1] // 2 - 6: size[1] // 2 + 6, size[0] // 2 - 6: size[0] // 2 + 6] = 1
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(ct)
    labels_path = write(label_image, tmp_path / "labels.nrrd")
    out = tmp_path / "out"
    code, _, err = run(classify_case(world, out, ct=DICOM, labels=labels_path), capsys)
    assert code == 0, err
    assert len(list(csv.DictReader((out / "nodes.csv").open()))) == 1


# ----------------------------------------------------------------------------------- real processes: kill, rerun, closed pipe


def test_a_killed_dataset_run_leaves_staging_that_the_next_run_removes(world, tmp_path, capsys):
    folder = tmp_path / "cohort"
    make_dataset(folder, cases=8)
    out = tmp_path / "out"
    leftovers: list[Path] = []
    for _attempt in range(3):
        process = python_module("classify", "--dataset", folder, "--out", out, "--model", world["model"], "--no-gradcam",
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300  # a loaded machine: the process needs a while to import torch
        while process.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and list(out.glob(".staging-*")):
                break
            time.sleep(0.002)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        process.stderr.close()
        leftovers = list(out.glob(".staging-*"))
        if leftovers:
            break
    assert leftovers and process.returncode == -signal.SIGKILL, "the kill never caught a staging folder"
    code, _, err = run(["classify", "--dataset", folder, "--out", out, "--model", world["model"], *FAST], capsys)
    assert code == 0, err
    assert not [p for p in files_under(out) if ".staging-" in p], "a stale staging folder survived the rerun"
    assert {p.name for p in out.iterdir()} == {"nodes.csv", "summary.json", *(f"C{n}" for n in range(1, 9))}


def test_a_rerun_replaces_the_previous_outputs_as_a_whole(world, tmp_path, capsys):
    out_case, out_set = tmp_path / "case", tmp_path / "set"
    with_gradcam = ["--no-report"]  # report.png takes ~20 s to render here: an earlier run's one is planted below instead
    assert run([a for a in classify_case(world, out_case) if a not in FAST] + with_gradcam, capsys)[0] == 0
    assert run(["classify", "--dataset", world["dataset"], "--out", out_set, "--model", world["model"], *with_gradcam], capsys)[0] == 0
    for folder in (out_case, out_set / "C1", out_set / "C2"):
        assert (folder / "gradcam.nrrd").is_file()
        (folder / "report.png").write_bytes(b"an earlier run's report")
    (out_case / "patches.png").write_bytes(b"an earlier demo run's montage")
    old_table = (out_set / "nodes.csv").read_bytes()
    (out_set / "nodes.csv").write_bytes(old_table + b"a row of an earlier run\n")
    assert run(classify_case(world, out_case), capsys)[0] == 0
    process = python_module("classify", "--dataset", world["dataset"], "--out", out_set, "--model", world["model"], *FAST,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert {p.name for p in out_case.iterdir()} == {"nodes.csv", "nodes.seg.nrrd"}
    for case in ("C1", "C2"):
        assert {p.name for p in (out_set / case).iterdir()} == {"nodes.csv", "nodes.seg.nrrd"}
    assert b"earlier run" not in (out_set / "nodes.csv").read_bytes()
    assert {p.name for p in out_set.iterdir()} == {"nodes.csv", "summary.json", "C1", "C2"}


def test_a_closed_stdout_pipe_ends_quietly(world, tmp_path, capsys):
    folder = tmp_path / "curated"
    shutil.copytree(world["dataset"], folder)
    for number in range(30):
        code, _, err = run(["curate", "--dataset", folder, "--case", "C1", "--node", 1, "--note", f"note {number} " + "x" * 200], capsys)
        assert code == 0, err
    for argv in (["curate", "--dataset", folder, "--history"], ["--help"]):
        process = python_module(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()  # the reader is gone before the first line (`... | head -0`)
        stderr = process.stderr.read().decode()
        process.stderr.close()
        assert process.wait(timeout=120) == 141, stderr
        assert stderr == "", stderr


def test_a_progress_line_is_ended_before_any_other_output(capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = cli.ProgressLine("cases", 3, stream=terminal)
    progress.update(1)
    progress.note("note: C1: the label map was resampled")
    progress.update(2)
    cli.exit_code(lambda: (_ for _ in ()).throw(cli.InputError("The CT is broken; fix it.")))  # an error mid-run
    text = terminal.getvalue()
    assert "1/3 cases" in text and text.count("\n") == 3
    assert "\nnote: C1" in text and text.endswith("s\n")  # the redrawn line ended before the note and before the error
    assert capsys.readouterr().err == "error: The CT is broken; fix it.\n"
    logged = io.StringIO()  # not a terminal (a log, a pipe): whole lines, never a carriage return
    progress = cli.ProgressLine("cases", 20, stream=logged)
    for done in range(21):
        progress.update(done)
    assert "\r" not in logged.getvalue() and logged.getvalue().count("\n") == 11


def test_a_model_whose_folder_breaks_during_training_is_saved_elsewhere_not_lost(world, tmp_path):
    from LymphNodeClassifierLib.errors import InputError
    from LymphNodeClassifierLib.model import load_model
    from LymphNodeClassifierLib.patchset import build_patchset
    from LymphNodeClassifierLib.training import TrainingConfig, train_and_export

    dataset = make_dataset(tmp_path / "cohort", cases=6)
    config = TrainingConfig(patch_size=16, spacing_mm=(2.0, 2.0, 2.0), epochs=1, batch_size=4, translation_px=2, num_threads=1,
                            split_fractions=(0.5, 0.25, 0.25))
    patchset = build_patchset(dataset, config.patch_spec(), config.window)
    folder = tmp_path / "models"
    folder.mkdir()

    def folder_turns_into_a_file(event):  # after the checks passed: the place breaks while the model trains
        if event["event"] == "epoch" and folder.is_dir():
            shutil.rmtree(folder)
            folder.write_text("not a folder any more")

    with pytest.raises(InputError, match=r"^Cannot write the trained model to .*model\.pt \(.*\); it was saved as (\S+model\.pt): move it") as error:
        train_and_export(patchset, config, folder / "model.pt", "test", on_event=folder_turns_into_a_file)
    rescued = Path(str(error.value).split("it was saved as ")[1].split(": move it")[0])
    assert load_model(rescued).card["preprocessing"]["patch_size"] == 16
    shutil.rmtree(rescued.parent)


# ----------------------------------------------------------------------------------- command line: defaults and options


def test_evaluate_defaults_to_the_active_model_like_classify(world, tmp_path, capsys):
    from LymphNodeClassifierLib import model_registry

    model_registry.set_active_model(None, world["model"])  # the user's folder is this test's (no_active_model)
    code, _, err = run(["evaluate", "--dataset", world["dataset"], "--out", tmp_path / "ev", "--bootstrap", 0], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["model"]["name"] == "untrained test model"
    def change(card):
        card["preprocessing"]["patch_size"] = 12
    edited = tmp_path / "edited.pt"
    shutil.copyfile(world["model"], edited)
    model_registry.set_active_model(None, edited)
    rewrite_card(world["model"], edited, change)  # edited after it was made active: load refuses it, which shows who took it
    for command in (["classify", "--ct", world["ct"], "--labels", world["labels"], *FAST], ["evaluate", "--dataset", world["dataset"]]):
        code, _, err = run([*command, "--out", tmp_path / "refused"], capsys)
        assert_refused(code, err, "edited.pt")
    model_registry.set_active_model(None, None)  # no active model: the bundled default, for both
    assert model_registry.choose_model(None).name == "lymph_node_phantom.pt"
    code, _, err = run(["evaluate", "--dataset", world["dataset"], "--out", tmp_path / "lung", "--bootstrap", 0, "--model", "lung_nodule_lidc"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "lung" / "metrics.json").read_text())["model"]["name"].startswith("Lung nodule malignancy")


def test_train_uses_the_given_validation_and_test_fractions(world, tmp_path, capsys):
    from LymphNodeClassifierLib.model import read_card

    make_dataset(tmp_path / "cohort", cases=8)
    code, _, err = run(["train", "--dataset", tmp_path / "cohort", "--out", tmp_path / "m.pt", "--patch-size", 16, "--spacing", 2.0,
                        "--epochs", 1, "--batch-size", 4, "--threads", 1, "--val-fraction", 0.25, "--test-fraction", 0.25], capsys)
    assert code == 0, err
    split = read_card(tmp_path / "m.pt")["training"]["split"]
    assert split["fractions"] == [0.5, 0.25, 0.25]
    assert split["train_nodes"] + split["validation_nodes"] + split["test_nodes"] == 16 and split["test_nodes"] >= 2
