"""metrics.py against scikit-learn's own metric functions, degenerate inputs, bootstrap intervals."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.metrics import METRIC_NAMES, binary_metrics, bootstrap_ci, json_safe, roc_points


def scores(n: int, seed: int, separation: float = 1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    logit = separation * (2 * y - 1) + rng.normal(size=n)
    return y, 1.0 / (1.0 + np.exp(-logit))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.71])
def test_values_equal_scikit_learn(seed, threshold):
    y, p = scores(200, seed)
    predicted = (p >= threshold).astype(int)
    got = binary_metrics(y, p, threshold)
    assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert got["sensitivity"] == pytest.approx(recall_score(y, predicted, pos_label=1), abs=1e-12)
    assert got["specificity"] == pytest.approx(recall_score(y, predicted, pos_label=0), abs=1e-12)
    assert got["ppv"] == pytest.approx(precision_score(y, predicted, pos_label=1), abs=1e-12)
    assert got["npv"] == pytest.approx(precision_score(y, predicted, pos_label=0), abs=1e-12)
    assert got["n"] == 200 and got["n_positive"] == int(y.sum()) and got["n_negative"] == 200 - int(y.sum())
    (tn, fp), (fn, tp) = got["confusion_matrix"]
    assert tp == int(((predicted == 1) & (y == 1)).sum()) and tn == int(((predicted == 0) & (y == 0)).sum())
    assert tn + fp + fn + tp == 200 and got["undefined"] == {}


def test_threshold_is_inclusive():
    got = binary_metrics([0, 1], [0.4, 0.5], threshold=0.5)
    assert got["tp"] == 1 and got["fp"] == 0 and got["accuracy"] == 1.0


def test_one_class_only_gives_nan_with_reason_not_a_crash():
    got = binary_metrics([0, 0, 0, 0], [0.1, 0.2, 0.7, 0.4], 0.5)
    assert math.isnan(got["auc"]) and "one class" in got["undefined"]["auc"]
    assert math.isnan(got["sensitivity"]) and "sensitivity" in got["undefined"]
    assert got["specificity"] == 0.75 and got["accuracy"] == 0.75
    got = binary_metrics([1, 1], [0.9, 0.8], 0.5)
    assert math.isnan(got["specificity"]) and math.isnan(got["npv"]) and got["sensitivity"] == 1.0
    assert set(got["undefined"]) == {"auc", "specificity", "npv"}
    empty = binary_metrics([], [], 0.5)
    assert empty["n"] == 0 and all(math.isnan(empty[name]) for name in METRIC_NAMES)
    cis = bootstrap_ci([0, 0, 0], [0.1, 0.5, 0.9], 0.5, n_boot=50)
    assert all(math.isnan(v) for v in cis["auc"]) and not math.isnan(cis["specificity"][0])


def test_malformed_inputs_raise_input_error():
    with pytest.raises(InputError, match="probabilities"):
        binary_metrics([0, 1, 1], [0.1, 0.2], 0.5)
    with pytest.raises(InputError, match="0 .benign. or 1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(InputError, match="logits"):
        binary_metrics([0, 1], [-1.0, 2.0], 0.5)
    with pytest.raises(InputError, match="threshold"):
        binary_metrics([0, 1], [0.1, 0.9], 1.5)


@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_ci_covers_point_estimate_and_is_reproducible(grouped):
    y, p = scores(300, 7)
    groups = np.repeat(np.arange(100), 3) if grouped else None
    point = binary_metrics(y, p, 0.5)
    first = bootstrap_ci(y, p, 0.5, n_boot=400, seed=3, groups=groups)
    assert set(first) == set(METRIC_NAMES)
    for name, (low, high) in first.items():
        assert low <= point[name] <= high, name
        assert high - low > 0.0 and high - low < 0.3, name
    assert bootstrap_ci(y, p, 0.5, n_boot=400, seed=3, groups=groups) == first
    assert bootstrap_ci(y, p, 0.5, n_boot=400, seed=4, groups=groups) != first


def test_patient_level_bootstrap_is_wider_for_correlated_nodes():
    # every patient's nodes are copies of one node: node-level resampling overstates the sample size
    y, p = scores(60, 11)
    y_rep, p_rep, groups = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(60), 5)
    node_level = bootstrap_ci(y_rep, p_rep, 0.5, n_boot=300, seed=0)
    patient_level = bootstrap_ci(y_rep, p_rep, 0.5, n_boot=300, seed=0, groups=groups)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(patient_level["auc"]) > 1.5 * width(node_level["auc"])


def test_json_safe_turns_nan_into_null():
    got = json_safe(binary_metrics([0, 0], [0.2, 0.6], 0.5))
    text = json.dumps(got, allow_nan=False)
    assert json.loads(text)["auc"] is None


def test_rank_auc_used_by_the_bootstrap_equals_roc_auc_score_with_ties():
    from LymphNodeClassifierLib.metrics import rank_auc

    rng = np.random.default_rng(5)
    for _ in range(50):
        y = rng.integers(0, 2, size=40)
        y[:2] = (0, 1)
        p = np.round(rng.random(40), 1)  # many ties
        assert rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_roc_points_enclose_the_auc_and_run_from_corner_to_corner():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    score = y * 0.8 + rng.normal(0, 0.6, 300)
    score[::7] = np.round(score[::7], 1)  # some ties
    roc = roc_points(y, score)
    fpr, tpr = np.array(roc["fpr"]), np.array(roc["tpr"])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids under the curve
    assert area == pytest.approx(roc_auc_score(y, score), abs=1e-5)
    json.dumps(roc, allow_nan=False)
    assert roc_points([1, 1, 1], [0.2, 0.5, 0.9]) is None and roc_points([], []) is None
