"""The headless job, `classify` and `demo`, end to end through the command line.

Node centroids in nodes.csv are checked against an independent computation (the mean LPS point of
each label value's voxels, from the label array and the image's own index-to-physical transform,
turned into RAS), the Grad-CAM volume against the CT's grid, the segmentation file through
slicerio, and bad input against the one-line error contract with nothing written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.classify import DEFAULT_MODEL_PATH, NODE_COLUMNS, SAMPLE_DATASET
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.geometry import physical_points_of_indices
from LymphNodeClassifierLib.model import load_model
from LymphNodeClassifierLib.phantoms import generate_cohort
from helpers import export_untrained_model

OUTPUTS = ("nodes.csv", "nodes.seg.nrrd", "gradcam.nrrd", "report.png")
LIDC = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-nodules"
lidc = pytest.mark.skipif(not (LIDC / "labels.csv").is_file(), reason=f"LIDC nodule crops not found at {LIDC} (only CI has ../shared beside the clone)")


@pytest.fixture(autouse=True)
def no_active_model(tmp_path, monkeypatch):
    """Without --model, classify takes the user's active model: keep the tester's own out of the tests."""
    monkeypatch.setenv("LYMPHNODECLASSIFIER_MODELS", str(tmp_path / "user-models"))


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def centroids_ras_by_value(labels_path) -> dict[int, np.ndarray]:
    """Mean physical point of every label value's voxels, in RAS (independent of nodes.extract_nodes)."""
    image = sitk.ReadImage(str(labels_path))
    array = sitk.GetArrayFromImage(image)
    out = {}
    for value in np.unique(array[array > 0]):
        k, j, i = np.nonzero(array == value)
        lps = physical_points_of_indices(image, np.stack([i, j, k], axis=1).astype(float)).mean(axis=0)
        out[int(value)] = lps * np.array([-1.0, -1.0, 1.0])
    return out


@pytest.fixture(scope="module")
def sample():
    dataset = Dataset.load(SAMPLE_DATASET)
    case = dataset.cases[0]
    return dataset.ct_path(case), dataset.labels_path(case)


def test_one_case_writes_every_output_in_the_ct_geometry(sample, tmp_path, capsys):
    ct_path, labels_path = sample
    out = tmp_path / "out"
    code = cli.main(["classify", "--ct", str(ct_path), "--labels", str(labels_path), "--out", str(out), "--timings"])
    stdout = capsys.readouterr().out
    assert code == 0
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "the staging folder was left behind"

    rows = read_rows(out / "nodes.csv")
    assert list(rows[0].keys()) == NODE_COLUMNS
    truth = centroids_ras_by_value(labels_path)
    assert sorted(int(r["label_value"]) for r in rows) == sorted(truth)  # one row per node of the sample's label map
    threshold = load_model(DEFAULT_MODEL_PATH, "cpu").card["decision_threshold"]
    for row in rows:
        centroid = np.array([float(row[c]) for c in ("centroid_R_mm", "centroid_A_mm", "centroid_S_mm")])
        np.testing.assert_allclose(centroid, truth[int(row["label_value"])], atol=0.01)
        probability = float(row["probability"])
        assert 0.0 <= probability <= 1.0 and int(row["prediction"]) == int(probability >= threshold)

    ct, cam = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(out / "gradcam.nrrd"))
    np.testing.assert_allclose(cam.GetSpacing(), ct.GetSpacing())
    np.testing.assert_allclose(cam.GetDirection(), ct.GetDirection())
    index = np.array(ct.TransformPhysicalPointToContinuousIndex(cam.GetOrigin()))
    np.testing.assert_allclose(index, np.round(index), atol=1e-4)  # the CAM is a sub-grid of the CT's voxels
    cam_values = sitk.GetArrayViewFromImage(cam)
    assert cam_values.min() >= 0.0 and cam_values.max() <= 1.0 and cam_values.max() > 0.0

    slicerio = pytest.importorskip("slicerio")
    segmentation = slicerio.read_segmentation(str(out / "nodes.seg.nrrd"))
    assert len(segmentation["segments"]) == len(rows)

    timings = json.loads(stdout.strip().splitlines()[-1])
    assert set(timings) >= {"read", "nodes", "patches", "model", "gradcam", "write", "report", "total"}
    assert timings["total"] >= timings["model"] > 0


def test_bad_input_is_one_line_with_exit_2_and_writes_nothing(sample, tmp_path, capsys):
    ct_path, labels_path = sample
    elsewhere = sitk.ReadImage(str(labels_path))
    elsewhere.SetOrigin(tuple(np.array(elsewhere.GetOrigin()) + 5000.0))  # a label map of some other place
    sitk.WriteImage(elsewhere, str(tmp_path / "elsewhere.nrrd"))
    (tmp_path / "not_an_image.nrrd").write_text("hello")
    cases = {
        "missing": ["--ct", str(tmp_path / "nowhere.nrrd"), "--labels", str(labels_path)],
        "unreadable": ["--ct", str(tmp_path / "not_an_image.nrrd"), "--labels", str(labels_path)],
        "no overlap": ["--ct", str(ct_path), "--labels", str(tmp_path / "elsewhere.nrrd")],
        "no labels": ["--ct", str(ct_path)],
    }
    errors = {}
    for name, argv in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        assert cli.main(["classify", *argv, "--out", str(out)]) == 2, name
        errors[name] = capsys.readouterr().err.strip()
        assert errors[name].startswith("error: ") and "\n" not in errors[name] and "Traceback" not in errors[name], (name, errors[name])
        assert not out.exists() or not any(out.iterdir()), f"{name}: something was written: {sorted(p.name for p in out.iterdir())}"
    assert "does not exist" in errors["missing"] and "cannot be read" in errors["unreadable"]
    assert "overlap" in errors["no overlap"] and "--labels" in errors["no labels"]


