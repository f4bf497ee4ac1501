"""The dataset format (version 1): round trips, extra keys, paths and every validation error."""

import json
import os

import pytest

from LymphNodeClassifierLib.dataset import DATASET_FILE, FORMAT_NAME, FORMAT_VERSION, CaseRecord, Dataset, NodeRecord
from LymphNodeClassifierLib.errors import InputError


def _write(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATASET_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return folder


def _minimal():
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": "tiny",
        "created": "2026-01-01T00:00:00+00:00",
        "generator": None,
        "cases": [
            {"case_id": "P0001-S1", "patient_id": "P0001", "ct": "images/P0001-S1_ct.nrrd", "labels": "images/P0001-S1_labels.nrrd"},
            {"case_id": "P0001-S2", "patient_id": "P0001", "ct": "images/P0001-S2_ct.nrrd", "labels": "images/P0001-S2_labels.nrrd"},
            {"case_id": "P0002-S1", "patient_id": "P0002", "ct": "images/P0002-S1_ct.nrrd", "labels": "images/P0002-S1_labels.nrrd"},
        ],
        "nodes": [
            {"case_id": "P0001-S1", "label_value": 1, "metastatic": 1},
            {"case_id": "P0001-S1", "label_value": 2, "metastatic": 0},
            {"case_id": "P0001-S2", "label_value": 1, "metastatic": None},
            {"case_id": "P0002-S1", "label_value": 5, "metastatic": 0},
        ],
    }


@pytest.fixture()
def built(tmp_path):
    dataset = Dataset.create(tmp_path / "ds", "built", {"name": "phantoms", "seed": 3, "label_noise": 0.1})
    dataset.add_case("P0001-S1", "P0001", "images/P0001-S1_ct.nrrd", "images/P0001-S1_labels.nrrd")
    dataset.add_case("P0002-S1", "P0002", dataset.folder / "images" / "P0002-S1_ct.nrrd", dataset.folder / "images" / "P0002-S1_labels.nrrd", note="absolute paths in")
    dataset.add_node("P0001-S1", 3, 1, true_metastatic=1, label_flipped=False)
    dataset.add_node("P0001-S1", 1, 0, true_metastatic=1, label_flipped=True, note="flipped")
    dataset.add_node("P0002-S1", 2, 0, excluded=True, exclude_reason="touches the edge", true_metastatic=0, label_flipped=False)
    dataset.save()
    return dataset


def test_create_writes_a_valid_empty_dataset(tmp_path):
    dataset = Dataset.create(tmp_path / "new" / "ds", "empty")
    assert dataset.path.is_file()
    loaded = Dataset.load(tmp_path / "new" / "ds")
    assert loaded.name == "empty" and loaded.cases == [] and loaded.nodes == [] and loaded.generator is None
    assert loaded.created  # an ISO time stamp
    data = json.loads(dataset.path.read_text())
    assert list(data)[:2] == ["format", "version"] and data["format"] == FORMAT_NAME and data["version"] == 1


def test_round_trip_keeps_every_field_and_the_exact_text(built):
    text = built.path.read_text()
    loaded = Dataset.load(built.folder)
    assert loaded.to_dict() == built.to_dict()
    assert [c.case_id for c in loaded.cases] == ["P0001-S1", "P0002-S1"]
    assert [(n.case_id, n.label_value) for n in loaded.nodes] == [("P0001-S1", 3), ("P0001-S1", 1), ("P0002-S1", 2)]
    flipped = loaded.node("P0001-S1", 1)
    assert flipped.metastatic == 0 and flipped.true_metastatic == 1 and flipped.label_flipped is True and flipped.note == "flipped"
    excluded = loaded.nodes_of("P0002-S1")[0]
    assert excluded.excluded and excluded.exclude_reason == "touches the edge"
    loaded.save()
    assert built.path.read_text() == text
    assert loaded.generator == {"name": "phantoms", "seed": 3, "label_noise": 0.1}


def test_example_of_the_architecture_document_loads(tmp_path):
    example = {
        "format": "LymphNodeClassifier-dataset", "version": 1, "name": "...", "created": "ISO time",
        "generator": {"name": "phantoms", "seed": 1, "label_noise": 0.0},
        "cases": [{"case_id": "P0001-S1", "patient_id": "P0001", "ct": "images/P0001-S1_ct.nrrd",
                   "labels": "images/P0001-S1_labels.nrrd", "excluded": False, "exclude_reason": "", "note": ""}],
        "nodes": [{"case_id": "P0001-S1", "label_value": 3, "metastatic": 1, "excluded": False,
                   "exclude_reason": "", "note": "", "true_metastatic": 1, "label_flipped": False}],
    }
    dataset = Dataset.load(_write(tmp_path / "ex", example))
    assert dataset.to_dict() == example


