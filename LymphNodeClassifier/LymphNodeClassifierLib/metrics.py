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
    members = None
    group_array = None
    if groups is not None:
        group_array = np.asarray(groups)
        if group_array.shape != y.shape:
            raise InputError(f"There are {group_array.size} group ids for {y.size} nodes; pass one patient id per node.")
        _, inverse = np.unique(group_array, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)] if y.size else []
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
