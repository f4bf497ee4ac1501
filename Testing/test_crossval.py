"""Patient-grouped cross-validation on a tiny phantom cohort: folds, out-of-fold predictions, metrics.

Fast on purpose: a handful of phantom studies, 16-px patches, two epochs, three folds. What is
checked is the bookkeeping, not the accuracy: no patient in two folds' test parts, one OOF
prediction per node from a model that never saw its patient, and metrics.json equal to
scikit-learn's numbers recomputed from predictions.csv.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

import LymphNodeClassifierLib.crossval as crossval
from LymphNodeClassifierLib.cli import COMMANDS
from LymphNodeClassifierLib.crossval import OUTPUT_FILES, assign_folds, cross_validate, main, write_crossval
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.model import load_model
from LymphNodeClassifierLib.patchset import build_patchset
from LymphNodeClassifierLib.phantoms import generate_cohort
from LymphNodeClassifierLib.training import TrainingConfig

FOLDS = 3
SMALL = dict(patch_size=16, spacing_mm=(2.0, 2.0, 2.0), epochs=2, batch_size=8, patience=2, architecture="resnet", num_threads=1, translation_px=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("cv-cohort"), cases=9, seed=11)


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory, monkeypatch_module):
    config = TrainingConfig(**SMALL)
    patchset = build_patchset(cohort, config.patch_spec(), config.window)
    seen: dict[int, set] = {}
    original = crossval.train

    def spying_train(ps, cfg, on_event=None, is_cancelled=None, splits=None):
        train_idx, val_idx, test_idx = splits
        fold = len(seen)
        seen[fold] = {"fit": set(ps.patient_ids[np.concatenate([train_idx, val_idx])].tolist()), "test": test_idx.copy()}
        return original(ps, cfg, on_event=on_event, is_cancelled=is_cancelled, splits=splits)

    monkeypatch_module.setattr(crossval, "train", spying_train)
    result = cross_validate(patchset, config, folds=FOLDS, seed=3, inner_val_fraction=0.5, n_boot=50)
    out = tmp_path_factory.mktemp("cv-out")
    write_crossval(result, out)
    return result, seen, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_folds_group_patients_and_cover_every_node(run):
    result, seen, _ = run
    ps = result.patchset
    assert sorted(np.unique(result.fold).tolist()) == list(range(FOLDS))
    for k in range(FOLDS):
        others = set(ps.patient_ids[result.fold != k].tolist())
        assert not set(ps.patient_ids[result.fold == k].tolist()) & others
    tested = np.concatenate([seen[k]["test"] for k in range(FOLDS)])
    assert sorted(tested.tolist()) == list(range(len(ps)))  # exactly one OOF prediction per node
    for k in range(FOLDS):
        test_patients = set(ps.patient_ids[seen[k]["test"]].tolist())
        assert not test_patients & seen[k]["fit"]  # the fold's model never saw these patients
        assert (result.fold[seen[k]["test"]] == k).all()
    assert np.isfinite(result.probability).all() and ((0 <= result.probability) & (result.probability <= 1)).all()


def test_metrics_equal_sklearn_from_predictions_csv(run):
    result, _, out = run
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(result.patchset)
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    pred = np.array([int(r["prediction"]) for r in rows])
    assert (pred == (p >= np.array([float(r["threshold"]) for r in rows]))).all()
    m = json.loads((out / "metrics.json").read_text())
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert m["specificity"] == pytest.approx(recall_score(1 - y, 1 - pred), abs=1e-12)
    short = np.array([float(r["short_axis_mm"]) for r in rows])
    long = np.array([float(r["long_axis_mm"]) for r in rows])
    assert m["size_rules"]["short_axis_mm"]["auc"] == pytest.approx(roc_auc_score(y, short), abs=1e-12)
    assert m["size_rules"]["long_axis_mm"]["auc"] == pytest.approx(roc_auc_score(y, long), abs=1e-12)
    folds = np.array([int(r["fold"]) for r in rows])
    for k, value in enumerate(m["per_fold_auc"]):
        yk = y[folds == k]
        if 0 < yk.sum() < yk.size:
            assert value == pytest.approx(roc_auc_score(yk, p[folds == k]), abs=1e-12)
        else:
            assert value is None
    for block in (m, m["size_rules"]["long_axis_mm"]):
        low, high = block["ci95"]["auc"]
        assert low <= block["auc"] <= high
    assert m["size_rules"]["long_axis_mm"]["model_minus_rule_auc"]["difference"] == pytest.approx(
        m["auc"] - m["size_rules"]["long_axis_mm"]["auc"], abs=1e-12)
    # calibration of the pooled OOF probabilities, recomputed from the file with scikit-learn
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    cal = m["calibration"]
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=cal["n_bins"], strategy="uniform")
    counts = np.array(cal["reliability"]["counts"])
    assert counts.sum() == y.size
    assert cal["ece"] == pytest.approx(float(np.sum(counts[counts > 0] * np.abs(prob_true - prob_pred)) / y.size), abs=1e-12)
    low, high = cal["ci95"]["ece"]
    assert low <= cal["ece"] <= high
    assert m["threshold_rule"] == "youden" and "Youden" in m["prediction_rule"]


def test_assign_folds_is_seeded_and_refuses_too_few_patients():
    patients = np.repeat([f"P{i}" for i in range(10)], 2)
    y = np.tile([0, 1], 10)
    a, b = assign_folds(patients, y, 5, seed=1), assign_folds(patients, y, 5, seed=1)
    assert (a == b).all()
    for pid in np.unique(patients):
        assert len(set(a[patients == pid].tolist())) == 1
    with pytest.raises(InputError, match="patients"):
        assign_folds(patients[:4], y[:4], 5)
    with pytest.raises(InputError, match="both classes"):
        assign_folds(patients, np.zeros(20, int), 5)


def test_command_writes_outputs_and_exports_a_model_with_cv_card(cohort, tmp_path, capsys):
    assert COMMANDS["crossval"][0] == "crossval"
    out, model = tmp_path / "cv", tmp_path / "m.pt"
    argv = ["--dataset", str(cohort.folder), "--out", str(out), "--folds", "3", "--patch-size", "16", "--spacing", "2",
            "--epochs", "1", "--batch-size", "8", "--architecture", "resnet", "--translation", "2", "--bootstrap", "20",
            "--inner-val", "0.5", "--quiet", "--export-model", str(model), "--name", "cv test", "--label-definition", "test labels"]
    assert main(argv) == 0
    assert all((out / name).is_file() for name in OUTPUT_FILES)
    card = load_model(model).card
    metrics = json.loads((out / "metrics.json").read_text())
    assert card["metrics"]["cross_validation"]["auc"] == metrics["auc"]
    assert card["training"]["command"].startswith("python -m LymphNodeClassifierLib crossval ")
    assert card["label_definition"] == "test labels" and card["name"] == "cv test"
    assert math.isfinite(card["decision_threshold"])
    assert card["metrics"]["cross_validation"]["calibration"]["ece"] == metrics["calibration"]["ece"]
    assert card["training"]["threshold_rule"] == "youden"


def test_sensitivity_threshold_rule_reaches_its_target_on_each_inner_validation_part(cohort):
    config = TrainingConfig(**SMALL, threshold_rule="sensitivity:0.9")
    patchset = build_patchset(cohort, config.patch_spec(), config.window)
    seen = []
    original = crossval.train

    def spying_train(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(crossval, "train", spying_train)
    try:
        result = cross_validate(patchset, config, folds=FOLDS, seed=3, inner_val_fraction=0.5, n_boot=0)
    finally:
        mp.undo()
    assert result.metrics["threshold_rule"] == "sensitivity:0.9" and "90%" in result.metrics["prediction_rule"]
    assert len(seen) == FOLDS
    for fold in seen:
        y_val = patchset.y[fold.splits["validation"]]
        if 0 < y_val.sum() < y_val.size:
            assert "90%" in fold.threshold_method
            assert np.mean(fold.probabilities["validation"][y_val == 1] >= fold.decision_threshold) >= 0.9
    with pytest.raises(InputError, match="threshold rule"):
        TrainingConfig(**SMALL, threshold_rule="best")
