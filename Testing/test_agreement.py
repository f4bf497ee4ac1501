"""`curate --agreement`: Cohen's kappa between readers and between the model and each reader.

The readers' reads go through the real CurationSession; kappa is checked against a 2 x 2 table
computed by hand and against sklearn on a constructed set with partial overlaps (the test picks
the shared nodes itself).
"""

import csv
import json
import random
from itertools import combinations
from pathlib import Path

import pytest
from sklearn.metrics import cohen_kappa_score

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.agreement import pair_agreement
from LymphNodeClassifierLib.curation import CurationSession
from LymphNodeClassifierLib.dataset import Dataset


def make_dataset(folder: Path, cases: int, nodes_per_case: int) -> list[tuple[str, int]]:
    dataset = Dataset.create(folder, "agreement test", created="2024-01-01T00:00:00+00:00")
    keys = []
    for c in range(cases):
        case_id = f"P{c:04d}-S1"
        dataset.add_case(case_id, case_id[:5], f"images/{case_id}_ct.nrrd", f"images/{case_id}_labels.nrrd")
        for value in range(1, nodes_per_case + 1):
            dataset.add_node(case_id, value, value % 2)
            keys.append((case_id, value))
    dataset.save()
    return keys


def curate(folder: Path, *args: str) -> int:
    return cli.main(["curate", "--dataset", str(folder), *args])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_hand_computed_two_by_two(tmp_path, capsys):
    # 10 nodes: both metastatic 4, both benign 3, only A metastatic 2, only B metastatic 1
    # p_o = 7/10; p(A=1) = 6/10, p(B=1) = 5/10; p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = (0.7-0.5)/0.5 = 0.4
    folder = tmp_path / "ds"
    keys = make_dataset(folder, 2, 5)
    pairs = [(1, 1)] * 4 + [(0, 0)] * 3 + [(1, 0)] * 2 + [(0, 1)]
    with CurationSession(folder, user="u") as session:
        for key, (a, b) in zip(keys, pairs):
            session.read_node(*key, a, reader="dr.a")
            session.read_node(*key, b, reader="dr.b")
    assert curate(folder, "--agreement") == 0
    out = capsys.readouterr().out
    assert "dr.a vs dr.b: kappa 0.400 on 10 nodes" in out
    report = json.loads((folder / "agreement.json").read_text())
    (pair,) = report["reader_pairs"]
    assert pair["kappa"] == pytest.approx(0.4, abs=1e-12) and pair["observed_agreement"] == pytest.approx(0.7)
    assert (pair["n"], pair["both_metastatic"], pair["both_benign"], pair["only_a_metastatic"], pair["only_b_metastatic"]) == (10, 4, 3, 2, 1)
    assert report["model"] is None and report["model_vs_readers"] == []
    rows = read_csv(folder / "disagreements.csv")
    disagreeing = {keys[i] for i, (a, b) in enumerate(pairs) if a != b}
    assert {(row["case_id"], int(row["label_value"])) for row in rows} == disagreeing and len(rows) == 3
    for row in rows:
        assert (row["rater_a"], row["rater_b"]) == ("dr.a", "dr.b") and row["label_a"] != row["label_b"]
        assert row["label_source"] == "tie of 2 readers: adjudicate"  # two readers who disagree: nobody has decided yet


