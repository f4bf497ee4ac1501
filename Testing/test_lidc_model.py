"""The bundled LIDC-IDRI lung-nodule model: card complete, metrics reproducible.

A full re-run of the documented cross-validation command takes many CPU minutes, so two cheap,
honest parts of it are checked:
- the committed out-of-fold predictions (docs/lidc_oof_predictions.csv, written by that run)
  give the card's cross-validated AUC, accuracy, sensitivity and specificity exactly when
  recomputed with scikit-learn, and are patient-grouped (no patient in two folds);
- re-importing the shared LIDC crops with the documented import command and re-evaluating the
  shipped model on them (the card's preprocessing) reproduces the training-set metrics the card
  recorded at export time.
Skipped, with the reason, when the shared data (../shared/data/lidc-nodules) or the model is absent.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from LymphNodeClassifierLib.model import load_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc-nodules"
MODEL = ROOT / "LymphNodeClassifier" / "Resources" / "Models" / "lung_nodule_lidc.pt"
OOF = ROOT / "docs" / "lidc_oof_predictions.csv"
NAME = "Lung nodule malignancy (LIDC-IDRI radiologist consensus)"

needs_model = pytest.mark.skipif(not MODEL.is_file(), reason=f"the bundled LIDC model {MODEL} is absent")
needs_shared = pytest.mark.skipif(not (SHARED / "labels.csv").is_file(), reason=f"the shared LIDC data ({SHARED}) are absent")


@pytest.fixture(scope="module")
def card():
    return load_model(MODEL).card


@needs_model
def test_model_is_small_and_its_card_complete(card):
    assert MODEL.stat().st_size < 10 * 1024 * 1024
    assert card["name"] == NAME
    definition = card["label_definition"].lower()
    assert "radiologist" in definition and "not pathology" in definition and "above 3" in definition
    assert "Armato" in card["description"] and "CC BY 3.0" in card["description"] and "TCIA" in card["description"]
    command = card["training"]["command"]
    assert command.startswith("python -m LymphNodeClassifierLib crossval ") and "--export-model" in command
    cv = card["metrics"]["cross_validation"]
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        low, high = cv["ci95"][key]
        assert low <= cv[key] <= high
    assert cv["n"] == 603 and cv["folds"] == 5 and cv["patients"] == 343
    assert set(cv["size_rules"]) == {"short_axis_mm", "long_axis_mm"}
    assert card["preprocessing"]["window_low"] == -1000 and card["preprocessing"]["window_high"] == 400
    # the CNN fused with the nodule's measured features (fusion.py): the card lists them, the command asks for them
    assert card["preprocessing"]["node_features"]["fusion"] == "mean" and "--fusion mean" in command


@needs_model
def test_oof_predictions_reproduce_the_cards_cross_validated_metrics(card):
    rows = list(csv.DictReader(OOF.open()))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    pred = np.array([int(r["prediction"]) for r in rows])
    cv = card["metrics"]["cross_validation"]
    assert len(rows) == cv["n"]
    assert roc_auc_score(y, p) == cv["auc"]
    assert accuracy_score(y, pred) == cv["accuracy"]
    assert recall_score(y, pred) == cv["sensitivity"]
    assert recall_score(1 - y, 1 - pred) == cv["specificity"]
    assert roc_auc_score(y, [float(r["long_axis_mm"]) for r in rows]) == cv["size_rules"]["long_axis_mm"]["auc"]
    # the image branch's own OOF probabilities are in the file too; the fused ones are what the card reports
    image = np.array([float(r["image_probability"]) for r in rows])
    assert roc_auc_score(y, image) != cv["auc"]
    folds: dict[str, set] = {}
    for r in rows:
        folds.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(f) == 1 for f in folds.values())  # every patient in exactly one held-out fold


@needs_model
@needs_shared
def test_reevaluating_the_model_on_the_shared_set_reproduces_the_card(card, tmp_path):
    from LymphNodeClassifierLib.evaluate import evaluate_dataset
    from LymphNodeClassifierLib.importer import main as import_main

    dataset = tmp_path / "lidc"
    assert import_main(["--labels", str(SHARED / "labels.csv"), "--root", str(SHARED), "--out", str(dataset), "--label-col", "Diagnosis",
                        "--positive", "Malign", "--negative", "Benign", "--patient-col", "patient_id", "--case-col", "case"]) == 0
    evaluation = evaluate_dataset(MODEL, dataset, n_boot=0)
    recorded = card["metrics"]["training_set"]
    m = evaluation.metrics
    assert m["n"] == recorded["n"] == 603 and m["n_positive"] == recorded["n_positive"]
    assert m["auc"] == pytest.approx(recorded["auc"], abs=2e-3)
    assert m["accuracy"] == pytest.approx(recorded["accuracy"], abs=5e-3)
    assert m["sensitivity"] == pytest.approx(recorded["sensitivity"], abs=1e-2)
    assert m["specificity"] == pytest.approx(recorded["specificity"], abs=1e-2)
    json.dumps(m)  # JSON-ready