def test_a_dataset_gives_one_folder_per_case_and_a_combined_table(tmp_path, capsys):
    dataset = generate_cohort(tmp_path / "cohort", cases=3, seed=17)
    dataset.cases[1].excluded = True  # an excluded case is not classified
    dataset.save()
    dataset = Dataset.load(dataset.folder)
    out = tmp_path / "out"
    assert cli.main(["classify", "--dataset", str(dataset.folder), "--out", str(out), "--no-report", "--no-gradcam"]) == 0
    included = [case for case in dataset.cases if not case.excluded]
    combined = read_rows(out / "nodes.csv")
    assert {r["case_id"] for r in combined} == {c.case_id for c in included}
    assert not (out / dataset.cases[1].case_id).exists()
    for case in included:
        rows = read_rows(out / case.case_id / "nodes.csv")
        assert len(rows) == len(dataset.nodes_of(case.case_id)) == sum(r["case_id"] == case.case_id for r in combined)
        assert not (out / case.case_id / "report.png").exists() and not (out / case.case_id / "gradcam.nrrd").exists()
    for row in combined:
        record = dataset.node(row["case_id"], int(row["label_value"]))
        assert int(row["given_label"]) == record.metastatic and row["patient_id"] == dataset.case(row["case_id"]).patient_id
    assert "AUC against the dataset's labels" in capsys.readouterr().out


def test_demo_writes_the_sample_case_outputs_and_the_patch_montage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out)]) == 0
    for name in (*OUTPUTS, "patches.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_rows(out / "nodes.csv")
    assert len(rows) == len(Dataset.load(SAMPLE_DATASET).nodes)
    printed = capsys.readouterr().out
    assert printed.count(" -> ") == len(rows) and json.loads(printed.strip().splitlines()[-1])["total"] > 0


@lidc
@pytest.mark.parametrize("how", ["--merge-components", "--components"])
def test_classify_and_evaluate_count_the_same_nodes_as_the_import_defined_them(tmp_path, capsys, how):
    """LIDC-IDRI-0069_R_1's mask has 2 connected components in ONE file (one nodule): before the
    manifest recorded the import's choice, classify split it and evaluate merged it (10 vs 9 nodes
    over these 9 files). Now both follow the case's node_definition; the truth is counted here
    independently (files, or 26-connected components per file)."""
    with open(LIDC / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = [r for r in rows if r["case"] == "LIDC-IDRI-0069_R_1"] + [r for r in rows if r["case"] != "LIDC-IDRI-0069_R_1"][:8]
    table = tmp_path / "nine.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    components = {r["case"]: int(sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.ReadImage(str(LIDC / r["mask"])) != 0, True)).max())
                  for r in chosen}
    assert components["LIDC-IDRI-0069_R_1"] == 2 and sum(components.values()) == 10
    expected = {case: (1 if how == "--merge-components" else n) for case, n in components.items()}
    dataset = tmp_path / "lidc"
    assert cli.main(["import", "--labels", str(table), "--root", str(LIDC), "--out", str(dataset), "--case-col", "case",
                     "--patient-col", "patient_id", "--label-col", "Diagnosis", "--positive", "Malign", "--negative", "Benign", how]) == 0
    assert {c.node_definition for c in Dataset.load(dataset).cases} == {"label_value" if how == "--merge-components" else "component"}
    model = export_untrained_model(tmp_path / "m.pt", size=16, spacing_mm=2.0)
    assert cli.main(["classify", "--dataset", str(dataset), "--out", str(tmp_path / "classified"), "--model", str(model),
                     "--no-gradcam", "--no-report"]) == 0
    classified: dict[str, int] = {}
    for row in read_rows(tmp_path / "classified" / "nodes.csv"):
        classified[row["case_id"]] = classified.get(row["case_id"], 0) + 1
    assert cli.main(["evaluate", "--dataset", str(dataset), "--out", str(tmp_path / "evaluated"), "--model", str(model), "--bootstrap", "0"]) == 0
    evaluated: dict[str, int] = {}
    for row in read_rows(tmp_path / "evaluated" / "predictions.csv"):
        evaluated[row["case_id"]] = evaluated.get(row["case_id"], 0) + 1
    capsys.readouterr()
    assert classified == evaluated == expected


@pytest.mark.parametrize("command, preset, expected", [("classify", None, "PASSIVE"), ("classify", "ACTIVE", "ACTIVE"), ("explore", None, None)])
def test_classify_sets_openmps_passive_wait_before_torch_loads(command, preset, expected):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: the dispatcher must set it before any
    import of torch, for classify only, and never over the user's own value."""
    import os
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from LymphNodeClassifierLib import cli\n"
        "assert 'torch' not in sys.modules, 'torch loaded before the dispatcher could set OpenMP up'\n"
        "try:\n"
        f"    cli.main([{command!r}, '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('policy=' + str(os.environ.get('OMP_WAIT_POLICY')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": preset} if preset else {})
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"policy={expected}"
