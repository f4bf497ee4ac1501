"""Suspect-label finder with CNN fold models (`find_suspects`, `--method cnn`): patient-grouped
out-of-fold probabilities, cleanlab ranking, CSV/JSON output, CLI. The features' finder (the
default) is tested in test_node_features.py.

The main fixture is a small phantom cohort with 20 % label noise (`phantoms.generate_cohort`,
exact-count flips with `label_flipped` / `true_metastatic` truth). Its PhantomConfig separates
the classes more than the default one (sizes, density, thin slices, 8-12 nodes per study) so that
a few seconds of CPU training learn something; the test is whether the finder, given a model that
has learnt something, puts the flipped labels at the top of its ranking.
"""

import csv
import json
import math

import numpy as np
import pytest
from scipy.stats import hypergeom

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import CancelledError, InputError
from LymphNodeClassifierLib.patchset import build_patchset
from LymphNodeClassifierLib.phantoms import PhantomConfig, generate_cohort
from LymphNodeClassifierLib.suspects import (
    CSV_COLUMNS,
    assign_folds,
    find_suspects,
    predict_tta,
    rank_labels,
    suspect_config,
    write_outputs,
)

FOLDS = 4
EASY = PhantomConfig(
    nodes_per_case=(8, 12), slice_thickness_choices_mm=(1.25, 2.0), tilt_probability=0.0, multi_study_probability=0.2,
    node_negative_patient_probability=0.0, metastatic_fraction_positive=(0.4, 0.6),
    benign_short_axis_median_mm=5.0, benign_short_axis_log_sigma=0.12,
    metastatic_short_axis_median_mm=9.5, metastatic_short_axis_log_sigma=0.12,
    benign_hu=(15.0, 30.0), metastatic_hu=(65.0, 80.0), noise_sigma_hu=(8.0, 12.0),
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noisy") / "cohort"
    dataset = generate_cohort(folder, cases=18, seed=5, label_noise=0.2, config=EASY)
    config = suspect_config(epochs=30, num_threads=1)
    cache = tmp_path_factory.mktemp("patch-cache")
    patchset = build_patchset(dataset, config.patch_spec(), config.window, cache_dir=cache)
    events = []
    result = find_suspects(patchset, config, folds=FOLDS, seed=0, on_event=events.append)
    return {"dataset": dataset, "patchset": patchset, "config": config, "result": result, "events": events, "cache": cache}


def test_cohort_is_noisy_with_truth(cohort):
    patchset, dataset = cohort["patchset"], cohort["dataset"]
    assert len(patchset) == len(dataset.nodes) >= 120
    assert patchset.has_truth
    flipped = patchset.y != patchset.true_y
    assert flipped.sum() == sum(1 for n in dataset.nodes if n.label_flipped) == round(0.2 * len(dataset.nodes))


def test_flipped_labels_are_ranked_above_chance(cohort):
    result, patchset = cohort["result"], cohort["patchset"]
    flipped = patchset.y != patchset.true_y
    top = result.top(0.2)
    hits, n, k, drawn = int(flipped[top].sum()), len(patchset), int(flipped.sum()), int(top.size)
    chance = drawn / n
    recall = hits / k
    # under the null hypothesis (a ranking unrelated to the flips) the hits are hypergeometric
    p_value = float(hypergeom.sf(hits - 1, n, k, drawn))
    assert recall > 2 * chance, f"{hits} of {k} flipped labels in the top {drawn} (recall {recall:.2f}, chance {chance:.2f})"
    assert p_value < 1e-3, p_value
    summary = result.summary()
    assert summary["flipped_found_in_top"] == pytest.approx(recall)
    assert summary["n_flipped"] == k and summary["n_top"] == drawn
    assert summary["oof_auc_vs_true"] > summary["oof_auc_vs_given"] > 0.5  # the model learnt the truth, not the noise
    # cleanlab's flag is better than a random flag of the same size
    assert flipped[result.issue].mean() > 2 * flipped.mean()


def test_oof_probabilities_come_from_models_that_never_saw_the_patient(cohort):
    result, patchset = cohort["result"], cohort["patchset"]
    n = len(patchset)
    assert len(result.fold_splits) == FOLDS
    predicted = np.concatenate([s["predict"] for s in result.fold_splits])
    assert np.array_equal(np.sort(predicted), np.arange(n)), "every node is predicted exactly once"
    for k, split in enumerate(result.fold_splits):
        seen = np.concatenate([split["train"], split["validation"]])
        assert np.intersect1d(seen, split["predict"]).size == 0
        assert np.array_equal(np.sort(np.concatenate([seen, split["predict"]])), np.arange(n)), "the other folds are all used"
        seen_patients = set(patchset.patient_ids[seen].tolist())
        predicted_patients = set(patchset.patient_ids[split["predict"]].tolist())
        assert not seen_patients & predicted_patients, f"fold {k + 1} trained on a patient it predicts"
        assert split["validation"].size and split["train"].size
        assert np.all(result.fold[split["predict"]] == k)
    for patient in np.unique(patchset.patient_ids):
        assert np.unique(result.fold[patchset.patient_ids == patient]).size == 1, f"patient {patient} is split over folds"
    # studies of one patient (multi-study patients exist in this cohort) stay together
    assert any(len(cases) > 1 for cases in cohort["dataset"].patient_groups().values())
    assert np.isfinite(result.oof_probability).all() and (0 <= result.oof_probability).all() and (result.oof_probability <= 1).all()


def test_events_are_in_order_and_json_safe(cohort):
    events = cohort["events"]
    kinds = [e["event"] for e in events]
    assert kinds.count("fold_start") == kinds.count("fold_done") == FOLDS
    assert kinds[0] == "fold_start" and kinds[-1] == "done"
    assert all(e["fold"] in range(1, FOLDS + 1) for e in events if e["event"] == "epoch")
    json.dumps(events, allow_nan=False)


def test_csv_is_ranked_and_complete(cohort, tmp_path):
    result, patchset, dataset = cohort["result"], cohort["patchset"], cohort["dataset"]
    csv_path, json_path = write_outputs(result, tmp_path / "out")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(patchset) + 1))
    suspicion = [float(r["suspicion"]) for r in rows]
    assert all(a >= b for a, b in zip(suspicion, suspicion[1:])), "rows are sorted by suspicion"
    keys = {(r["case_id"], int(r["label_value"])) for r in rows}
    assert keys == {(n.case_id, n.label_value) for n in dataset.nodes} and len(keys) == len(rows)
    for row in rows:
        node = dataset.node(row["case_id"], int(row["label_value"]))
        assert int(row["given_label"]) == node.metastatic
        assert int(row["true_label"]) == node.true_metastatic
        assert row["label_flipped"] == str(node.label_flipped).lower()
        assert row["patient_id"] == dataset.case(row["case_id"]).patient_id
        probability = float(row["oof_probability"])
        assert 0.0 <= probability <= 1.0
        assert int(row["suggested_label"]) == int(probability >= 0.5)
        assert row["cleanlab_issue"] in ("true", "false")
    summary = json.loads(json_path.read_text(encoding="utf-8"))
    assert summary["n"] == len(rows)
    assert summary["n_issues"] == sum(r["cleanlab_issue"] == "true" for r in rows)
    flipped_in_top = sum(r["label_flipped"] == "true" for r in rows[:summary["n_top"]])
    assert summary["flipped_found_in_top"] == pytest.approx(flipped_in_top / summary["n_flipped"])
    assert not list(tmp_path.glob("out/.*.tmp*")), "no temporary files are left"


