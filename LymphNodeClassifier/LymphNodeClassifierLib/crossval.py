"""Patient-grouped k-fold cross-validation: one out-of-fold probability for every node.

`crossval --dataset D --out DIR [--folds 5] [--seed S] [training options] [--export-model M.pt]`

- Folds: scikit-learn's `StratifiedGroupKFold` on the patient ids (shuffled, seeded): every
  patient's nodes lie in exactly one fold's test part, and the class balance of the folds is
  kept roughly equal (`assign_folds`).
- Per fold k: the other folds are split once more by patient (`training._one_fold`, about
  `inner_val_fraction` of them) into a training part and an inner validation part, which only
  chooses the epoch (early stopping) and the decision threshold (Youden's J); `training.train`
  runs on that split and the fold's model predicts fold k, which it has never seen: the
  out-of-fold (OOF) probability of each of its nodes, and the prediction at that fold's threshold.
- Size rules on the same folds and nodes: the short and the long axis of the mask
  (`nodes.extract_nodes`, the numbers `PatchSet` carries) as scores (their AUC needs no fitting)
  and, for the threshold metrics, a cut-off in mm chosen by Youden's J on the fold's training
  part (training + inner validation) and applied to fold k.
- Metrics (`cv_metrics`): AUC of the pooled OOF probabilities; accuracy, sensitivity,
  specificity, PPV, NPV of the pooled OOF predictions (each made at its own fold's threshold);
  percentile 95 % CIs by patient-level (cluster) bootstrap (`metrics.bootstrap_ci`, the same
  resamples for every score), the paired bootstrap CI of the AUC difference model - rule, and
  the per-fold AUCs.

Outputs (each written atomically; metrics.json last): `DIR/predictions.csv` (case_id,
patient_id, label_value, fold, probability, threshold, prediction, label, short_axis_mm,
long_axis_mm; numbers at full precision, so every metric can be recomputed from it exactly),
`DIR/roc.png` (pooled OOF ROC curves of the model and both size rules, per-fold AUCs),
`DIR/reliability.png` (reliability diagram of the pooled OOF probabilities) and `DIR/metrics.json`
(with `calibration`: Brier score, expected calibration error, the reliability curve, patient-level
bootstrap CIs; and `threshold_rule`, how each fold's threshold was chosen: `--threshold-rule`).

`--export-model M.pt` then trains the same configuration on ALL nodes (inner validation split for
early stopping and the threshold only) and writes it with its card; the card's
`metrics.cross_validation` holds the cross-validated metrics (the whole-set model has no test
set of its own) and `training.command` the exact command line.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from .errors import InputError, OneLineArgumentParser
from .fileio import atomic_path, atomic_write_json, atomic_write_text, check_writable_file, check_writable_folder, csv_text, ensure_folder
from .metrics import METRIC_NAMES, binary_metrics, bootstrap_ci, calibration, group_members, json_safe, parse_threshold_rule, plot_reliability, rank_auc, roc_points
from .fusion import FUSION_MODES, attach_features
from .patchset import PatchSet
from .patches import VIEW_MODES
from .training import ARCHITECTURE_NAMES, TrainingConfig, _one_fold, _threads, check_exportable, choose_threshold, train
from .inference import eager_logits
from .model import TTA_MODES, check_tta_fits_training
from .training import assign_folds as training_assign_folds
from .validate import InputPolicy, add_input_options

PREDICTION_COLUMNS = (
    "case_id", "patient_id", "label_value", "fold", "probability", "threshold", "prediction", "label",
    "short_axis_mm", "long_axis_mm",
)
OUTPUT_FILES = ("metrics.json", "predictions.csv", "roc.png", "reliability.png")
SIZE_SCORES = ("short_axis_mm", "long_axis_mm")


# --------------------------------------------------------------------------------------------
# folds


def assign_folds(patient_ids: Sequence, y: Sequence[int], folds: int = 5, seed: int = 0) -> np.ndarray:
    """`training.assign_folds` (every patient in one fold) for labelled nodes of both classes only."""
    labels = np.asarray(y).astype(np.int64)
    if labels.size == 0 or labels.sum() in (0, labels.size):
        raise InputError("Cross-validation needs labelled nodes of both classes; label nodes of both classes first.")
    return training_assign_folds(patient_ids, labels, folds, seed)


# --------------------------------------------------------------------------------------------
# metrics


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if y.size and 0 < int(y.sum()) < y.size else math.nan


def size_rule_predictions(y: np.ndarray, score: np.ndarray, fold_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, cut-off per node): per fold, the Youden cut-off (mm) of `score` on the other folds."""
    prediction = np.zeros(y.size, dtype=np.int64)
    cutoff = np.full(y.size, np.nan)
    for k in np.unique(fold_of):
        test, rest = fold_of == k, fold_of != k
        yr, sr = y[rest], score[rest]
        if yr.size and 0 < yr.sum() < yr.size:
            fpr, tpr, thresholds = roc_curve(yr, sr)
            best = 1 + int(np.argmax((tpr - fpr)[1:]))
            value = float(thresholds[best])
        else:
            value = float(np.median(sr)) if sr.size else 0.0
        cutoff[test] = value
        prediction[test] = (score[test] >= value).astype(np.int64)
    return prediction, cutoff


