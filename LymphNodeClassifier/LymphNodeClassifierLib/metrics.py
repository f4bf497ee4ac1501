"""Binary classification metrics with bootstrap confidence intervals.

A node is predicted metastatic when ``probability >= threshold`` (the rule of ``pipeline.py``).

``binary_metrics`` returns plain JSON-ready numbers: AUC (scikit-learn ``roc_auc_score``),
accuracy, sensitivity (recall of class 1), specificity (recall of class 0), PPV (precision of
class 1), NPV (precision of class 0), counts and the confusion matrix ``[[tn, fp], [fn, tp]]``
(scikit-learn's layout: rows = truth, columns = prediction, class 0 first).

Degenerate inputs never crash: a metric whose denominator is empty (AUC with one class only,
sensitivity without metastatic nodes, PPV without positive predictions, ...) is ``nan`` and
``undefined[metric]`` says why. Malformed inputs (lengths differ, labels other than 0/1,
probabilities outside [0, 1]) raise ``InputError``.

``bootstrap_ci`` gives percentile bootstrap intervals. Resampling is node-level (nodes drawn
with replacement) unless ``groups`` (e.g. patient ids) is given; then it is patient-level, a
cluster bootstrap: whole patients are drawn with replacement and all their nodes come along,
which respects the correlation between nodes of one patient and gives wider, honest intervals.
A resample in which a metric is undefined (e.g. only benign nodes drawn, for AUC) is left out of
that metric's interval; a metric undefined on the full data gets ``(nan, nan)``.

Calibration (is a predicted 0.8 right 80 % of the time?): ``brier_score`` (mean squared error of
the probability against the 0/1 label), ``reliability_curve`` (per equal-width probability bin:
mean predicted probability, fraction positive, node count; scikit-learn ``calibration_curve``'s
bins, right-closed, 0 in the first) and ``expected_calibration_error`` (the node-weighted mean of
|fraction positive - mean predicted| over those bins); ``calibration`` gathers them, with
patient-level bootstrap CIs, for metrics.json, and ``plot_reliability`` draws the diagram.

Decision threshold rules (``choose_threshold``, chosen on validation data, never on a test
split): ``youden`` (sensitivity + specificity - 1 maximal) or ``sensitivity:T`` (the highest
threshold whose sensitivity is at least T, i.e. the best specificity at that sensitivity).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from .errors import InputError

METRIC_NAMES = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv")


def _as_inputs(y_true: Any, probability: Any, threshold: float) -> tuple[np.ndarray, np.ndarray, float]:
    y = np.asarray(y_true)
    p = np.asarray(probability, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise InputError(f"Labels and probabilities must be 1-D lists (got shapes {y.shape} and {p.shape}); pass one value per node.")
    if y.shape != p.shape:
        raise InputError(f"There are {y.size} labels but {p.size} probabilities; pass one probability per labelled node.")
    if y.size:
        if y.dtype == bool:
            y = y.astype(np.int64)
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            raise InputError("Labels must be 0 (benign) or 1 (metastatic); remove unlabelled nodes before computing metrics.")
        if not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0:
            raise InputError("Probabilities must be finite numbers in [0, 1]; pass the model's probabilities, not its logits.")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"The decision threshold {threshold!r} is not a number; use a value in [0, 1], e.g. 0.5.") from None
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"The decision threshold {threshold:g} is outside [0, 1]; use a probability, e.g. 0.5.")
    return y.astype(np.int64), p, threshold


def _ratio(numerator: int, denominator: int) -> float:
    return float(numerator) / float(denominator) if denominator else math.nan


def binary_metrics(y_true: Sequence[int], probability: Sequence[float], threshold: float = 0.5) -> dict:
    """Metrics of probabilities against 0/1 labels at ``threshold`` (positive: ``p >= threshold``).

    Returns ``{"n", "n_positive", "n_negative", "threshold", "auc", "accuracy", "sensitivity",
    "specificity", "ppv", "npv", "tn", "fp", "fn", "tp", "confusion_matrix", "undefined"}``;
    ``undefined`` maps each ``nan`` metric to the reason.
    """
    y, p, threshold = _as_inputs(y_true, probability, threshold)
    predicted = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel()) if y.size else (0, 0, 0, 0)
    n_positive, n_negative = tp + fn, tn + fp
    undefined: dict[str, str] = {}
    if y.size == 0:
        undefined.update({name: "no nodes" for name in METRIC_NAMES})
    if n_positive == 0 or n_negative == 0:
        only = "benign" if n_positive == 0 else "metastatic"
        if y.size:
            undefined["auc"] = f"only one class ({only}) among the {y.size} nodes"
        auc = math.nan
    else:
        auc = float(roc_auc_score(y, p))
    if y.size:
        if n_positive == 0:
            undefined["sensitivity"] = "no metastatic nodes"
        if n_negative == 0:
            undefined["specificity"] = "no benign nodes"
        if tp + fp == 0:
            undefined["ppv"] = "no node predicted metastatic"
        if tn + fn == 0:
            undefined["npv"] = "no node predicted benign"
    return {
        "n": int(y.size),
        "n_positive": n_positive,
        "n_negative": n_negative,
        "threshold": threshold,
        "auc": auc,
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, n_positive),
        "specificity": _ratio(tn, n_negative),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "undefined": undefined,
    }


def roc_points(y_true: Sequence[int], score: Sequence[float]) -> dict | None:
    """The ROC curve of `score` (higher = metastatic) as {"fpr": [...], "tpr": [...]} (scikit-learn's
    `roc_curve`, collinear points dropped), or None when the labels hold one class only."""
    y = np.asarray(y_true, dtype=np.int64)
    if y.size == 0 or y.min() == y.max():
        return None
    fpr, tpr, _ = roc_curve(y, np.asarray(score, dtype=np.float64), drop_intermediate=True)
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (average ranks for ties): the value of scikit-learn's
    ``roc_auc_score`` (tests check equality) without its per-call input validation, which would
    dominate a 1000-resample bootstrap. Both classes must be present."""
    positives = y == 1
    n_pos = int(np.count_nonzero(positives))
    n_neg = y.size - n_pos
    ranks = rankdata(p)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def group_members(groups: Any, n: int | None = None) -> list[np.ndarray]:
    """The node indices of each group (patient), for cluster resampling; `n` checks the length."""
    groups = np.asarray(groups)
    if n is not None and groups.shape != (n,):
        raise InputError(f"There are {groups.size} group ids for {n} nodes; pass one patient id per node.")
    if groups.size == 0:
        return []
    _, inverse = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]


