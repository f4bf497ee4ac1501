"""evaluate: metrics.json agrees with scikit-learn recomputed from predictions.csv, CIs, one class, ROC.

Data: a small phantom cohort (phantoms.generate_cohort) and a real exported TorchScript model with
a complete card (random weights: the plumbing and the arithmetic are under test, not accuracy).
"""

import csv
import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import accuracy_score, confusion_matrix, precision_score, recall_score, roc_auc_score

from LymphNodeClassifierLib import cli
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.evaluate import evaluate_patchset, evaluate_predictions
from LymphNodeClassifierLib.model import load_model
from LymphNodeClassifierLib.patches import PatchSpec
from LymphNodeClassifierLib.patchset import PatchSet
from LymphNodeClassifierLib.phantoms import generate_cohort
from LymphNodeClassifierLib.pipeline import classify_images
from helpers import export_untrained_model

RATES = ("accuracy", "sensitivity", "specificity", "ppv", "npv")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_untrained_model(tmp_path_factory.mktemp("model") / "untrained.pt")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "phantoms"
    generate_cohort(folder, cases=4, seed=7)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("patch-cache")


def run_evaluate(model_path, dataset, out, cache, *extra) -> int:
    return cli.main(["evaluate", "--model", str(model_path), "--dataset", str(dataset), "--out", str(out), "--cache", str(cache), *map(str, extra)])


def read_predictions(out: Path) -> dict[str, np.ndarray]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and list(rows[0]) == ["case_id", "patient_id", "label_value", "probability", "prediction", "label", "short_axis_mm"]
    columns = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    for key in ("label_value", "prediction", "label"):
        columns[key] = columns[key].astype(int)
    for key in ("probability", "short_axis_mm"):
        columns[key] = columns[key].astype(float)
    return columns


def assert_matches(block: dict, expected: dict, what: str) -> None:
    for key, value in expected.items():
        if key == "confusion_matrix":
            assert block[key] == value, f"{what} {key}"
        else:
            assert block[key] == pytest.approx(value, abs=1e-12), f"{what} {key}"


def sklearn_metrics(y, predicted, score) -> dict:
    """The metrics recomputed with scikit-learn only."""
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    return {
        "auc": roc_auc_score(y, score), "accuracy": accuracy_score(y, predicted),
        "sensitivity": recall_score(y, predicted, pos_label=1), "specificity": recall_score(y, predicted, pos_label=0),
        "ppv": precision_score(y, predicted, pos_label=1), "npv": precision_score(y, predicted, pos_label=0),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]], "n": len(y), "n_positive": int(np.sum(y)),
    }