def paired_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                          confidence: float = 0.95) -> dict:
    """AUC(a) - AUC(b) on the same nodes with its patient-level paired bootstrap CI and the share
    of resamples in which a does not beat b (a one-sided bootstrap p-value)."""
    point = _auc(y, a) - _auc(y, b)
    members = group_members(groups)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(int(n_boot)):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])
        yb = y[idx]
        if 0 < yb.sum() < yb.size:
            diffs.append(rank_auc(yb, a[idx]) - rank_auc(yb, b[idx]))
    diffs = np.asarray(diffs)
    alpha = (1.0 - confidence) / 2.0
    ci = [float(v) for v in np.quantile(diffs, [alpha, 1.0 - alpha])] if diffs.size else None
    return {"difference": point, "ci95": ci, "p_not_better": float(np.mean(diffs <= 0)) if diffs.size else None, "resamples": int(diffs.size)}


def _block(y: np.ndarray, score: np.ndarray, prediction: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUC of `score`, threshold metrics of the 0/1 `prediction`, patient-level bootstrap CIs."""
    out = binary_metrics(y, prediction.astype(np.float64), 0.5)  # undefined["auc"] depends on y only
    out.pop("threshold")
    out["auc"] = _auc(y, score)
    if n_boot:
        scaled = (score - score.min()) / ((score.max() - score.min()) or 1.0)  # ranks (AUC) unchanged, in [0, 1]
        auc_ci = bootstrap_ci(y, scaled, 0.5, n_boot=n_boot, seed=seed, groups=groups)["auc"]
        rate_ci = bootstrap_ci(y, prediction.astype(np.float64), 0.5, n_boot=n_boot, seed=seed, groups=groups)
        rate_ci["auc"] = auc_ci
        out["ci95"] = {name: (list(pair) if all(math.isfinite(v) for v in pair) else None) for name, pair in rate_ci.items()}
    else:
        out["ci95"] = None
    return out


def cv_metrics(
    y: np.ndarray, probability: np.ndarray, prediction: np.ndarray, fold_of: np.ndarray, patient_ids: np.ndarray,
    short_axis_mm: np.ndarray, long_axis_mm: np.ndarray, n_boot: int = 1000, seed: int = 0, threshold_rule: str = "youden",
) -> dict:
    """The metrics.json content (JSON-safe) of out-of-fold predictions (see the module docstring)."""
    y = np.asarray(y, dtype=np.int64)
    probability = np.asarray(probability, dtype=np.float64)
    groups = np.asarray(patient_ids).astype(str)
    folds = sorted(int(k) for k in np.unique(fold_of))
    out = _block(y, probability, np.asarray(prediction), groups, n_boot, seed)
    out["roc"] = roc_points(y, probability)
    rule = parse_threshold_rule(threshold_rule)
    chosen_by = "Youden's J" if rule["rule"] == "youden" else f"the highest threshold with sensitivity >= {rule['target_sensitivity']:.0%}"
    out["prediction_rule"] = f"probability >= the fold's threshold ({chosen_by} on the fold's inner validation part)"
    out["threshold_rule"] = str(threshold_rule)
    # pooled OOF probabilities of k fold models: the calibration a user of any one of them would see
    out["calibration"] = calibration(y, probability, n_boot=n_boot, seed=seed, groups=groups)
    rules = {}
    for name, score in (("short_axis_mm", short_axis_mm), ("long_axis_mm", long_axis_mm)):
        score = np.asarray(score, dtype=np.float64)
        rule_prediction, cutoff = size_rule_predictions(y, score, fold_of)
        block = _block(y, score, rule_prediction, groups, n_boot, seed)
        block["score"] = name
        block["roc"] = roc_points(y, score)
        block["rule"] = f"malignant/metastatic when {name} >= the fold's cut-off (Youden's J on the other folds)"
        block["cutoff_mm_per_fold"] = [float(cutoff[fold_of == k][0]) for k in folds]
        block["per_fold_auc"] = [_auc(y[fold_of == k], score[fold_of == k]) for k in folds]
        if n_boot:
            block["model_minus_rule_auc"] = paired_auc_difference(y, probability, score, groups, n_boot, seed)
        rules[name] = block
    out["size_rules"] = rules
    best = max(SIZE_SCORES, key=lambda name: -1.0 if rules[name]["auc"] is None or not math.isfinite(rules[name]["auc"]) else rules[name]["auc"])
    out["best_size_rule"] = best
    out["per_fold_auc"] = [_auc(y[fold_of == k], probability[fold_of == k]) for k in folds]
    out["per_fold_nodes"] = [int(np.count_nonzero(fold_of == k)) for k in folds]
    out["folds"] = len(folds)
    out["patients"] = int(len(set(groups.tolist())))
    out["bootstrap"] = {"resamples": int(n_boot), "seed": int(seed), "confidence": 0.95, "resampling": "patient (cluster bootstrap)", "method": "percentile"}
    return json_safe(out)


# --------------------------------------------------------------------------------------------
# cross-validation


@dataclass
class CrossValResult:
    """Out-of-fold probabilities (row i = node i of `patchset`) and what was measured."""

    patchset: PatchSet
    config: TrainingConfig
    fold: np.ndarray  # int64 (N,)
    probability: np.ndarray  # float64 (N,), from the model of the node's fold
    threshold: np.ndarray  # float64 (N,), the node's fold's decision threshold
    metrics: dict
    folds: list[dict] = field(default_factory=list)  # per fold: sizes, best epoch, threshold, AUC, seconds
    seconds: float = 0.0
    member_logits: dict = field(default_factory=dict)  # --ensemble / --tta: TTA mode -> (members, N) OOF logits
    image_probability: np.ndarray | None = None  # --fusion: the image branch's own OOF probabilities (float64 (N,))

    @property
    def prediction(self) -> np.ndarray:
        return (self.probability >= self.threshold).astype(np.int64)

    def predictions(self) -> list[dict]:
        ps = self.patchset
        return [
            {
                "case_id": str(ps.case_ids[i]), "patient_id": str(ps.patient_ids[i]), "label_value": int(ps.label_values[i]),
                "fold": int(self.fold[i]), "probability": float(self.probability[i]), "threshold": float(self.threshold[i]),
                "prediction": int(self.prediction[i]), "label": int(ps.y[i]),
                "short_axis_mm": float(ps.short_axis_mm[i]), "long_axis_mm": float(ps.long_axis_mm[i]),
                **({} if self.image_probability is None else {"image_probability": float(self.image_probability[i])}),
            }
            for i in range(len(ps))
        ]


def check_fusion_alone(config: TrainingConfig, combines_members: bool) -> None:
    """A fused model is neither an ensemble member nor run with TTA: the combined fold predictions
    call the image branch only, so they would be reported as fused without the features."""
    if config.fusion != "none" and combines_members:
        raise InputError(f"--fusion {config.fusion} does not combine with --ensemble / --tta / --first-member yet; use one of them.")


def cross_validate(
    patchset: PatchSet,
    config: TrainingConfig,
    folds: int = 5,
    seed: int | None = None,
    inner_val_fraction: float = 0.2,
    n_boot: int = 1000,
    on_event: Callable[[dict], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    ensemble: int = 1,
    tta: str = "none",
    first_member: int = 0,
) -> CrossValResult:
    """k-fold patient-grouped cross-validation of `config` on `patchset` (module docstring).

    `seed` (default: the config's) seeds the folds; fold k's training uses seed + k. Events of
    each fold's `train` come to `on_event` with a `"fold"` key added (and `"member"` with
    `ensemble` > 1).

    `ensemble` K > 1: every fold trains K members on the same split (member m: seed + k +
    ENSEMBLE_SEED_STRIDE m, member 0 the single model), and the fold's held-out part gets the
    mean of their logits: an honest OOF estimate of a K-seed ensemble. `tta`: the held-out and
    the inner validation parts are predicted with that test-time augmentation (model.TTA_MODES;
    early stopping still reads the plain validation loss). The threshold is then chosen on the
    inner validation part's combined probabilities. With either, `metrics["ensemble_tta"]` also
    scores every member count (1, K) with every TTA mode from the same runs, and
    `member_logits` holds each member's OOF logits per TTA mode. `first_member` M trains members
    M..M+K-1 instead (more seeds for an earlier run, on the same folds: `bench/ensemble_tta.py`
    pools the runs' member_logits.csv).
    """
    started = time.perf_counter()
    seed = config.seed if seed is None else int(seed)
    ensemble = check_ensemble_size(ensemble)
    tta = check_tta_fits_training(tta, config.flips, config.rotation_degrees)
    first_member = check_first_member(first_member)
    combine = ensemble > 1 or tta != "none" or first_member > 0
    check_fusion_alone(config, combine)
    member_logits = {mode: np.full((ensemble, patchset.y.size), np.nan, dtype=np.float32) for mode in TTA_MODES} if combine else {}
    if not 0.0 < float(inner_val_fraction) < 1.0:
        raise InputError(f"The inner validation fraction must lie between 0 and 1, got {inner_val_fraction!r}; use e.g. 0.2.")
    y = np.asarray(patchset.y, dtype=np.int64)
    groups = np.asarray(patchset.patient_ids).astype(str)
    fold_of = assign_folds(groups, y, folds, seed)
    probability = np.full(y.size, np.nan)
    image_probability = np.full(y.size, np.nan) if config.fusion != "none" else None
    threshold = np.full(y.size, np.nan)
    fold_info = []
    for k in range(int(folds)):
        test = np.flatnonzero(fold_of == k)
        rest = np.flatnonzero(fold_of != k)
        validation = _one_fold(rest, y, groups, float(inner_val_fraction), seed + 1000 + k)
        train_idx = np.setdiff1d(rest, validation)
        assert not set(groups[test]) & set(groups[rest]), "a patient in two folds"
        members = []
        for m in range(ensemble):
            fold_config = replace(config, seed=member_seed(config.seed + k, first_member + m))
            extra = {"fold": k} if ensemble == 1 else {"fold": k, "member": m}
            forward = None if on_event is None else (lambda event, extra=extra: on_event({**event, **extra}))
            members.append(train(patchset, fold_config, on_event=forward, is_cancelled=is_cancelled, splits=(train_idx, validation, test)))
        result = members[0]
        if image_probability is not None:
            image_probability[test] = result.probabilities["test_image"]
        if not combine:
            probability[test] = result.probabilities["test"]
            threshold[test] = result.decision_threshold
            fold_threshold, fold_validation_auc = result.decision_threshold, result.metrics["validation"]["auc"]
        else:
            validation_logits = np.zeros((ensemble, validation.size), dtype=np.float32)
            parts = np.concatenate([validation, test])
            with _threads(config.num_threads):
                for mode in TTA_MODES:
                    for m, member in enumerate(members):
                        logits = eager_logits(member.model, patchset.x[parts], mode)
                        member_logits[mode][m, test] = logits[validation.size:]  # only the held-out part: OOF
                        if mode == tta:
                            validation_logits[m] = logits[:validation.size]
            validation_probability = _sigmoid(validation_logits.astype(np.float64).mean(axis=0))
            probability[test] = _sigmoid(member_logits[tta][:, test].astype(np.float64).mean(axis=0))
            fold_threshold, _ = choose_threshold(y[validation], validation_probability, config.threshold_rule)
            threshold[test] = fold_threshold
            fold_validation_auc = _auc(y[validation], validation_probability)
        info = {
            "fold": k, "train_nodes": int(train_idx.size), "validation_nodes": int(validation.size), "test_nodes": int(test.size),
            "test_patients": int(len(set(groups[test].tolist()))), "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "threshold": fold_threshold, "validation_auc": fold_validation_auc,
            "test_auc": _auc(y[test], probability[test]), "seconds": round(sum(r.seconds for r in members), 1),
        }
        if ensemble > 1:
            info["members"] = [
                {"seed": r.config.seed, "best_epoch": r.best_epoch, "epochs_run": r.epochs_run, "test_auc": _auc(y[test], r.probabilities["test"]),
                 "seconds": round(r.seconds, 1)}
                for r in members
            ]
        fold_info.append(json_safe(info))
    prediction = (probability >= threshold).astype(np.int64)
    metrics = cv_metrics(y, probability, prediction, fold_of, groups, patchset.short_axis_mm, patchset.long_axis_mm, n_boot=n_boot, seed=seed,
                         threshold_rule=config.threshold_rule)
    metrics["fold_details"] = fold_info
    if combine:
        metrics["ensemble_tta"] = ensemble_tta_variants(y, groups, np.asarray(patchset.long_axis_mm, dtype=np.float64), member_logits, ensemble, tta,
                                                        n_boot, seed)
    metrics["inner_val_fraction"] = float(inner_val_fraction)
    metrics["config"] = config.to_dict()
    metrics["dataset"] = patchset.summary()
    return CrossValResult(patchset=patchset, config=config, fold=fold_of, probability=probability, threshold=threshold,
                          metrics=metrics, folds=fold_info, seconds=time.perf_counter() - started, member_logits=member_logits,
                          image_probability=image_probability)


# --------------------------------------------------------------------------------------------
# ensembles and test-time augmentation (--ensemble K, --tta MODE)

ENSEMBLE_SEED_STRIDE = 100  # member m of a run with seed s trains with seed s + 100 m (member 0: the single model's seed)


def member_seed(seed: int, member: int) -> int:
    return int(seed) + ENSEMBLE_SEED_STRIDE * int(member)


def check_ensemble_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= 20:
        raise InputError(f"The ensemble size must be an integer from 1 to 20, got {value!r}; use e.g. 3 (1: a single model).")
    return int(value)


def check_first_member(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 100:
        raise InputError(f"The first ensemble member must be an integer from 0 to 99, got {value!r}; use 0 (a new run) or the member count of the earlier run.")
    return int(value)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def ensemble_tta_variants(y: np.ndarray, groups: np.ndarray, long_axis_mm: np.ndarray, member_logits: dict[str, np.ndarray], ensemble: int,
                          tta: str, n_boot: int, seed: int) -> dict:
    """Every (members, TTA mode) combination scored from the same fold runs: OOF AUC with its
    patient-bootstrap CI, the paired difference to the long axis and to the single model without
    TTA (member 0, the plain run), Brier and ECE. Nothing here is chosen: the run's own choice is
    `members` / `tta`."""
    single = _sigmoid(member_logits["none"][0].astype(np.float64))
    variants = []
    for count in sorted({1, ensemble}):
        for mode, logits in member_logits.items():
            p = _sigmoid(logits[:count].astype(np.float64).mean(axis=0))
            row = {"members": count, "tta": mode, "auc": _auc(y, p)}
            if n_boot:
                row["auc_ci95"] = list(bootstrap_ci(y, p, 0.5, n_boot=n_boot, seed=seed, groups=groups)["auc"])
                row["minus_long_axis"] = paired_auc_difference(y, p, long_axis_mm, groups, n_boot, seed)
                if (count, mode) != (1, "none"):
                    row["minus_single_no_tta"] = paired_auc_difference(y, p, single, groups, n_boot, seed)
            cal = calibration(y, p)
            row["brier"], row["ece"] = cal["brier"], cal["ece"]
            variants.append(row)
    return json_safe({
        "members": ensemble, "tta": tta, "member_seeds": f"fold k, member m: seed + k + {ENSEMBLE_SEED_STRIDE} m",
        "combination": "mean of the members' logits (each averaged over its TTA copies), then the sigmoid",
        "variants": variants,
    })


def member_logits_csv(result: "CrossValResult") -> str:
    """One row per node and member: its OOF logit under every TTA mode (member_logits.csv)."""
    ps = result.patchset
    rows = []
    for m in range(next(iter(result.member_logits.values())).shape[0]):
        for i in range(len(ps)):
            row = {"case_id": str(ps.case_ids[i]), "patient_id": str(ps.patient_ids[i]), "fold": int(result.fold[i]), "member": m, "label": int(ps.y[i])}
            row.update({f"logit_{mode}": float(logits[m, i]) for mode, logits in result.member_logits.items()})
            rows.append(row)
    return csv_text(rows, ("case_id", "patient_id", "fold", "member", "label", *(f"logit_{mode}" for mode in result.member_logits)))


# --------------------------------------------------------------------------------------------
# outputs


def predictions_csv(result: CrossValResult) -> str:
    return csv_text(result.predictions(), PREDICTION_COLUMNS + (() if result.image_probability is None else ("image_probability",)))


def _label(name: str, block: dict) -> str:
    ci = (block.get("ci95") or {}).get("auc")
    auc = "n/a" if block["auc"] is None else f"{block['auc']:.3f}"
    return f"{name}: AUC {auc}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def plot_roc(result: CrossValResult, path: str | os.PathLike, title: str = "") -> None:
    """roc.png: pooled out-of-fold ROC curves (model, short- and long-axis rules) and per-fold AUCs."""
    from matplotlib.figure import Figure

    m = result.metrics
    y = np.asarray(result.patchset.y)
    figure = Figure(figsize=(12, 5.4), dpi=100, layout="constrained")
    roc_axis, fold_axis = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    curves = (
        ("CNN (out-of-fold)", result.probability, m, "#d62728"),
        ("short axis", result.patchset.short_axis_mm, m["size_rules"]["short_axis_mm"], "#1f77b4"),
        ("long axis", result.patchset.long_axis_mm, m["size_rules"]["long_axis_mm"], "#2ca02c"),
    )
    if m["auc"] is not None:
        for name, score, block, colour in curves:
            fpr, tpr, _ = roc_curve(y, score)
            roc_axis.plot(fpr, tpr, color=colour, lw=2, label=_label(name, block))
            if block["sensitivity"] is not None and block["specificity"] is not None:
                roc_axis.plot(1 - block["specificity"], block["sensitivity"], "o", color=colour, ms=7)
    roc_axis.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    roc_axis.legend(loc="lower right", fontsize=9)
    roc_axis.set_xlim(0, 1)
    roc_axis.set_ylim(0, 1.01)
    roc_axis.set_aspect("equal")
    roc_axis.set_xlabel("1 - specificity")
    roc_axis.set_ylabel("sensitivity")
    roc_axis.set_title(f"{m['folds']}-fold OOF ROC, {m['n']} nodes ({m['n_positive']} positive), {m['patients']} patients\n"
                       "dots: operating points at the per-fold thresholds", fontsize=10)
    folds = np.arange(m["folds"])
    for offset, (name, _, block, colour) in zip((-0.25, 0.0, 0.25), curves):
        values = [np.nan if v is None else v for v in block["per_fold_auc"]]
        fold_axis.bar(folds + offset, values, width=0.25, color=colour, label=name)
    fold_axis.set_xticks(folds, [f"fold {k}" for k in folds])
    low = min([v for _, _, b, _ in curves for v in b["per_fold_auc"] if v is not None] + [1.0])
    fold_axis.set_ylim(max(0.0, low - 0.1), 1.0)
    fold_axis.set_ylabel("AUC on the held-out fold")
    fold_axis.legend(fontsize=9, loc="lower right")
    fold_axis.set_title("per-fold AUC", fontsize=10)
    if title:
        figure.suptitle(title)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


def write_crossval(result: CrossValResult, out_dir: str | os.PathLike, title: str = "") -> dict[str, Path]:
    """predictions.csv, roc.png, reliability.png, then metrics.json (each atomically) into `out_dir`."""
    out_dir = ensure_folder(out_dir, f"--out {out_dir} is a file; give a folder for the cross-validation outputs.")
    paths = {name: out_dir / name for name in OUTPUT_FILES}
    atomic_write_text(paths["predictions.csv"], predictions_csv(result))
    plot_roc(result, paths["roc.png"], title)
    plot_reliability([("CNN (out-of-fold)", result.patchset.y, result.probability)], paths["reliability.png"],
                     f"{title + chr(10) if title else ''}reliability of the pooled out-of-fold probabilities")
    if result.member_logits:
        atomic_write_text(out_dir / "member_logits.csv", member_logits_csv(result))
    atomic_write_json(paths["metrics.json"], {**result.metrics, "seconds": round(result.seconds, 1)})
    return paths


def card_summary(metrics: dict) -> dict:
    """The compact cross-validation block for a model card (metrics.cross_validation)."""
    keys = ("n", "n_positive", "n_negative", "patients", "folds", *METRIC_NAMES, "tn", "fp", "fn", "tp", "ci95",
            "per_fold_auc", "per_fold_nodes", "prediction_rule", "threshold_rule", "calibration", "bootstrap", "inner_val_fraction", "best_size_rule")
    out = {key: metrics[key] for key in keys if key in metrics}
    out["method"] = f"{metrics['folds']}-fold StratifiedGroupKFold by patient; out-of-fold predictions pooled"
    out["size_rules"] = {
        name: {key: block.get(key) for key in ("auc", "accuracy", "sensitivity", "specificity", "ci95", "per_fold_auc", "model_minus_rule_auc")}
        for name, block in metrics["size_rules"].items()
    }
    return json_safe(out)


def train_final_model(patchset: PatchSet, config: TrainingConfig, inner_val_fraction: float = 0.2, on_event=None, member: int = 0):
    """`training.train` on every node of `patchset`: a patient-level inner validation part (early
    stopping and threshold only), no test part. `member` m of an ensemble trains with seed +
    ENSEMBLE_SEED_STRIDE m on the same split."""
    y = np.asarray(patchset.y, dtype=np.int64)
    groups = np.asarray(patchset.patient_ids).astype(str)
    everything = np.arange(y.size)
    validation = _one_fold(everything, y, groups, float(inner_val_fraction), config.seed + 1)
    train_idx = np.setdiff1d(everything, validation)
    member_config = replace(config, seed=member_seed(config.seed, member))
    return train(patchset, member_config, on_event=on_event, splits=(train_idx, validation, np.zeros(0, dtype=np.int64)))


def export_final_model(result, patchset: PatchSet, config: TrainingConfig, path: str | os.PathLike, command: str,
                       cv_metrics_block: dict, name: str, description: str, label_definition: str | None = None,
                       model_version: str = "1.0.0", members: Sequence = (), tta: str = "none") -> Path:
    """Write the whole-set model with its card: cross-validated metrics under metrics.cross_validation.

    `members` (the results of `train_final_model` for members 0..K-1, `result` first) make the
    archive a `model.Ensemble`; `tta` is written as the card's `preprocessing.tta`. Either way the
    threshold is chosen again on the inner validation part, predicted the way the file predicts."""
    from .model import Ensemble, export_torchscript, validate_card
    from .training import build_card, evaluate

    card = build_card(result, patchset.summary(), config, command, None, model_version=model_version, name=name, description=description)
    card["metrics"]["cross_validation"] = card_summary(cv_metrics_block)
    network, threshold = result.model, result.decision_threshold
    members = list(members) or [result]
    if len(members) > 1 or tta != "none":
        network = Ensemble([member.model for member in members]) if len(members) > 1 else result.model
        validation = result.splits["validation"]
        with _threads(config.num_threads):
            validation_probability = _sigmoid(eager_logits(network, patchset.x[validation], tta).astype(np.float64))
        threshold, method = choose_threshold(patchset.y[validation], validation_probability, config.threshold_rule)
        card["decision_threshold"] = threshold
        card["training"]["threshold_method"] = method
        card["metrics"]["validation"] = evaluate(validation_probability, patchset.subset(validation), threshold, seed=config.seed)
        card["preprocessing"]["tta"] = tta
        if len(members) > 1:
            card["architecture"]["ensemble"] = {
                "members": len(members), "combination": "mean of the members' logits", "seeds": [m.config.seed for m in members],
                "best_epochs": [m.best_epoch for m in members],
                "oof_estimate": "crossval --ensemble K: every fold trains K seeds and predicts its held-out part by their mean",
            }
    # resubstitution on every training node: optimistic, not a performance estimate; recorded so
    # that re-evaluating the shipped model on the same data can be checked against the card
    if network is result.model and tta == "none":
        from .training import predict_probabilities

        whole_probability = predict_probabilities(result.model, patchset.x, features=patchset.node_features)
    else:
        with _threads(config.num_threads):
            whole_probability = _sigmoid(eager_logits(network, patchset.x, tta).astype(np.float64))
    whole = binary_metrics(patchset.y, whole_probability, threshold)
    card["metrics"]["training_set"] = json_safe({
        **{key: whole[key] for key in ("n", "n_positive", "threshold", "auc", "accuracy", "sensitivity", "specificity")},
        "note": "the shipped model on its own training nodes (resubstitution, optimistic): a reproducibility check, not a performance estimate",
    })
    split = card["training"]["split"]
    split["method"] = "whole set; StratifiedGroupKFold by patient only for the inner validation part (early stopping, threshold)"
    n = split["train_nodes"] + split["validation_nodes"]
    split["fractions"] = [split["train_nodes"] / n, split["validation_nodes"] / n, 0.0]  # what was used, not config.split_fractions
    split["inner_val_fraction"] = float(cv_metrics_block.get("inner_val_fraction", math.nan))
    if label_definition:
        card["label_definition"] = label_definition
    return export_torchscript(network, validate_card(card), path)


# --------------------------------------------------------------------------------------------
# command line



def build_parser() -> argparse.ArgumentParser:
    d = TrainingConfig()
    p = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib crossval", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="labelled dataset folder (with dataset.json)")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and roc.png")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the folds; fold k trains with seed + k")
    p.add_argument("--inner-val", type=float, default=0.2, help="share of each fold's training patients used for early stopping (default 0.2)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--architecture", choices=list(ARCHITECTURE_NAMES), default=d.architecture)
    p.add_argument("--views", choices=list(VIEW_MODES), default=d.views, help="triplanar_stack: 2.5D; volume: 3D (with --architecture resnet3d)")
    p.add_argument("--stack-offset", type=float, default=d.stack_offset_mm, help="--views triplanar_stack: neighbour planes at +- this many mm")
    p.add_argument("--mask-channel", action="store_true")
    p.add_argument("--fov-rule", choices=["fixed", "grow_to_fit"], default=d.fov_rule)
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=list(d.window), help="HU window (default: abdomen -135 215)")
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--spacing", type=float, default=d.spacing_mm[0], help="patch pixel spacing in mm (isotropic)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--lr-patience", type=int, default=d.lr_patience)
    p.add_argument("--rotation", type=float, default=d.rotation_degrees)
    p.add_argument("--translation", type=float, default=d.translation_px)
    p.add_argument("--no-flips", action="store_true")
    p.add_argument("--intensity-jitter", type=float, default=d.intensity_jitter)
    p.add_argument("--blur", type=float, default=d.blur_sigma_px)
    p.add_argument("--noise", type=float, default=d.noise_std)
    p.add_argument("--fusion", choices=list(FUSION_MODES), default=d.fusion,
                   help="node features beside the CNN: mean (CNN + feature logistic regression, mean probability) or concat (end to end); fusion.py")
    p.add_argument("--threshold-rule", default=d.threshold_rule, help="each fold's decision threshold on its inner validation part: youden (default) or sensitivity:0.9")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, help="folder for cached patch arrays")
    p.add_argument("--export-model", default=None, metavar="MODEL.pt", help="then train on the whole set and write this model with the CV metrics in its card")
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="K seeds per fold, each fold's held-out part predicted by their mean logit; with --export-model, K seeds on all nodes in one archive")
    p.add_argument("--tta", default="none", choices=list(TTA_MODES), help="test-time augmentation of the held-out parts, recorded in the exported card")
    p.add_argument("--first-member", type=int, default=0, metavar="M",
                   help="train ensemble members M..M+K-1 (seed + k + 100 m): more seeds for an earlier run on the same folds (not with --export-model)")
    p.add_argument("--name", default="LymphNodeClassifier model")
    p.add_argument("--description", default="")
    p.add_argument("--label-definition", default=None)
    p.add_argument("--model-version", default="1.0.0")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    add_input_options(p)
    return p


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    return TrainingConfig(
        architecture=args.architecture, views=args.views, stack_offset_mm=args.stack_offset, mask_channel=args.mask_channel, fov_rule=args.fov_rule,
        window=tuple(args.window), patch_size=args.patch_size, spacing_mm=(args.spacing,) * 3, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay, patience=args.patience,
        lr_patience=args.lr_patience, rotation_degrees=args.rotation, translation_px=args.translation,
        flips=not args.no_flips, seed=args.seed, num_threads=args.threads, threshold_rule=args.threshold_rule,
        intensity_jitter=args.intensity_jitter, blur_sigma_px=args.blur, noise_std=args.noise,
        fusion=args.fusion,
    )


def _f(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    from .dataset import Dataset
    from .patchset import build_patchset

    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m LymphNodeClassifierLib crossval " + shlex.join(argv)
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    check_writable_folder(args.out)  # before any work: a bad output place must not cost the folds
    check_ensemble_size(args.ensemble)
    if args.first_member and args.export_model:
        raise InputError("--first-member adds seeds to an earlier cross-validation run and exports nothing; drop --export-model (export with --ensemble K).")
    check_first_member(args.first_member)
    check_tta_fits_training(args.tta, config.flips, config.rotation_degrees)
    check_fusion_alone(config, args.ensemble > 1 or args.tta != "none" or args.first_member > 0)
    if args.export_model:
        check_exportable(config)
        check_writable_file(args.export_model, "--export-model")
    dataset = Dataset.load(args.dataset)
    patchset = build_patchset(dataset, config.patch_spec(), config.window, cache_dir=args.cache, policy=InputPolicy.from_args(args))
    print(f"patches: {len(patchset)} nodes of {len(set(patchset.patient_ids.tolist()))} patients, {int(patchset.y.sum())} positive", flush=True)
    attach_features(dataset, patchset, config, args.cache, policy=InputPolicy.from_args(args))

    def show(event: dict) -> None:
        if event["event"] == "epoch" and not args.quiet:
            print(f"fold {event.get('fold', '-')} epoch {event['epoch']:3d}  train_loss {_f(event['train_loss'])}  val_loss {_f(event['val_loss'])}  "
                  f"val_auc {_f(event['val_auc'])}  {event['seconds']:.1f} s", flush=True)
        elif event["event"] == "done":
            print(f"fold {event.get('fold', 'all')}: best epoch {event['best_epoch']} of {event['epochs_run']}, "
                  f"test AUC {_f(event.get('test_auc'))}", flush=True)

    result = cross_validate(patchset, config, args.folds, args.seed, args.inner_val, args.bootstrap, on_event=show, ensemble=args.ensemble, tta=args.tta,
                            first_member=args.first_member)
    result.metrics["command"] = command
    write_crossval(result, args.out, title=f"{dataset.name}: {config.model_name}, {config.views}, window {config.window[0]:g}..{config.window[1]:g} HU")
    m = result.metrics
    for name in ("model", *SIZE_SCORES):
        block = m if name == "model" else m["size_rules"][name]
        ci = (block.get("ci95") or {}).get("auc")
        print(f"{name:<14} OOF AUC {_f(block['auc'])}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
              + f"  acc {_f(block['accuracy'])}  sens {_f(block['sensitivity'])}  spec {_f(block['specificity'])}")
    cal = m["calibration"]
    print(f"calibration (pooled OOF): Brier {_f(cal['brier'])}  ECE {_f(cal['ece'])} ({cal['n_bins']} bins); threshold rule {m['threshold_rule']}", flush=True)
    for row in m.get("ensemble_tta", {}).get("variants", []):
        ci = row.get("auc_ci95")
        print(f"members {row['members']} tta {row['tta']:<12} OOF AUC {_f(row['auc'])}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
              + f"  Brier {_f(row['brier'])}  ECE {_f(row['ece'])}", flush=True)
    print(f"per-fold AUC: {', '.join(_f(v) for v in m['per_fold_auc'])}; {result.seconds:.0f} s; wrote {args.out}", flush=True)
    if args.export_model:
        finals = [train_final_model(patchset, config, args.inner_val, on_event=lambda e, k=k: show({**e, "fold": f"all, member {k}"}), member=k)
                  for k in range(args.ensemble)]
        export_final_model(finals[0], patchset, config, args.export_model, command, m, args.name, args.description,
                           args.label_definition, args.model_version, members=finals, tta=args.tta)
        print(f"whole-set model ({args.ensemble} member(s), best epochs {[f.best_epoch for f in finals]}, tta {args.tta}) written to {args.export_model}", flush=True)
    return 0