def _resample_indices(rng: np.random.Generator, n: int, groups: np.ndarray | None, members: list[np.ndarray] | None) -> np.ndarray:
    if groups is None:
        return rng.integers(0, n, size=n)
    drawn = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[g] for g in drawn])


def bootstrap_ci(
    y_true: Sequence[int],
    probability: Sequence[float],
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence | None = None,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(low, high)`` intervals for each metric of ``METRIC_NAMES``.

    Node-level resampling by default; patient-level (cluster) resampling when ``groups`` gives
    each node's patient id. Reproducible for a given ``seed`` (numpy ``default_rng``).
    """
    y, p, threshold = _as_inputs(y_true, probability, threshold)
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"The number of bootstrap resamples must be a positive integer, got {n_boot!r}; use e.g. 1000.")
    if not 0.0 < float(confidence) < 1.0:
        raise InputError(f"The confidence level {confidence!r} must lie between 0 and 1; use e.g. 0.95.")
    group_array = None if groups is None else np.asarray(groups)
    members = None if groups is None else group_members(group_array, y.size)
    point = binary_metrics(y, p, threshold)
    nan_pair = (math.nan, math.nan)
    if y.size == 0:
        return {name: nan_pair for name in METRIC_NAMES}

    rng = np.random.default_rng(seed)
    predicted = p >= threshold
    values = {name: np.full(int(n_boot), np.nan) for name in METRIC_NAMES}
    for b in range(int(n_boot)):
        idx = _resample_indices(rng, y.size, group_array, members)
        yb, pb, predb = y[idx], p[idx], predicted[idx]
        positives = yb == 1
        tp = int(np.count_nonzero(predb & positives))
        fn = int(np.count_nonzero(~predb & positives))
        fp = int(np.count_nonzero(predb & ~positives))
        tn = idx.size - tp - fn - fp
        values["accuracy"][b] = _ratio(tp + tn, idx.size)
        values["sensitivity"][b] = _ratio(tp, tp + fn)
        values["specificity"][b] = _ratio(tn, tn + fp)
        values["ppv"][b] = _ratio(tp, tp + fp)
        values["npv"][b] = _ratio(tn, tn + fn)
        if 0 < tp + fn < idx.size:
            values["auc"][b] = rank_auc(yb, pb)
    alpha = (1.0 - float(confidence)) / 2.0
    out: dict[str, tuple[float, float]] = {}
    for name in METRIC_NAMES:
        finite = values[name][np.isfinite(values[name])]
        if not math.isfinite(point[name]) or finite.size == 0:
            out[name] = nan_pair
        else:
            low, high = np.quantile(finite, [alpha, 1.0 - alpha])
            out[name] = (float(low), float(high))
    return out


def json_safe(value: Any) -> Any:
    """A copy of ``value`` with nan/inf floats as None and numpy scalars / tuples as JSON types."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


# --------------------------------------------------------------------------------------------
# calibration


def brier_score(y_true: Sequence[int], probability: Sequence[float]) -> float:
    """Mean of (probability - label)^2 (0 is perfect; always 0.5 scores 0.25); nan without nodes."""
    y, p, _ = _as_inputs(y_true, probability, 0.5)
    return float(np.mean((p - y) ** 2)) if y.size else math.nan


def _check_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"The number of calibration bins must be a positive whole number, got {n_bins!r}; use e.g. 10.")
    return int(n_bins)


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    # scikit-learn calibration_curve(strategy="uniform"): bins (k/n, (k+1)/n], with 0 in the first
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p)


