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


# --------------------------------------------------------------------------------------------
# calibration and threshold rules


def test_expected_calibration_error_of_a_hand_computed_case():
    from LymphNodeClassifierLib.metrics import expected_calibration_error, reliability_curve

    y = [0, 1, 0, 1, 1]
    p = [0.05, 0.15, 0.62, 0.68, 0.95]
    # bins (0, .1], (.1, .2], (.6, .7], (.9, 1]: |0 - .05| + |1 - .15| + 2 * |.5 - .65| + |1 - .95|, over 5 nodes
    assert expected_calibration_error(y, p, 10) == pytest.approx((0.05 + 0.85 + 2 * 0.15 + 0.05) / 5, abs=1e-12)
    mean_predicted, fraction_positive, counts = reliability_curve(y, p, 10)
    assert counts.tolist() == [1, 1, 0, 0, 0, 0, 2, 0, 0, 1]
    assert mean_predicted[6] == pytest.approx(0.65) and fraction_positive[6] == 0.5 and math.isnan(mean_predicted[2])
    # a probability on a bin edge belongs to the lower bin (right-closed), 0 to the first
    assert expected_calibration_error([0, 1, 1, 0], [0.5, 0.5, 1.0, 0.0], 2) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error([1, 1, 1, 1], [1.0, 1.0, 1.0, 1.0]) == 0.0
    assert expected_calibration_error([0, 1], [0.5, 0.5], 1) == 0.0  # one bin: overall rate vs mean probability


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_reliability_curve_equals_scikit_learn_calibration_curve(n_bins):
    from sklearn.calibration import calibration_curve

    from LymphNodeClassifierLib.metrics import expected_calibration_error, reliability_curve

    rng = np.random.default_rng(n_bins)
    p = np.concatenate([rng.random(400), np.linspace(0, 1, n_bins + 1)])  # bin edges included
    y = (rng.random(p.size) < p ** 1.5).astype(int)
    mean_predicted, fraction_positive, counts = reliability_curve(y, p, n_bins)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    shown = counts > 0
    np.testing.assert_allclose(mean_predicted[shown], prob_pred, atol=1e-12)
    np.testing.assert_allclose(fraction_positive[shown], prob_true, atol=1e-12)
    assert counts.sum() == p.size
    # ECE from scikit-learn's curve and our counts
    assert expected_calibration_error(y, p, n_bins) == pytest.approx(float(np.sum(counts[shown] * np.abs(prob_true - prob_pred)) / p.size), abs=1e-12)


def test_brier_score_equals_scikit_learn_and_a_hand_case():
    from sklearn.metrics import brier_score_loss

    from LymphNodeClassifierLib.metrics import brier_score

    assert brier_score([0, 1], [0.2, 0.6]) == pytest.approx((0.04 + 0.16) / 2)
    y, p = scores(300, 2)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert math.isnan(brier_score([], []))
    with pytest.raises(InputError, match="logits"):
        brier_score([0, 1], [-0.1, 0.5])


def test_calibration_separates_calibrated_from_overconfident_probabilities():
    from LymphNodeClassifierLib.metrics import calibration

    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(p.size) < p).astype(int)  # calibrated by construction
    overconfident = np.where(p > 0.5, 1 - (1 - p) ** 3, p ** 3)
    good, bad = calibration(y, p), calibration(y, overconfident)
    assert good["ece"] < 0.02 and bad["ece"] > 0.1
    assert good["brier"] < bad["brier"]
    json.dumps(good, allow_nan=False)
    assert len(good["reliability"]["counts"]) == 10 and sum(good["reliability"]["counts"]) == p.size


def test_calibration_bootstrap_ci_covers_the_point_and_widens_by_patient():
    from LymphNodeClassifierLib.metrics import calibration

    y, p = scores(60, 3)
    y_rep, p_rep, groups = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(60), 5)
    node = calibration(y_rep, p_rep, n_boot=300, seed=1)
    patient = calibration(y_rep, p_rep, n_boot=300, seed=1, groups=groups)
    for block in (node, patient):
        for name in ("brier", "ece"):
            low, high = block["ci95"][name]
            assert low <= block[name] <= high
    assert patient["ci95"]["brier"][1] - patient["ci95"]["brier"][0] > 1.5 * (node["ci95"]["brier"][1] - node["ci95"]["brier"][0])
    assert patient["bootstrap"]["resampling"].startswith("patient")
    with pytest.raises(InputError, match="bins"):
        calibration(y, p, n_bins=0)


def test_plot_reliability_writes_a_png(tmp_path):
    import matplotlib.image

    from LymphNodeClassifierLib.metrics import plot_reliability

    y, p = scores(200, 1)
    plot_reliability([("model", y, p), ("other", y, p ** 2)], tmp_path / "reliability.png", "test")
    image = matplotlib.image.imread(tmp_path / "reliability.png")
    assert image.shape[0] > 500 and image.shape[1] > 500 and image[..., :3].std() > 0.05


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_threshold_is_the_highest_reaching_the_target(seed, target):
    from LymphNodeClassifierLib.metrics import choose_threshold

    y, p = scores(150, seed)
    threshold, how = choose_threshold(y, p, f"sensitivity:{target}")
    sensitivity = lambda t: float(np.mean(p[y == 1] >= t))  # noqa: E731
    assert sensitivity(threshold) >= target
    higher = np.unique(p[p > threshold])
    assert higher.size == 0 or sensitivity(higher[0]) < target  # any higher cut-off misses the target
    assert f"{target:.0%}" in how


def test_youden_rule_maximises_j_and_rules_parse():
    from LymphNodeClassifierLib.metrics import choose_threshold, parse_threshold_rule, threshold_rule_name

    y, p = scores(200, 9)
    threshold, how = choose_threshold(y, p, "youden")
    j = lambda t: float(np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t) - 1)  # noqa: E731
    assert j(threshold) == pytest.approx(max(j(t) for t in np.unique(p)), abs=1e-12)
    assert "Youden" in how
    assert parse_threshold_rule("Sensitivity:90%") == {"rule": "sensitivity", "target_sensitivity": 0.9}
    assert threshold_rule_name(" youden ") == "youden" and threshold_rule_name("sensitivity:0.900") == "sensitivity:0.9"
    for bad in ("sensitivity:1.5", "sensitivity:", "f1", "sensitivity:abc"):
        with pytest.raises(InputError, match="threshold rule"):
            parse_threshold_rule(bad)
    assert choose_threshold([1, 1], [0.2, 0.9], "sensitivity:0.9")[0] == 0.5  # one class: no rule applies