@pytest.fixture(scope="module")
def evaluated(model_path, cohort, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation") / "out"
    assert run_evaluate(model_path, cohort, out, cache, "--bootstrap", 300, "--seed", 3) == 0
    return out


def test_metrics_equal_sklearn_recomputed_from_predictions_csv(evaluated, cohort):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    columns = read_predictions(evaluated)
    y, p = columns["label"], columns["probability"]
    threshold = metrics["threshold"]
    assert threshold == 0.5 and metrics["threshold_source"] == "model card"
    assert np.array_equal(columns["prediction"], (p >= threshold).astype(int))
    assert 0 < columns["prediction"].sum() < len(y), "both predicted classes should occur for this test to bite"

    assert_matches(metrics, sklearn_metrics(y, columns["prediction"], p), "model")
    assert metrics["undefined"] == {}

    size_predicted = (columns["short_axis_mm"] >= 10.0).astype(int)
    assert 0 < size_predicted.sum() < len(y)
    size = metrics["size_rule"]
    assert size["threshold_mm"] == 10.0 and size["score"] == "short_axis_mm"
    assert_matches(size, sklearn_metrics(y, size_predicted, columns["short_axis_mm"]), "size rule")

    # the rows are the dataset's labelled, non-excluded nodes with their labels and patients
    dataset = Dataset.load(cohort)
    wanted = {(n.case_id, n.label_value): n.metastatic for n in dataset.nodes if not n.excluded and n.metastatic is not None}
    got = {(c, int(v)): int(label) for c, v, label in zip(columns["case_id"], columns["label_value"], y)}
    assert got == wanted
    assert all(dataset.case(c).patient_id == pid for c, pid in zip(columns["case_id"], columns["patient_id"]))
    assert metrics["patients"] == len(set(columns["patient_id"])) and metrics["n"] == len(wanted)


def test_probabilities_come_from_the_cards_preprocessing(evaluated, cohort, model_path):
    """Recompute one case through the classify pipeline (its own node and patch extraction)."""
    columns = read_predictions(evaluated)
    dataset = Dataset.load(cohort)
    case = dataset.cases[0]
    result = classify_images(sitk.ReadImage(str(dataset.ct_path(case))), sitk.ReadImage(str(dataset.labels_path(case))),
                             load_model(model_path), with_gradcam=False, per_label_value=True)
    mine = {int(v): prob for c, v, prob in zip(columns["case_id"], columns["label_value"], columns["probability"]) if c == case.case_id}
    theirs = {node.label_value: float(prob) for node, prob in zip(result.nodes, result.probabilities)}
    assert mine.keys() == theirs.keys()
    for value in mine:
        assert mine[value] == pytest.approx(theirs[value], abs=1e-6)
    short = {int(v): s for c, v, s in zip(columns["case_id"], columns["label_value"], columns["short_axis_mm"]) if c == case.case_id}
    assert short == pytest.approx({node.label_value: node.short_axis_mm for node in result.nodes})


def test_confidence_intervals_contain_the_estimates(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["bootstrap"]["resamples"] == 300 and metrics["bootstrap"]["seed"] == 3
    for block in (metrics, metrics["size_rule"]):
        assert set(block["ci95"]) == {"auc", *RATES}
        for name, interval in block["ci95"].items():
            assert interval is not None, name
            low, high = interval
            assert 0.0 <= low <= block[name] <= high <= 1.0, f"{name}: {block[name]} outside [{low}, {high}]"
        assert block["ci95"]["auc"][1] > block["ci95"]["auc"][0]


def test_roc_png_is_written(evaluated):
    image = matplotlib.image.imread(evaluated / "roc.png")
    assert image.shape[0] > 300 and image.shape[1] > 900
    assert image[..., :3].std() > 0.05  # something was drawn
    assert not list(evaluated.glob(".*"))  # no temporaries left by the atomic writes


def test_calibration_and_reliability_png_agree_with_scikit_learn(evaluated):
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    columns = read_predictions(evaluated)
    y, p = columns["label"], columns["probability"]
    m = json.loads((evaluated / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=cal["n_bins"], strategy="uniform")
    counts = np.array(cal["reliability"]["counts"])
    assert cal["ece"] == pytest.approx(float(np.sum(counts[counts > 0] * np.abs(prob_true - prob_pred)) / y.size), abs=1e-12)
    assert m["threshold_source"] == "model card" and m["threshold_rule"] == "not recorded in the card"  # the untrained test card says none
    image = matplotlib.image.imread(evaluated / "reliability.png")
    assert image.shape[0] > 500 and image[..., :3].std() > 0.05


def test_threshold_override_and_exclusions(model_path, cohort, cache, tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(cohort, folder)
    dataset = Dataset.load(folder)
    dropped_case = dataset.cases[-1]
    dropped_case.excluded, dropped_case.exclude_reason = True, "test"
    node = dataset.nodes_of(dataset.cases[0].case_id)[0]
    node.excluded = True
    unlabelled = dataset.nodes_of(dataset.cases[0].case_id)[1]
    unlabelled.metastatic = None
    dataset.save()
    out = tmp_path / "out"
    assert run_evaluate(model_path, folder, out, cache, "--threshold", 0.499, "--bootstrap", 0) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    columns = read_predictions(out)
    assert metrics["threshold"] == 0.499 and metrics["threshold_source"] == "given" and metrics["ci95"] is None
    assert np.array_equal(columns["prediction"], (columns["probability"] >= 0.499).astype(int))
    keys = set(zip(columns["case_id"], columns["label_value"].tolist()))
    assert dropped_case.case_id not in columns["case_id"]
    assert node.key not in keys and unlabelled.key not in keys
    assert any("not labelled" in problem for problem in metrics["skipped"])


def test_one_class_gives_null_auc_with_a_reason(model_path, cohort, cache, tmp_path, capsys):
    folder = tmp_path / "benign-only"
    shutil.copytree(cohort, folder)
    dataset = Dataset.load(folder)
    for node in dataset.nodes:
        node.metastatic = 0
    dataset.save()
    out = tmp_path / "out"
    assert run_evaluate(model_path, folder, out, cache, "--bootstrap", 50) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_positive"] == 0 and metrics["n"] == len(dataset.nodes)
    for block in (metrics, metrics["size_rule"]):
        assert block["auc"] is None and "only one class" in block["undefined"]["auc"]
        assert block["sensitivity"] is None and "no metastatic" in block["undefined"]["sensitivity"]
        assert block["ci95"]["auc"] is None and block["ci95"]["sensitivity"] is None
        assert block["specificity"] is not None
    columns = read_predictions(out)
    assert metrics["specificity"] == pytest.approx(recall_score(columns["label"], columns["prediction"], pos_label=0))
    assert (out / "roc.png").stat().st_size > 10_000
    assert "only one class" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda args: args.__setitem__(1, "/nonexistent/model.pt"), "does not exist"),
        (lambda args: args.extend(["--threshold", "1.5"]), "outside [0, 1]"),
        (lambda args: args.extend(["--bootstrap", "-1"]), "at least 0"),
        (lambda args: args.extend(["--frobnicate"]), "unrecognized arguments"),
        (lambda args: args.__setitem__(3, "/nonexistent/dataset"), "no dataset.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model_path, cohort, tmp_path, capsys, change, message):
    args = ["--model", str(model_path), "--dataset", str(cohort), "--out", str(tmp_path / "out")]
    change(args)
    assert cli.main(["evaluate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_no_labelled_node_is_an_input_error(model_path, cohort, tmp_path, capsys):
    folder = tmp_path / "excluded"
    shutil.copytree(cohort, folder)
    dataset = Dataset.load(folder)
    for case in dataset.cases:
        case.excluded = True
    dataset.save()
    assert cli.main(["evaluate", "--model", str(model_path), "--dataset", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "no labelled, non-excluded node" in capsys.readouterr().err


def synthetic_patchset(y, short, patients, spec=None) -> PatchSet:
    n = len(y)
    spec = spec or PatchSpec(size=8, views="axial")
    return PatchSet(
        x=np.zeros((n, spec.channels, spec.size, spec.size), np.float32), y=np.asarray(y, np.int64),
        patient_ids=np.asarray(patients, dtype=str), case_ids=np.asarray([f"{p}-S1" for p in patients], dtype=str),
        label_values=np.arange(1, n + 1), short_axis_mm=np.asarray(short, float), long_axis_mm=np.asarray(short, float) * 1.5,
        true_y=np.full(n, -1), spec=spec, window=(-135.0, 215.0),
    )


def test_evaluate_predictions_is_reusable_without_a_model():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 60)
    short = np.where(y == 1, rng.normal(9, 3, 60), rng.normal(6, 2, 60)).clip(2, 20)
    short[:3] = 10.0  # exactly at the size rule's cut-off: called metastatic
    probability = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    patchset = synthetic_patchset(y, short, [f"P{i // 3}" for i in range(60)])
    metrics = evaluate_predictions(patchset, probability, 0.5, n_boot=100, seed=1)
    assert_matches(metrics, sklearn_metrics(y, (probability >= 0.5).astype(int), probability), "model")
    assert_matches(metrics["size_rule"], sklearn_metrics(y, (short >= 10).astype(int), short), "size rule")
    assert metrics["patients"] == 20 and "vs_truth" not in metrics
    json.dumps(metrics, allow_nan=False)
    with pytest.raises(InputError, match="probabilities for"):
        evaluate_predictions(patchset, probability[:-1], 0.5)
    with pytest.raises(InputError, match="size-rule threshold"):
        evaluate_predictions(patchset, probability, 0.5, size_threshold_mm=0)


def test_evaluate_patchset_refuses_patches_made_otherwise(model_path):
    model = load_model(model_path)
    wrong = synthetic_patchset([0, 1], [5.0, 12.0], ["P1", "P2"], spec=PatchSpec(size=32))
    with pytest.raises(InputError, match="another patch spec or window"):
        evaluate_patchset(model, wrong)
    right_spec = synthetic_patchset([], [], [], spec=PatchSpec())
    with pytest.raises(InputError, match="no labelled, non-excluded node"):
        evaluate_patchset(model, right_spec)