def _bin_sums(y: np.ndarray, p: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = _bin_index(p, n_bins)
    return (np.bincount(index, weights=p, minlength=n_bins), np.bincount(index, weights=y, minlength=n_bins),
            np.bincount(index, minlength=n_bins))


def reliability_curve(y_true: Sequence[int], probability: Sequence[float], n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean_predicted, fraction_positive, counts), one entry per equal-width bin of [0, 1] (nan
    where a bin is empty). Non-empty bins equal scikit-learn's ``calibration_curve``."""
    y, p, _ = _as_inputs(y_true, probability, 0.5)
    n_bins = _check_bins(n_bins)
    sum_p, sum_y, counts = _bin_sums(y, p, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sum_p / counts, sum_y / counts, counts.astype(np.int64)


def _ece_from_sums(sum_p: np.ndarray, sum_y: np.ndarray, n: int) -> float:
    # sum over bins of (n_b / n) * |sum_y_b / n_b - sum_p_b / n_b| = sum |sum_y_b - sum_p_b| / n
    return float(np.abs(sum_y - sum_p).sum() / n)


def expected_calibration_error(y_true: Sequence[int], probability: Sequence[float], n_bins: int = 10) -> float:
    """sum over the equal-width bins b of (n_b / N) * |fraction positive_b - mean predicted_b|; nan without nodes."""
    y, p, _ = _as_inputs(y_true, probability, 0.5)
    n_bins = _check_bins(n_bins)
    if y.size == 0:
        return math.nan
    sum_p, sum_y, _ = _bin_sums(y, p, n_bins)
    return _ece_from_sums(sum_p, sum_y, y.size)


def calibration(
    y_true: Sequence[int], probability: Sequence[float], n_bins: int = 10, n_boot: int = 0, seed: int = 0,
    groups: Sequence | None = None, confidence: float = 0.95,
) -> dict:
    """The JSON-safe calibration block: brier, ece (with percentile bootstrap ``ci95`` when
    ``n_boot`` > 0; patient-level when ``groups`` is given) and the reliability curve."""
    y, p, _ = _as_inputs(y_true, probability, 0.5)
    n_bins = _check_bins(n_bins)
    mean_predicted, fraction_positive, counts = reliability_curve(y, p, n_bins)
    out: dict[str, Any] = {
        "brier": brier_score(y, p), "ece": expected_calibration_error(y, p, n_bins), "n_bins": n_bins,
        "binning": "equal-width bins of [0, 1], right-closed (scikit-learn calibration_curve, strategy='uniform'); ece weighted by node count",
        "reliability": {"mean_predicted": mean_predicted, "fraction_positive": fraction_positive, "counts": counts},
    }
    if n_boot and y.size:
        members = None if groups is None else group_members(groups, y.size)
        rng = np.random.default_rng(seed)
        brier, ece = np.empty(int(n_boot)), np.empty(int(n_boot))
        for b in range(int(n_boot)):
            idx = _resample_indices(rng, y.size, None if members is None else groups, members)
            sum_p, sum_y, _ = _bin_sums(y[idx], p[idx], n_bins)
            brier[b] = np.mean((p[idx] - y[idx]) ** 2)
            ece[b] = _ece_from_sums(sum_p, sum_y, idx.size)
        alpha = (1.0 - float(confidence)) / 2.0
        out["ci95"] = {name: [float(v) for v in np.quantile(values, [alpha, 1.0 - alpha])] for name, values in (("brier", brier), ("ece", ece))}
        out["bootstrap"] = {"resamples": int(n_boot), "seed": int(seed), "resampling": "node" if groups is None else "patient (cluster bootstrap)"}
    return json_safe(out)


def plot_reliability(curves: Sequence[tuple[str, Any, Any]], path: Any, title: str = "", n_bins: int = 10) -> None:
    """reliability.png (atomically): fraction positive against mean predicted probability per bin
    for each ``(name, y, probability)``, the diagonal of perfect calibration, and the bins' node
    counts below; Brier and ECE in the legend."""
    from matplotlib.figure import Figure  # no pyplot: no global backend change inside Slicer

    from .fileio import atomic_path

    figure = Figure(figsize=(6.4, 7.2), dpi=100, layout="constrained")
    curve_axis, count_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    curve_axis.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    width = 1.0 / n_bins / max(1, len(curves))
    for k, (name, y, p) in enumerate(curves):
        mean_predicted, fraction_positive, counts = reliability_curve(y, p, n_bins)
        shown = counts > 0
        label = f"{name}: Brier {brier_score(y, p):.3f}, ECE {expected_calibration_error(y, p, n_bins):.3f}"
        line, = curve_axis.plot(mean_predicted[shown], fraction_positive[shown], "o-", lw=2, label=label)
        left = np.linspace(0.0, 1.0, n_bins + 1)[:-1] + k * width
        count_axis.bar(left, counts, width=width, align="edge", color=line.get_color())
    curve_axis.set_xlim(0, 1)
    curve_axis.set_ylim(0, 1)
    curve_axis.set_ylabel("fraction positive (observed)")
    curve_axis.legend(loc="upper left", fontsize=9)
    curve_axis.set_title(title or f"Reliability diagram, {n_bins} equal-width bins", fontsize=10)
    count_axis.set_xlabel("mean predicted probability")
    count_axis.set_ylabel("nodes per bin")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


# --------------------------------------------------------------------------------------------
# decision threshold rules


def youden_threshold(y: Sequence[int], probability: Sequence[float]) -> tuple[float, str]:
    """The threshold maximising sensitivity + specificity - 1 on (y, probability), and how it was found."""
    y = np.asarray(y)
    if y.size == 0 or y.sum() in (0, y.size):
        return 0.5, "0.5 (the validation set has only one class, so Youden's J is undefined)"
    fpr, tpr, thresholds = roc_curve(y, probability)
    j = tpr - fpr
    best = 1 + int(np.argmax(j[1:]))  # thresholds[0] is +inf (nothing positive)
    return float(min(1.0, max(0.0, thresholds[best]))), "Youden's J maximal on the validation set"


def sensitivity_threshold(y: Sequence[int], probability: Sequence[float], target: float) -> tuple[float, str]:
    """The highest threshold whose sensitivity on (y, probability) is at least `target` (so the
    best specificity that keeps that sensitivity), and how it was found."""
    y = np.asarray(y)
    if y.size == 0 or y.sum() in (0, y.size):
        return 0.5, f"0.5 (the validation set has only one class, so a {target:.0%} sensitivity threshold is undefined)"
    fpr, tpr, thresholds = roc_curve(y, probability, drop_intermediate=False)
    first = 1 + int(np.argmax(tpr[1:] >= float(target) - 1e-12))  # tpr rises as the threshold falls
    return float(min(1.0, max(0.0, thresholds[first]))), f"highest threshold with sensitivity >= {target:.0%} on the validation set"


def parse_threshold_rule(rule: Any) -> dict:
    """'youden' -> {"rule": "youden"}; 'sensitivity:0.9' -> {"rule": "sensitivity", "target_sensitivity": 0.9}."""
    text = str(rule).strip().lower().replace(" ", "")
    if text == "youden":
        return {"rule": "youden"}
    name, _, value = text.partition(":")
    if name == "sensitivity":
        try:
            target = float(value.rstrip("%")) / (100.0 if value.endswith("%") else 1.0)
        except ValueError:
            target = math.nan
        if 0.0 < target <= 1.0:
            return {"rule": "sensitivity", "target_sensitivity": target}
    raise InputError(f"Unknown decision threshold rule {rule!r}; use 'youden' or 'sensitivity:0.9' (a target sensitivity in (0, 1]).")


def threshold_rule_name(rule: Any) -> str:
    """The canonical text of a rule: 'youden' or 'sensitivity:0.9'."""
    parsed = parse_threshold_rule(rule)
    return "youden" if parsed["rule"] == "youden" else f"sensitivity:{parsed['target_sensitivity']:g}"


def choose_threshold(y: Sequence[int], probability: Sequence[float], rule: Any = "youden") -> tuple[float, str]:
    """(threshold, how it was found) by `rule` ('youden' or 'sensitivity:T') on validation data."""
    parsed = parse_threshold_rule(rule)
    if parsed["rule"] == "youden":
        return youden_threshold(y, probability)
    return sensitivity_threshold(y, probability, parsed["target_sensitivity"])
