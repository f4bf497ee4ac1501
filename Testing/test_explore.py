"""Data exploration: every kind of bad case is listed, good cases are not, outputs are written."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.explore import check_case, explore_dataset, main


def ct_image(array=None, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    if array is None:
        rng = np.random.default_rng(0)
        array = rng.normal(40, 10, size=(10, 40, 40)).astype(np.int16)
        array[:, :3, :] = -1000  # air above the body
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin(origin)
    return image


def label_image(boxes, shape=(10, 40, 40), origin=(0.0, 0.0, 0.0), spacing=(0.8, 0.8, 2.0)) -> sitk.Image:
    array = np.zeros(shape, dtype=np.uint16)
    for value, (k0, k1, j0, j1, i0, i1) in boxes.items():
        array[k0:k1, j0:j1, i0:i1] = value
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.fixture()
def messy_dataset(tmp_path):
    dataset = Dataset.create(tmp_path / "ds", "messy")
    images = dataset.folder / "images"
    images.mkdir()

    def add(case_id, ct, labels, nodes):
        ct_path, labels_path = images / f"{case_id}_ct.nrrd", images / f"{case_id}_labels.nrrd"
        if ct is not None:
            sitk.WriteImage(ct, str(ct_path))
        if labels is not None:
            sitk.WriteImage(labels, str(labels_path))
        dataset.add_case(case_id, case_id.split("-")[0], ct_path, labels_path)
        for label_value, metastatic in nodes.items():
            dataset.add_node(case_id, label_value, metastatic)

    good_boxes = {1: (2, 6, 10, 22, 10, 20), 2: (3, 7, 25, 35, 25, 37)}
    add("good-1", ct_image(), label_image(good_boxes), {1: 0, 2: 1})
    add("blank-1", ct_image(np.zeros((10, 40, 40), np.int16)), label_image(good_boxes), {1: 0})
    add("nomask-1", ct_image(), None, {1: 0})
    add("emptymask-1", ct_image(), label_image({}), {1: 1})
    add("outside-1", ct_image(), label_image(good_boxes, origin=(500.0, 500.0, 500.0)), {1: 1, 2: 0})
    add("raw-1", ct_image(np.full((10, 40, 40), 1000, np.int16) + np.arange(40, dtype=np.int16)), label_image(good_boxes), {1: 0, 2: 0})
    add("tiny-1", ct_image(), label_image({1: (2, 6, 10, 22, 10, 20), 3: (4, 5, 30, 32, 30, 32)}), {1: 0, 3: 1, 5: 0})
    add("shifted-1", ct_image(), label_image(good_boxes, spacing=(0.8, 0.8, 1.0), shape=(20, 40, 40)), {1: 0, 2: 1})
    dataset.save()
    return dataset


def kinds(check):
    return {problem.kind for problem in check.problems}


def test_each_bad_case_is_flagged_with_its_reason(messy_dataset):
    checks = {case.case_id: check_case(messy_dataset, case) for case in messy_dataset.cases}
    assert kinds(checks["good-1"]) == set()
    assert len(checks["good-1"].nodes) == 2
    assert "empty_image" in kinds(checks["blank-1"])
    assert "missing_mask" in kinds(checks["nomask-1"])
    assert "empty_mask" in kinds(checks["emptymask-1"])
    assert "mask_outside_ct" in kinds(checks["outside-1"])
    assert "implausible_hu" in kinds(checks["raw-1"])
    tiny = checks["tiny-1"]
    assert {"node_too_small", "missing_node_mask"} <= kinds(tiny)
    assert [p.label_value for p in tiny.problems if p.kind == "node_too_small"] == [3]
    assert [p.label_value for p in tiny.problems if p.kind == "missing_node_mask"] == [5]
    assert "geometry_mismatch" in kinds(checks["shifted-1"])
    assert len(checks["shifted-1"].nodes) == 2  # resampled, still measured


def test_explore_writes_summary_and_histograms(messy_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--dataset", str(messy_dataset.folder), "--out", str(out)]) == 0
    summary = json.loads((out / "exploration.json").read_text())
    assert summary["cases"] == 8
    assert "good-1" not in summary["cases_with_problems"]
    assert {"blank-1", "nomask-1", "emptymask-1", "outside-1", "raw-1", "tiny-1", "shifted-1"} <= set(summary["cases_with_problems"])
    png = sitk.ReadImage(str(out / "exploration.png"))
    assert png.GetSize()[0] > 600
    printed = capsys.readouterr().out
    assert "8 cases" in printed and "missing" in printed


def test_explore_on_real_shaped_summary_counts(messy_dataset, tmp_path):
    summary = explore_dataset(messy_dataset, tmp_path / "o")
    assert summary["nodes_by_class"]["benign"] + summary["nodes_by_class"]["metastatic"] == summary["nodes"] - summary["nodes_by_class"]["unlabelled"]


def test_excluded_cases_and_nodes_are_left_out_of_counts_histograms_and_the_review_list(messy_dataset, tmp_path):
    everything = explore_dataset(messy_dataset, tmp_path / "all")
    assert "emptymask-1" in everything["cases_with_problems"] and everything["excluded"] == {"cases": 0, "nodes": 0}
    messy_dataset.case("emptymask-1").excluded = True  # the curator's verdict on a bad case
    messy_dataset.node("good-1", 2).excluded = True  # and on one node
    messy_dataset.save()
    dataset = Dataset.load(messy_dataset.folder)
    summary = explore_dataset(dataset, tmp_path / "kept")
    assert "emptymask-1" not in summary["cases_with_problems"]
    assert summary["cases"] == everything["cases"] - 1
    assert summary["nodes"] == everything["nodes"] - 1 and summary["excluded"] == {"cases": 1, "nodes": 1}
    assert summary["nodes_by_class"]["metastatic"] == everything["nodes_by_class"]["metastatic"] - 1  # good-1's node 2 is metastatic
    per_case = {case["case_id"]: case for case in summary["per_case"]}
    assert per_case["emptymask-1"]["excluded"] is True and per_case["good-1"]["excluded"] is False  # still checked and listed
    assert len(per_case["good-1"]["nodes"]) == 2