def test_unknown_keys_are_preserved_at_every_level(tmp_path):
    data = _minimal()
    data["future_top"] = {"a": [1, 2]}
    data["cases"][0]["scanner"] = {"kvp": 120}
    data["nodes"][0]["segmentation_quality"] = 0.9
    folder = _write(tmp_path / "ds", data)
    dataset = Dataset.load(folder)
    assert dataset.extra == {"future_top": {"a": [1, 2]}}
    assert dataset.cases[0].extra == {"scanner": {"kvp": 120}}
    assert dataset.nodes[0].extra == {"segmentation_quality": 0.9}
    dataset.save()
    again = json.loads((folder / DATASET_FILE).read_text())
    assert again["future_top"] == {"a": [1, 2]}
    assert again["cases"][0]["scanner"] == {"kvp": 120}
    assert again["nodes"][0]["segmentation_quality"] == 0.9
    # optional fields were filled with their defaults
    assert again["cases"][1]["excluded"] is False and again["nodes"][1]["true_metastatic"] is None


def test_paths_resolve_against_the_folder(built, tmp_path):
    case = built.case("P0001-S1")
    assert built.ct_path(case) == built.folder / "images" / "P0001-S1_ct.nrrd"
    assert built.labels_path("P0001-S1") == built.folder / "images" / "P0001-S1_labels.nrrd"
    assert built.ct_path(case).is_absolute()
    # absolute paths inside the folder are stored relative, with forward slashes
    assert built.case("P0002-S1").ct == "images/P0002-S1_ct.nrrd"
    # a dataset moved elsewhere still finds its images
    moved = tmp_path / "moved"
    os.rename(built.folder, moved)
    assert Dataset.load(moved).ct_path("P0001-S1") == moved.resolve() / "images" / "P0001-S1_ct.nrrd"
    # load also accepts the dataset.json path itself
    assert Dataset.load(moved / DATASET_FILE).folder == moved.resolve()


def test_queries(tmp_path):
    dataset = Dataset.load(_write(tmp_path / "ds", _minimal()))
    assert dataset.patient_groups() == {"P0001": ["P0001-S1", "P0001-S2"], "P0002": ["P0002-S1"]}
    assert [n.label_value for n in dataset.nodes_of("P0001-S1")] == [1, 2]
    assert dataset.nodes_of("P0001-S2")[0].metastatic is None
    assert dataset.node("P0002-S1", 5).key == ("P0002-S1", 5)
    assert len(dataset) == 3 and dataset.has_case("P0002-S1") and not dataset.has_case("nope")
    with pytest.raises(InputError, match="no case 'nope'"):
        dataset.case("nope")
    with pytest.raises(InputError, match="no case 'nope'"):
        dataset.nodes_of("nope")
    with pytest.raises(InputError, match="no node 9"):
        dataset.node("P0001-S1", 9)


def test_records_round_trip_on_their_own():
    case = CaseRecord.from_dict({"case_id": "a", "patient_id": "p", "ct": "c.nrrd", "labels": "l.nrrd", "x": 1})
    assert case.to_dict() == {"case_id": "a", "patient_id": "p", "ct": "c.nrrd", "labels": "l.nrrd", "excluded": False, "exclude_reason": "", "note": "", "x": 1}
    node = NodeRecord.from_dict({"case_id": "a", "label_value": 4, "metastatic": True})
    assert node.metastatic == 1 and node.key == ("a", 4) and node.label_flipped is None


def test_save_is_atomic_and_leaves_no_temporary_files(built):
    built.add_node("P0002-S1", 7, 1)
    built.save()
    assert sorted(p.name for p in built.folder.iterdir()) == [DATASET_FILE]
    assert Dataset.load(built.folder).node("P0002-S1", 7).metastatic == 1


