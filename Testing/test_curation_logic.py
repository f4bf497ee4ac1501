"""The Curation tab's logic on a real slicer-core scene and a tiny phantom dataset: the node table,
edits that land in dataset.json, the journal and the table at once, loading and classifying a
case, the review list and the suspects list."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from LymphNodeClassifierLib.curation import JOURNAL_FILE, read_journal  # noqa: E402
from LymphNodeClassifierLib.dataset import Dataset  # noqa: E402
from LymphNodeClassifierLib.errors import InputError  # noqa: E402
from LymphNodeClassifierLib.phantoms import generate_cohort  # noqa: E402
from LymphNodeClassifierLogic.curation_logic import NODE_COLUMNS, CurationLogic  # noqa: E402
from helpers import export_untrained_model  # noqa: E402


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantom") / "dataset"
    generate_cohort(folder, cases=2, seed=11)
    return folder


@pytest.fixture()
def dataset_folder(phantom_dataset, tmp_path) -> Path:
    folder = tmp_path / "dataset"
    shutil.copytree(phantom_dataset, folder)
    return folder


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_untrained_model(tmp_path_factory.mktemp("model") / "untrained.pt", size=32, spacing_mm=1.58, name="untrained")


@pytest.fixture()
def logic():
    curation = CurationLogic(slicer.vtkMRMLScene(), user="tester")
    yield curation
    curation.cleanup()


def cell(table_node, row: int, column: str):
    return table_node.GetTable().GetColumnByName(column).GetValue(row)


def row_dict(table_node, row: int) -> dict:
    return {name: cell(table_node, row, name) for name, _ in NODE_COLUMNS}


def test_open_dataset_lists_every_node_with_its_record(logic, dataset_folder):
    dataset = Dataset.load(dataset_folder)
    table = logic.open_dataset(dataset_folder)
    assert [table.GetTable().GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [n for n, _ in NODE_COLUMNS]
    assert table.GetNumberOfRows() == len(dataset.nodes) > 0
    for row in range(table.GetNumberOfRows()):
        case_id, label_value = logic.row_key(row)
        node, case = dataset.node(case_id, label_value), dataset.case(case_id)
        values = row_dict(table, row)
        assert values["patient_id"] == case.patient_id and values["label_value"] == label_value
        assert values["metastatic"] == str(node.metastatic) and values["excluded"] == 0 and values["reason"] == ""
        assert math.isnan(values["probability"]) and values["review"] == ""
    assert logic.row_of(*logic.row_key(3)) == 3
    assert logic.row_info(3)["label_value"] == logic.row_key(3)[1] and logic.row_info(10_000) is None
    assert logic.open_dataset(dataset_folder) is table  # opening it again re-reads it into the same table
    assert "2 cases" in logic.summary() and "nodes" in logic.summary()
    with pytest.raises(InputError):  # one session per dataset: the lock is held
        CurationLogic(slicer.vtkMRMLScene()).open_dataset(dataset_folder)


def test_edits_land_in_dataset_json_the_journal_and_the_table(logic, dataset_folder):
    table = logic.open_dataset(dataset_folder)
    case_id, label_value = logic.row_key(0)
    row = 0
    old = Dataset.load(dataset_folder).node(case_id, label_value).metastatic
    new = 1 - old

    assert logic.set_label(case_id, label_value, new, reason="re-read") is not None
    assert Dataset.load(dataset_folder).node(case_id, label_value).metastatic == new
    assert cell(table, row, "metastatic") == str(new)

    logic.exclude_node(case_id, label_value, "motion artefact")
    logic.set_node_note(case_id, label_value, "check on the venous phase")
    saved = Dataset.load(dataset_folder).node(case_id, label_value)
    assert saved.excluded and saved.exclude_reason == "motion artefact" and saved.note == "check on the venous phase"
    assert (cell(table, row, "excluded"), cell(table, row, "reason"), cell(table, row, "note")) == (1, "motion artefact", "check on the venous phase")

    with pytest.raises(InputError, match="reason"):
        logic.exclude_case(case_id, "   ")
    other_row = next(r for r in range(table.GetNumberOfRows()) if logic.row_key(r)[0] == case_id and r != row)
    logic.exclude_case(case_id, "wrong scan")
    assert Dataset.load(dataset_folder).case(case_id).excluded
    assert cell(table, other_row, "excluded") == 1 and cell(table, other_row, "reason") == "case: wrong scan"
    assert cell(table, row, "reason") == "motion artefact"  # the node's own reason stays visible
    logic.include_case(case_id)
    logic.include_node(case_id, label_value)
    assert cell(table, other_row, "excluded") == 0 and cell(table, row, "excluded") == 0

    entries, _, torn = read_journal(dataset_folder)
    edits = [(e["field"], e["new"]) for e in entries if e["target"] is not None]
    assert not torn and edits == [
        ("metastatic", new), ("excluded", True), ("note", "check on the venous phase"),
        ("excluded", True), ("excluded", False), ("excluded", False),
    ]
    assert all(e["user"] == "tester" for e in entries)
    assert [e["field"] for e in logic.history(case_id, label_value)] == ["metastatic", "excluded", "note", "excluded"]
    assert (dataset_folder / JOURNAL_FILE).is_file()

    logic.close()  # the lock is released: another session can open the dataset
    reopened = CurationLogic(slicer.vtkMRMLScene())
    reopened.open_dataset(dataset_folder)
    assert cell(reopened.table_node, row, "metastatic") == str(new) and cell(reopened.table_node, row, "note") == "check on the venous phase"
    reopened.cleanup()


def test_load_case_puts_the_case_in_the_scene_and_fills_probabilities(logic, dataset_folder, model_path):
    scene = logic.scene
    table = logic.open_dataset(dataset_folder)
    case_id = logic.row_key(0)[0]
    loaded = logic.load_case(case_id, model_path=model_path, gradcam=False)
    assert loaded.message == "" and loaded.outputs is not None
    assert loaded.ct_node.GetScene() is scene and loaded.labels_node.IsA("vtkMRMLLabelMapVolumeNode")
    rows = [r for r in range(table.GetNumberOfRows()) if logic.row_key(r)[0] == case_id]
    for r in rows:
        probability = cell(table, r, "probability")
        assert 0.0 <= probability <= 1.0 and probability == pytest.approx(logic.probability(*logic.row_key(r)))
    centroid = logic.node_centroid_ras(*logic.row_key(rows[0]))
    assert centroid is not None and all(math.isfinite(v) for v in centroid)

    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    other = next(logic.row_key(r)[0] for r in range(table.GetNumberOfRows()) if logic.row_key(r)[0] != case_id)
    second = logic.load_case(other, model_path=model_path, gradcam=False)
    assert loaded.ct_node.GetScene() is None and loaded.outputs.segmentation_node.GetScene() is None  # the last case was replaced
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes
    assert second.case_id == other

    without = logic.load_case(case_id, model_path=dataset_folder / "missing.pt")
    assert without.outputs is None and "does not exist" in without.message
    centroid_again = logic.node_centroid_ras(*logic.row_key(rows[0]))  # from the label map, no model
    assert centroid_again == pytest.approx(centroid, abs=1e-6)


def test_review_and_suspects_lists(logic, dataset_folder):
    dataset = Dataset.load(dataset_folder)
    case = dataset.cases[0]
    dataset.add_node(case.case_id, 999, 1)  # a record whose label value has no voxels
    dataset.save()
    table = logic.open_dataset(dataset_folder)
    assert logic.suspects_table() is None and not logic.has_suspects()

    review = logic.review()
    kinds = [review.GetTable().GetValue(r, 3).ToString() for r in range(review.GetNumberOfRows())]
    assert "missing_node_mask" in kinds
    row = logic.row_of(case.case_id, 999)
    assert "missing_node_mask" in cell(table, row, "review")
    review_row = kinds.index("missing_node_mask")
    assert logic.review_key(review_row) == (case.case_id, 999)

    nodes = [n for n in dataset.nodes if n.label_value != 999][:2]
    with open(dataset_folder / "suspects.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "case_id", "patient_id", "label_value", "given_label", "oof_probability", "suspicion", "true_label"])
        for rank, node in enumerate(nodes, start=1):
            writer.writerow([rank, node.case_id, dataset.case(node.case_id).patient_id, node.label_value, node.metastatic, 0.25, 0.75, "" if rank == 1 else 1])
    suspects = logic.suspects_table()
    assert logic.has_suspects() and suspects.GetNumberOfRows() == 2
    assert suspects.GetTable().GetColumnByName("rank").IsA("vtkIntArray")
    assert suspects.GetTable().GetColumnByName("suspicion").IsA("vtkDoubleArray")
    true_label = suspects.GetTable().GetColumnByName("true_label")  # an empty cell is NaN, never 0
    assert true_label.IsA("vtkDoubleArray") and math.isnan(true_label.GetValue(0)) and true_label.GetValue(1) == 1.0
    assert logic.suspect_key(1) == (nodes[1].case_id, nodes[1].label_value)
    assert logic.suspect_key(5) is None
    # the list was ranked on the labels of its time; the table says what curation changed since
    assert [cell(suspects, r, "since_ranked") for r in range(2)] == ["", ""]
    logic.set_label(nodes[0].case_id, nodes[0].label_value, 1 - int(nodes[0].metastatic))
    logic.exclude_node(nodes[1].case_id, nodes[1].label_value, "motion artefact")
    suspects = logic.suspects_table()
    expected = "relabelled " + ("benign" if nodes[0].metastatic else "metastatic")
    assert [cell(suspects, r, "since_ranked") for r in range(2)] == [expected, "excluded"]
    json.dumps(logic.summary())


def test_load_case_follows_the_case_node_definition(logic, tmp_path, model_path):
    """One label value in two separate blobs: one node for a 'label_value' case (an imported file that
    holds one lesion), two for a 'component' case -- the same count as classify --dataset and evaluate."""
    import numpy as np
    import SimpleITK as sitk

    array = np.full((12, 40, 40), -1000, np.int16)
    array[:, 5:35, 5:35] = 40
    labels = np.zeros(array.shape, np.uint8)
    labels[4:8, 8:14, 8:14] = 1
    labels[4:8, 26:32, 26:32] = 1
    dataset = Dataset.create(tmp_path / "ds", "two blobs")
    for name, definition in (("merged", "label_value"), ("split", "component")):
        paths = []
        for what, values in (("ct", array), ("labels", labels)):
            image = sitk.GetImageFromArray(values)
            image.SetSpacing((1.0, 1.0, 2.0))
            paths.append(tmp_path / "ds" / f"{name}_{what}.nrrd")
            sitk.WriteImage(image, str(paths[-1]))
        dataset.add_case(name, name, *paths, node_definition=definition)
        dataset.add_node(name, 1, 1)
    dataset.save()
    logic.open_dataset(tmp_path / "ds")
    counts = {name: len(logic.load_case(name, model_path=model_path, gradcam=False).outputs.result.nodes) for name in ("merged", "split")}
    assert counts == {"merged": 1, "split": 2}