def test_cli_writes_its_files(cohort, tmp_path, capsys):
    out = tmp_path / "suspects"
    code = cli.main(["suspects", "--method", "cnn", "--dataset", str(cohort["dataset"].folder), "--out", str(out), "--folds", "3",
                     "--epochs", "2", "--seed", "1", "--threads", "1", "--cache", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(out / "suspects.csv", newline="", encoding="utf-8")))
    summary = json.loads((out / "suspects.json").read_text(encoding="utf-8"))
    assert len(rows) == summary["n"] == len(cohort["patchset"])
    assert summary["folds"] == 3 and summary["seed"] == 1 and summary["has_truth"] is True
    assert summary["config"]["epochs"] == 2 and summary["method"] == "cnn"
    for key in ("flipped_found_in_top", "oof_auc_vs_given", "oof_auc_vs_true"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key])
    assert "wrote" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_exit_2(cohort, tmp_path, capsys):
    folder = str(cohort["dataset"].folder)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for argv in (
        ["suspects", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")],
        ["suspects", "--dataset", folder, "--out", str(a_file)],
        ["suspects", "--dataset", folder, "--out", str(tmp_path / "o2"), "--folds", "1"],
        ["suspects", "--dataset", folder, "--out", str(tmp_path / "o3"), "--folds", "500", "--cache", str(cohort["cache"])],
        ["suspects", "--dataset", folder, "--out", str(tmp_path / "o4"), "--epochs", "0"],
        ["suspects", "--dataset", folder, "--out", str(tmp_path / "o5"), "--method", "magic"],
        ["suspects", "--dataset", folder],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_bad_arguments_raise_input_error(cohort):
    patchset, config = cohort["patchset"], cohort["config"]
    with pytest.raises(InputError, match="folds"):
        find_suspects(patchset, config, folds=1)
    with pytest.raises(InputError, match="patients"):
        find_suspects(patchset, config, folds=len(set(patchset.patient_ids.tolist())) + 1)
    with pytest.raises(InputError, match="seed"):
        find_suspects(patchset, config, seed=-1)
    with pytest.raises(InputError, match="patch spec"):
        find_suspects(patchset, suspect_config(patch_size=24), folds=2)
    with pytest.raises(InputError, match="patient id per node"):
        assign_folds(["a", "b"], [0, 1, 1], 2)


def test_cancel_stops_before_anything_is_returned(cohort):
    calls = []

    def cancel_on_third_check():
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(CancelledError):
        find_suspects(cohort["patchset"], cohort["config"], folds=2, is_cancelled=cancel_on_third_check)


def test_assign_folds_keeps_patients_together_and_balances_classes():
    rng = np.random.default_rng(3)
    patients = np.repeat([f"P{i:03d}" for i in range(60)], rng.integers(1, 8, 60))
    y = rng.integers(0, 2, patients.size)
    folds = assign_folds(patients, y, 5, seed=2)
    assert set(folds.tolist()) == set(range(5))
    for patient in np.unique(patients):
        assert np.unique(folds[patients == patient]).size == 1
    rates = [y[folds == k].mean() for k in range(5)]
    assert max(rates) - min(rates) < 0.15
    assert np.array_equal(folds, assign_folds(patients, y, 5, seed=2)), "deterministic for a seed"
    assert not np.array_equal(folds, assign_folds(patients, y, 5, seed=3))


def test_rank_labels_puts_confident_contradictions_first():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    probability = np.clip(np.where(truth == 1, 0.75, 0.25) + rng.normal(0, 0.1, 200), 0.01, 0.99)
    given = truth.copy()
    wrong = np.array([3, 50, 120, 199])
    given[wrong] = 1 - given[wrong]
    probability[wrong] = np.where(truth[wrong] == 1, 0.97, 0.03)  # the model is sure of the truth
    quality, issue, order = rank_labels(given, probability)
    assert set(order[:4].tolist()) == set(wrong.tolist())
    assert issue[wrong].all()
    assert np.array_equal(np.sort(order), np.arange(200))
    assert quality.shape == (200,) and ((0 <= quality) & (quality <= 1)).all()


def test_predict_tta_is_the_mean_over_the_eight_symmetries(cohort):
    import torch

    class Corner(torch.nn.Module):  # looks at one pixel, so every flip/turn gives another value
        def forward(self, x):
            return x[:, 0, 0, 0] * 4.0 - 2.0

    x = np.random.default_rng(1).random((5, 3, 8, 8)).astype(np.float32)
    plain = predict_tta(Corner(), x, tta=False)
    assert np.allclose(plain, 1 / (1 + np.exp(-(x[:, 0, 0, 0] * 4.0 - 2.0))))
    corners = np.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]], axis=1)
    expected = (1 / (1 + np.exp(-(corners * 4.0 - 2.0)))).mean(axis=1)  # each corner twice (turn + flip)
    assert np.allclose(predict_tta(Corner(), x, tta=True), expected)