def test_source_date_epoch_fixes_the_time_stamp(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert Dataset.create(tmp_path / "a", "a").created == "1970-01-01T00:00:00+00:00"


# ---- errors -------------------------------------------------------------------------------------


def test_missing_dataset_json(tmp_path):
    with pytest.raises(InputError, match="no dataset.json"):
        Dataset.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no dataset.json"):
        Dataset.load(tmp_path / "empty")


def test_unreadable_dataset_json(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / DATASET_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not valid JSON"):
        Dataset.load(folder)
    (folder / DATASET_FILE).write_bytes(b"\xff\xfe\x00 binary")
    with pytest.raises(InputError, match="Cannot read"):
        Dataset.load(folder)
    (folder / DATASET_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match="JSON object"):
        Dataset.load(folder)


def test_wrong_format_and_unknown_version(tmp_path):
    data = _minimal()
    data["format"] = "something-else"
    with pytest.raises(InputError, match="not a LymphNodeClassifier dataset"):
        Dataset.load(_write(tmp_path / "a", data))
    data = _minimal()
    data["version"] = 2
    with pytest.raises(InputError, match="version 2 but this tool reads version 1"):
        Dataset.load(_write(tmp_path / "b", data))
    data["version"] = "1"
    with pytest.raises(InputError, match="must be an integer"):
        Dataset.load(_write(tmp_path / "c", data))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("cases"), "no 'cases' field"),
        (lambda d: d.pop("nodes"), "no 'nodes' field"),
        (lambda d: d.pop("version"), "no 'version' field"),
        (lambda d: d.update(cases={}), "must hold lists"),
        (lambda d: d["cases"][1].pop("patient_id"), "case 'P0001-S2' has no 'patient_id'"),
        (lambda d: d["cases"][0].pop("ct"), "has no 'ct'"),
        (lambda d: d["cases"][0].pop("case_id"), "case #1 .* has no 'case_id'"),
        (lambda d: d["cases"][0].update(case_id=""), "non-empty text"),
        (lambda d: d["cases"][0].update(excluded="no"), "'excluded' = 'no'"),
        (lambda d: d["nodes"][2].pop("metastatic"), "node 1 of case 'P0001-S2' has no 'metastatic'"),
        (lambda d: d["nodes"][0].pop("label_value"), "has no 'label_value'"),
        (lambda d: d["nodes"][0].update(label_value=0), "integer from 1 to 65535"),
        (lambda d: d["nodes"][0].update(label_value=2.5), "integer from 1 to 65535"),
        (lambda d: d["nodes"][0].update(metastatic=2), "must be 0, 1 or null"),
        (lambda d: d["nodes"][0].update(label_flipped="yes"), "true, false or null"),
        (lambda d: d["nodes"][0].update(case_id="P0009-S1"), "no such case"),
        (lambda d: d["cases"].append(dict(d["cases"][0])), "two cases with id 'P0001-S1'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "two nodes with label value 1 in case 'P0001-S1'"),
        (lambda d: d.update(generator=[1]), "'generator' that is not an object"),
        (lambda d: d["cases"].__setitem__(0, "P0001-S1"), "not a JSON object"),
        (lambda d: d["cases"][0].update(case_id="../../escaped"), "cannot name its output folder .it holds a path separator"),
        (lambda d: d["cases"][0].update(case_id=".hidden"), "cannot name its output folder .it starts with a dot"),
        (lambda d: d["cases"][0].update(case_id="new\nline"), "control character"),
        (lambda d: d["cases"][0].update(node_definition="blob"), "'node_definition' = 'blob' but it must be one of: label_value, component"),
    ],
)
def test_each_validation_error_is_one_clear_sentence(tmp_path, mutate, message):
    data = _minimal()
    mutate(data)
    with pytest.raises(InputError, match=message) as raised:
        Dataset.load(_write(tmp_path / "ds", data))
    text = str(raised.value)
    assert "\n" not in text and text.endswith(".")


def test_adding_duplicates_or_orphans_is_refused(built):
    with pytest.raises(InputError, match="two cases"):
        built.add_case("P0001-S1", "P0001", "a.nrrd", "b.nrrd")
    with pytest.raises(InputError, match="two nodes"):
        built.add_node("P0001-S1", 3, 0)
    with pytest.raises(InputError, match="no such case"):
        built.add_node("P0404-S1", 1, 0)
    with pytest.raises(InputError, match="0, 1 or null"):
        built.add_node("P0001-S1", 9, "metastatic")


def test_create_refuses_an_existing_dataset_or_a_file(built, tmp_path):
    with pytest.raises(InputError, match="already holds a dataset"):
        Dataset.create(built.folder, "again")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        Dataset.create(a_file, "x")


def test_node_definition_is_kept_when_set_and_absent_means_one_node_per_label_value(tmp_path):
    data = _minimal()
    data["cases"][1]["node_definition"] = "component"
    data["cases"][2]["node_definition"] = "label_value"
    folder = _write(tmp_path / "ds", data)
    dataset = Dataset.load(folder)
    assert [c.node_definition for c in dataset.cases] == [None, "component", "label_value"]
    assert [c.per_label_value for c in dataset.cases] == [True, False, True]
    assert "node_definition" not in dataset.cases[0].to_dict()  # a file without it reads back unchanged
    dataset.save()
    assert [case.get("node_definition") for case in json.loads(dataset.path.read_text())["cases"]] == [None, "component", "label_value"]
    added = dataset.add_case("P0003-S1", "P0003", "a.nrrd", "b.nrrd", node_definition="component")
    assert added.to_dict()["node_definition"] == "component" and not added.per_label_value


def test_missing_file_names_the_file_and_that_paths_are_relative_to_the_dataset(tmp_path):
    dataset = Dataset.load(_write(tmp_path / "ds", _minimal()))
    case = dataset.cases[0]
    message = dataset.missing_file(case)
    assert "CT file" in message and str(dataset.ct_path(case)) in message and f"relative to {dataset.folder}" in message
    dataset.ct_path(case).parent.mkdir(parents=True)
    dataset.ct_path(case).write_bytes(b"x")
    assert "label file" in dataset.missing_file(case)
    dataset.labels_path(case).write_bytes(b"x")
    assert dataset.missing_file(case) is None