def test_constructed_set_against_sklearn_and_the_model(tmp_path, capsys):
    folder = tmp_path / "ds"
    keys = make_dataset(folder, 8, 6)
    rng = random.Random(3)
    truth = {key: rng.randrange(2) for key in keys}
    readers = {"dr.a": 0.9, "dr.b": 0.75, "dr.c": 0.6}  # how often each reads the truth right
    reads: dict = {name: {} for name in readers}
    with CurationSession(folder, user="u") as session:
        for name, accuracy in readers.items():
            for key in rng.sample(keys, 36):  # each reader reads 36 of the 48 nodes: the overlaps differ per pair
                label = truth[key] if rng.random() < accuracy else 1 - truth[key]
                session.read_node(*key, label, reader=name)
                reads[name][key] = label
        session.exclude_node(*keys[0], "motion")  # excluded nodes are left out
        session.exclude_case(keys[-1][0], "wrong series")
    excluded = {keys[0]} | {key for key in keys if key[0] == keys[-1][0]}
    probability = {key: min(max(truth[key] * 0.6 + rng.random() * 0.5, 0.0), 1.0) for key in keys}
    predictions = tmp_path / "predictions.csv"
    with open(predictions, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "patient_id", "label_value", "probability", "prediction", "label", "short_axis_mm"])
        for key in keys:
            writer.writerow([key[0], key[0][:5], key[1], probability[key], int(probability[key] >= 0.7), "", 5.0])

    out_dir = tmp_path / "out"
    assert curate(folder, "--agreement", "--predictions", str(predictions), "--out", str(out_dir)) == 0
    printed = capsys.readouterr().out
    assert not (folder / "agreement.json").exists()  # --out given: nothing in the dataset folder
    report = json.loads((out_dir / "agreement.json").read_text())
    assert report["readers"] == {name: sum(key not in excluded for key in reads[name]) for name in readers}

    def expected(labels_a: dict, labels_b: dict):
        shared = [key for key in keys if key in labels_a and key in labels_b and key not in excluded]
        return len(shared), cohen_kappa_score([labels_a[k] for k in shared], [labels_b[k] for k in shared])

    got = {(pair["rater_a"], pair["rater_b"]): pair for pair in report["reader_pairs"]}
    assert set(got) == set(combinations(sorted(readers), 2))
    for (a, b), pair in got.items():
        n, kappa = expected(reads[a], reads[b])
        assert pair["n"] == n and pair["kappa"] == pytest.approx(kappa, abs=1e-12)
        assert f"{a} vs {b}: kappa {kappa:.3f} on {n} nodes" in printed
    model = {key: int(probability[key] >= 0.7) for key in keys}  # the table's prediction column
    for pair in report["model_vs_readers"]:
        assert pair["rater_a"] == "model"
        n, kappa = expected(model, reads[pair["rater_b"]])
        assert pair["n"] == n and pair["kappa"] == pytest.approx(kappa, abs=1e-12)
    assert len(report["model_vs_readers"]) == 3

    rows = read_csv(out_dir / "disagreements.csv")
    expected_rows = set()
    for a, b in list(combinations(sorted(readers), 2)) + [("model", name) for name in sorted(readers)]:
        labels_a = model if a == "model" else reads[a]
        for key in keys:
            if key in labels_a and key in reads[b] and key not in excluded and labels_a[key] != reads[b][key]:
                expected_rows.add((a, b, key[0], key[1], labels_a[key], reads[b][key]))
    assert {(r["rater_a"], r["rater_b"], r["case_id"], int(r["label_value"]), int(r["label_a"]), int(r["label_b"])) for r in rows} == expected_rows
    assert report["disagreements"] == len(rows) == len(expected_rows)
    model_rows = [r for r in rows if r["rater_a"] == "model"]
    assert all(float(r["probability"]) == probability[(r["case_id"], int(r["label_value"]))] for r in model_rows)

    # --threshold thresholds the probability instead of the table's prediction column
    assert curate(folder, "--agreement", "--predictions", str(predictions), "--threshold", "0.4", "--out", str(out_dir)) == 0
    report = json.loads((out_dir / "agreement.json").read_text())
    model = {key: int(probability[key] >= 0.4) for key in keys}
    for pair in report["model_vs_readers"]:
        n, kappa = expected(model, reads[pair["rater_b"]])
        assert pair["kappa"] == pytest.approx(kappa, abs=1e-12)


def test_undefined_kappa_says_why():
    same = pair_agreement("a", "b", [1, 1, 1], [1, 1, 1])
    assert same["kappa"] is None and "same single label" in same["kappa_undefined"] and same["observed_agreement"] == 1.0
    none = pair_agreement("a", "b", [], [])
    assert none["kappa"] is None and none["kappa_undefined"] == "no node labelled by both" and none["n"] == 0
    one_sided = pair_agreement("a", "b", [1, 1, 1, 1], [1, 0, 1, 1])  # p_e = p(B=1) = 0.75, p_o = 0.75: kappa 0, defined
    assert one_sided["kappa"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    "content, message",
    [
        ("case_id,label_value\nP0000-S1,1\n", "no probability column"),
        ("case_id,label_value,probability\nP0000-S1,one,0.3\n", "Row 2 of"),
        ("case_id,label_value,probability\nP0000-S1,1,nan\n", "Row 2 of"),
        (None, "does not exist"),
    ],
)
def test_bad_predictions_are_one_line_and_write_nothing(tmp_path, capsys, content, message):
    folder = tmp_path / "ds"
    make_dataset(folder, 1, 2)
    with CurationSession(folder, user="u") as session:
        session.read_node("P0000-S1", 1, 1, reader="dr.a")
    predictions = tmp_path / "p.csv"
    if content is not None:
        predictions.write_text(content)
    before = sorted(path.name for path in folder.iterdir())
    assert curate(folder, "--agreement", "--predictions", str(predictions), "--threshold", "0.5") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert sorted(path.name for path in folder.iterdir()) == before
    assert curate(folder, "--agreement", "--threshold", "0.5") == 2
    assert "--threshold needs --predictions" in capsys.readouterr().err
    predictions.write_text("case_id,label_value,probability\nP0000-S1,1,0.9\n")
    assert curate(folder, "--agreement", "--predictions", str(predictions), "--threshold", "1.5") == 2
    assert "not a probability between 0 and 1" in capsys.readouterr().err
    assert sorted(path.name for path in folder.iterdir()) == before
