"""Suspect-label finder: which node labels does a model trained without that node's patient disagree with?

A study can fail because some reference labels are wrong. This module ranks every labelled node
by how much its given label disagrees with an out-of-fold (OOF) model, so a reader can re-check
the most suspect nodes first. Two kinds of OOF model:

- "features" (default, `find_suspects_from_features`): a logistic regression on the node's
  shape and attenuation features (`node_features.py`: elongation, roundness, volume, partial-
  volume moments, attenuation statistics, the radiology axes), after a quantile transform to
  normal scores (robust to the heavy tails of e.g. volume), C = 0.3. Confident learning in two
  rounds: round 1 gives OOF probabilities and cleanlab's issue flags; round 2 refits every fold's
  model without the flagged nodes of its training folds (cleanlab's "prune, then retrain"), and
  its OOF probabilities are ranked. (The round-1 flags use per-class thresholds over all nodes, so
  a node's own label has a small, indirect say in which other nodes its round-2 model leaves out;
  no model is ever fitted on the node or its patient.) Seconds for a cohort, and on 20 %-noise phantom cohorts of 70
  studies it put 74-81 % of the flipped labels into the top 20 % (4 cohorts; one round: 71-76 %),
  where the CNN finder below reached 37 % (`bench/bench_suspects.py`).
- "cnn" (`find_suspects`): the fold models are CNNs on the node patches (`suspect_config`). Trained
  on a few hundred noisy labels they learn far less than the features' regression (OOF AUC vs
  truth 0.71 against 0.92 on the benchmark cohort); kept for datasets the features do not describe.

Common to both:
- Folds: scikit-learn `StratifiedGroupKFold` on the patient ids (`assign_folds`): every node of a
  patient is in the same fold, so a node's OOF probability comes from a model that never saw any
  node, study or label of its patient. For fold k, the other folds are split again by patient into
  training and validation nodes (`training.split_by_patient`, 80/20; the validation nodes pick the
  epoch), and `training.train` is called with `splits=(train, validation, fold k)`: fold k is its
  "test" split and its probabilities are the OOF probabilities. The configuration's own
  `split_fractions` are not used; the seed of fold k's model is `config.seed + k`.
- Test-time augmentation (default on): the OOF probability of a node is the mean over the eight
  flips / 90-degree turns of its patch (the same 2-D transform on every channel, as in training).
  On the benchmark cohort it changed little (OOF AUC vs truth 0.714 with, 0.707 without).
- Ranking: cleanlab's `rank.get_label_quality_scores(labels, pred_probs, method="self_confidence",
  adjust_pred_probs=True)`. Self-confidence is the OOF probability of the *given* label; for two
  classes "normalized_margin" orders the nodes exactly the same way (it is `2 p - 1` rescaled), so
  the choice between the two does not matter here. `adjust_pred_probs=True` subtracts each class's
  average self-confidence first, so a model that leans towards one class does not fill the top of
  the list with that class's nodes (on the benchmark cohort: 36.7 % of the flips in the top 20 %
  instead of 34.9 %). `suspicion = 1 - label_quality`; rank 1 is the most suspect.
- Flag: cleanlab's `filter.find_label_issues(labels, pred_probs, filter_by="prune_by_noise_rate")`
  (confident learning): it estimates from the OOF probabilities how many labels of each class are
  wrong (the confident joint, with per-class thresholds) and flags that many nodes, so the flag
  answers "how many should I look at" while the score orders them.
- `suggested_label` is the class the OOF model prefers (probability >= 0.5).

The list orders a reader's review; it is not a relabelling: even with the features' model about
a quarter of the top 20 % are correctly labelled nodes (the CNN finder: two thirds), so a reader
looks before changing a label. (On the benchmark, a CNN retrained after flipping the top 20 %
blindly still beat the noisy labels, 0.892 against 0.838 held-out AUC; with the CNN finder's
ranking, blind flipping made it worse.) Written into the dataset folder (`--out` = the
dataset), `suspects.csv` appears in the module's Curation tab.

`SuspectResult` holds per-node arrays in the PatchSet's row order plus `order` (the ranking);
`rows()` / `summary()` give the CSV rows and the JSON summary. With phantom truth (`true_y`), the
summary says which fraction of the flipped labels lies in the top 20 % of the ranking (chance:
20 %) and the OOF AUC against the given and the true labels.

`main(argv)`: the `suspects` command (`suspects.csv` ranked, `suspects.json` summary, both
written atomically).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import QuantileTransformer

from .cli import exit_code
from .dataset import Dataset
from .errors import CancelledError, InputError, OneLineArgumentParser
from .fileio import atomic_write_json, atomic_write_text, check_writable_folder, ensure_folder
from .metrics import json_safe, rank_auc as _rank_auc
from .node_features import FEATURE_NAMES, feature_matrix
from .patchset import PatchSet, build_patchset
from .training import TrainingConfig, _check_patchset, assign_folds, check_folds, check_seed, split_by_patient, train
from .validate import InputPolicy, add_input_options

TOP_FRACTION = 0.2  # the share of the ranking a reader is expected to re-check
VALIDATION_SHARE = 0.2  # of the other folds' nodes, by patient: picks each fold model's epoch
SCORE_METHOD = "self_confidence"
ISSUE_FILTER = "prune_by_noise_rate"
METHODS = ("features", "cnn")
FEATURE_C = 0.3  # inverse L2 strength of the features' logistic regression (0.1-3 differed by a few % recall)
FEATURE_ROUNDS = 2  # round 2 refits without round 1's flagged nodes
CSV_COLUMNS = (
    "rank", "case_id", "patient_id", "label_value", "given_label", "oof_probability", "suspicion",
    "cleanlab_issue", "suggested_label", "fold", "true_label", "label_flipped",
)
EventCallback = Callable[[dict], None]


def suspect_config(epochs: int = 60, seed: int = 0, num_threads: int | None = 1, **overrides) -> TrainingConfig:
    """The short schedule of the fold models: the study's CNN on 32-pixel patches at 1.58 mm + mask.

    - 32 px at 1.58 mm: the field of view of the 64 px / 0.79 mm default (50.6 mm) with a quarter
      of the pixels; on phantoms it reached the same held-out AUC as 64 px in a third of the time.
    - The node mask as a fourth channel gives the node's outline (size, roundness) directly.
    - Batches of 16 and a constant learning rate (`lr_patience` beyond the schedule): with noisy
      labels the CNN sits on a loss plateau for 10-20 epochs, and halving the learning rate on that
      plateau (the training default) kept it there for good.
    - No early stopping (patience = epochs): the plateau's flat validation loss stopped some folds
      before they had learnt anything; the epoch with the lowest validation loss is kept.
    - One torch thread: on a busy two-core machine two threads spin against the other processes
      (about 11 s instead of 0.7-1 s per epoch measured under load); pass `num_threads=None` for
      torch's own setting.
    """
    values = dict(
        architecture="custom", patch_size=32, spacing_mm=(1.58, 1.58, 1.58), mask_channel=True, translation_px=5.0,
        batch_size=16, epochs=epochs, patience=epochs, lr_patience=1000, seed=seed, num_threads=num_threads,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney), nan when `y` holds one class only."""
    y = np.asarray(y)
    return _rank_auc(y, np.asarray(p, dtype=np.float64)) if y.size and 0 < int((y == 1).sum()) < y.size else math.nan


# --------------------------------------------------------------------------------------------
# result


@dataclass
class SuspectResult:
    """Per-node arrays in the PatchSet's row order; `order` lists the rows from most to least suspect."""

    case_ids: np.ndarray
    patient_ids: np.ndarray
    label_values: np.ndarray
    given: np.ndarray  # int64 0/1, the label under test
    oof_probability: np.ndarray  # float64, P(metastatic) from the model of the node's fold
    label_quality: np.ndarray  # cleanlab score in [0, 1], low = suspect
    suspicion: np.ndarray  # 1 - label_quality
    issue: np.ndarray  # bool, cleanlab.filter.find_label_issues
    fold: np.ndarray  # int64 fold of the node (its patient's)
    order: np.ndarray  # row indices, most suspect first
    true_y: np.ndarray  # int64, -1 = unknown (real data)
    fold_splits: list[dict[str, np.ndarray]]  # per fold: "train", "validation" (empty for features), "predict" row indices
    fold_reports: list[dict]  # per fold: nodes, patients, (CNN) best epoch, validation AUC, seconds
    folds: int
    seed: int
    config: TrainingConfig | None  # the CNN fold models' configuration; None for the features' model
    tta: bool
    seconds: float
    problems: list[str] = field(default_factory=list)
    dataset_name: str = ""
    method: str = "cnn"
    feature_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.given.size)

    @property
    def has_truth(self) -> bool:
        return bool(self.true_y.size) and bool((self.true_y >= 0).all())

    @property
    def rank(self) -> np.ndarray:
        """1-based rank of every row (1 = most suspect)."""
        out = np.empty(len(self), dtype=np.int64)
        out[self.order] = np.arange(1, len(self) + 1)
        return out

    @property
    def suggested(self) -> np.ndarray:
        return (self.oof_probability >= 0.5).astype(np.int64)

    def top(self, fraction: float = TOP_FRACTION) -> np.ndarray:
        """Row indices of the most suspect `fraction` of the nodes (at least one)."""
        count = max(1, int(round(fraction * len(self))))
        return self.order[:count]

    def rows(self) -> list[dict]:
        """One dict per node, ranked (CSV_COLUMNS); truth columns are None without phantom truth."""
        suggested = self.suggested
        out = []
        for rank, i in enumerate(self.order.tolist(), start=1):
            known = bool(self.true_y[i] >= 0)
            out.append({
                "rank": rank,
                "case_id": str(self.case_ids[i]),
                "patient_id": str(self.patient_ids[i]),
                "label_value": int(self.label_values[i]),
                "given_label": int(self.given[i]),
                "oof_probability": round(float(self.oof_probability[i]), 6),
                "suspicion": round(float(self.suspicion[i]), 6),
                "cleanlab_issue": bool(self.issue[i]),
                "suggested_label": int(suggested[i]),
                "fold": int(self.fold[i]),
                "true_label": int(self.true_y[i]) if known else None,
                "label_flipped": bool(self.true_y[i] != self.given[i]) if known else None,
            })
        return out

    def summary(self) -> dict:
        """JSON-ready summary (the recall figures need phantom truth, else they are None)."""
        n = len(self)
        top = self.top()
        out: dict = {
            "dataset": self.dataset_name,
            "n": n,
            "patients": int(len(set(self.patient_ids.tolist()))),
            "given_metastatic": int(self.given.sum()),
            "folds": self.folds,
            "seed": self.seed,
            "grouping": "StratifiedGroupKFold by patient: no patient in the training/validation and predicted nodes of one fold",
            "method": self.method,
            "oof_model": _model_description(self.method),
            "ranking": f"1 - cleanlab.rank.get_label_quality_scores(method='{SCORE_METHOD}', adjust_pred_probs=True) on the OOF probabilities",
            "issue_flag": f"cleanlab.filter.find_label_issues(filter_by='{ISSUE_FILTER}')",
            "test_time_augmentation": self.tta,
            "features": list(self.feature_names),
            "n_issues": int(self.issue.sum()),
            "top_fraction": TOP_FRACTION,
            "n_top": int(top.size),
            "oof_auc_vs_given": rank_auc(self.given, self.oof_probability),
            "oof_auc_vs_true": None,
            "has_truth": self.has_truth,
            "n_flipped": None,
            "flipped_found_in_top": None,
            "chance_found_in_top": TOP_FRACTION,
            "precision_in_top": None,
            "issues_recall": None,
            "issues_precision": None,
            "fold_reports": self.fold_reports,
            "config": self.config.to_dict() if self.config is not None else None,
            "seconds": round(self.seconds, 1),
            "problems": len(self.problems),
        }
        if self.has_truth:
            flipped = self.true_y != self.given
            n_flipped = int(flipped.sum())
            out["oof_auc_vs_true"] = rank_auc(self.true_y, self.oof_probability)
            out["n_flipped"] = n_flipped
            out["flipped_found_in_top"] = float(flipped[top].sum() / n_flipped) if n_flipped else None
            out["chance_found_in_top"] = float(top.size / n)
            out["precision_in_top"] = float(flipped[top].mean())
            out["issues_recall"] = float((flipped & self.issue).sum() / n_flipped) if n_flipped else None
            out["issues_precision"] = float(flipped[self.issue].mean()) if self.issue.any() else None
        return json_safe(out)


# --------------------------------------------------------------------------------------------
# the finder


def predict_tta(model: torch.nn.Module, x: np.ndarray, tta: bool = True, batch_size: int = 256) -> np.ndarray:
    """P(metastatic) of an eager model for `(N, C, H, W)` patches; with `tta`, the mean over the
    eight flips / 90-degree turns (the same transform on every channel)."""
    model.eval()
    tensor = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    transforms = [(turns, flip) for turns in range(4) for flip in (False, True)] if tta else [(0, False)]
    total = np.zeros(tensor.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for turns, flip in transforms:
            view = torch.rot90(tensor, turns, dims=(-2, -1)) if turns else tensor
            view = view.flip(-1) if flip else view
            for start in range(0, view.shape[0], batch_size):
                total[start:start + batch_size] += torch.sigmoid(model(view[start:start + batch_size])).double().numpy()
    return total / len(transforms)


def rank_labels(given: np.ndarray, oof_probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label_quality, issue flags, order most-suspect-first) of binary labels from OOF probabilities."""
    given = np.asarray(given, dtype=np.int64)
    p = np.clip(np.asarray(oof_probability, dtype=np.float64), 0.0, 1.0)
    pred_probs = np.column_stack([1.0 - p, p])
    quality = get_label_quality_scores(given, pred_probs, method=SCORE_METHOD, adjust_pred_probs=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns when a class has very few confident examples
        issue = find_label_issues(given, pred_probs, filter_by=ISSUE_FILTER, n_jobs=1)
    # most suspect first; ties by the probability of the given label, then by row (stable)
    p_given = np.where(given == 1, p, 1.0 - p)
    order = np.lexsort((np.arange(given.size), p_given, quality))
    return np.asarray(quality, dtype=np.float64), np.asarray(issue, dtype=bool), order


def _start(patchset: PatchSet, folds, seed, on_event: EventCallback | None) -> tuple[int, int, np.ndarray, EventCallback]:
    """Checked (folds, seed), the patient folds and the JSON-safe event emitter of a search."""
    folds = check_folds(folds)
    seed = check_seed(seed)
    counts = np.bincount(patchset.y, minlength=2)
    if counts.min() < folds:
        raise InputError(
            f"Only {int(counts.min())} node(s) are labelled {'benign' if counts[0] < counts[1] else 'metastatic'}, fewer than the {folds} folds; "
            "label more nodes of that class or use fewer folds."
        )
    emit = (lambda event: on_event(json_safe(event))) if on_event is not None else (lambda event: None)
    return folds, seed, assign_folds(patchset.patient_ids, patchset.y, folds, seed), emit


def _finish(patchset: PatchSet, oof: np.ndarray, emit: EventCallback, **fields) -> SuspectResult:
    """Rank the OOF probabilities and build the result (emits `done`)."""
    quality, issue, order = rank_labels(patchset.y, oof)
    out = SuspectResult(
        case_ids=patchset.case_ids.copy(), patient_ids=patchset.patient_ids.copy(), label_values=patchset.label_values.copy(),
        given=patchset.y.astype(np.int64).copy(), oof_probability=oof, label_quality=quality, suspicion=1.0 - quality,
        issue=issue, order=order, true_y=patchset.true_y.astype(np.int64).copy(),
        problems=list(patchset.problems), dataset_name=patchset.dataset_name, **fields,
    )
    summary = out.summary()
    emit({"event": "done", **{key: summary[key] for key in ("n", "n_issues", "oof_auc_vs_given", "oof_auc_vs_true", "flipped_found_in_top", "seconds")}})
    return out


def _model_description(method: str) -> str:
    if method == "features":
        return (f"scikit-learn SimpleImputer(median) + QuantileTransformer(normal) + LogisticRegression(C={FEATURE_C}) on "
                f"node_features.FEATURE_NAMES; {FEATURE_ROUNDS} rounds, the last without the previous round's cleanlab flags")
    return "CNN fold models (training.train with the configuration in `config`)"


def feature_classifier(training_rows: int, seed: int = 0):
    """The features' OOF model: median imputation, normal quantile scores, L2 logistic regression."""
    return make_pipeline(
        SimpleImputer(strategy="median"),
        QuantileTransformer(n_quantiles=max(2, min(100, int(training_rows))), output_distribution="normal", random_state=seed),
        LogisticRegression(C=FEATURE_C, max_iter=5000),
    )


def find_suspects_from_features(
    patchset: PatchSet,
    features: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    on_event: EventCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    feature_names: Sequence[str] = (),
) -> SuspectResult:
    """Rank the labelled nodes of `patchset` with OOF logistic regressions on `features` (N, F).

    Row n of `features` describes row n of `patchset` (`node_features.feature_matrix(dataset,
    patchset.case_ids, patchset.label_values)`); NaN = not measured (imputed by the training
    median). Two rounds (module docstring); `on_event` gets `fold_done` per fold of the last
    round and `done`; `is_cancelled()` is checked before every fold.
    """
    started = time.perf_counter()
    if not isinstance(patchset, PatchSet):
        raise TypeError("find_suspects_from_features needs a patchset.PatchSet (patchset.build_patchset)")
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != len(patchset):
        raise InputError(f"The feature table has shape {features.shape} for {len(patchset)} nodes; compute one row per node with node_features.feature_matrix.")
    if np.isinf(features).any():
        raise InputError("The feature table holds infinite values; recompute it with node_features.feature_matrix.")
    folds, seed, fold_of, emit = _start(patchset, folds, seed, on_event)
    y = patchset.y.astype(np.int64)
    keep = np.ones(len(patchset), dtype=bool)
    fold_splits: list[dict[str, np.ndarray]] = []
    reports: list[dict] = []
    for round_ in range(1, FEATURE_ROUNDS + 1):
        oof = np.full(len(patchset), np.nan)
        fold_splits, reports = [], []
        for k in range(folds):
            if is_cancelled is not None and is_cancelled():
                raise CancelledError("The suspect search was cancelled; nothing was written.")
            fold_start = time.perf_counter()
            predict = np.flatnonzero(fold_of == k)
            rest = np.flatnonzero(fold_of != k)
            train_rows = rest[keep[rest]]
            if np.unique(y[train_rows]).size < 2:  # pruning left one class: use every node of the other folds
                train_rows = rest
            if np.unique(y[train_rows]).size < 2:
                raise InputError(f"Fold {k + 1} leaves only one class to train on; label more nodes of both classes or use fewer folds.")
            model = feature_classifier(train_rows.size, seed).fit(features[train_rows], y[train_rows])
            oof[predict] = model.predict_proba(features[predict])[:, 1]
            fold_splits.append({"train": train_rows, "validation": np.zeros(0, dtype=np.int64), "predict": predict})
            reports.append(json_safe({
                "fold": k + 1, "round": round_, "train_nodes": int(train_rows.size), "left_out_flagged": int(rest.size - train_rows.size),
                "predict_nodes": int(predict.size), "predict_patients": int(len(set(patchset.patient_ids[predict].tolist()))),
                "oof_auc_vs_given": rank_auc(y[predict], oof[predict]), "seconds": round(time.perf_counter() - fold_start, 2),
            }))
        if round_ < FEATURE_ROUNDS:
            keep = ~rank_labels(y, oof)[1]
    for report in reports:
        emit({"event": "fold_done", "folds": folds, **report})
    return _finish(
        patchset, oof, emit, fold=fold_of, fold_splits=fold_splits, fold_reports=reports, folds=folds, seed=seed, config=None,
        tta=False, seconds=time.perf_counter() - started, method="features", feature_names=tuple(feature_names),
    )


def find_suspects_in_dataset(
    dataset: Dataset,
    patchset: PatchSet,
    folds: int = 5,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> SuspectResult:
    """The default finder on `dataset`: measure every node of `patchset` (`node_features.feature_matrix`,
    `progress(done_cases, total_cases)`), then `find_suspects_from_features`."""
    features = feature_matrix(dataset, patchset.case_ids, patchset.label_values, progress=progress, is_cancelled=is_cancelled)
    return find_suspects_from_features(patchset, features, folds=folds, seed=seed, is_cancelled=is_cancelled, feature_names=FEATURE_NAMES)


def find_suspects(
    patchset: PatchSet,
    config: TrainingConfig,
    folds: int = 5,
    seed: int = 0,
    on_event: EventCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    tta: bool = True,
) -> SuspectResult:
    """Rank the labelled nodes of `patchset` by how much their label disagrees with OOF models.

    `config` is the training configuration of every fold model (e.g. `suspect_config()`; its
    patch spec must be the PatchSet's). `seed` shuffles the patient folds. `on_event(dict)` gets
    `fold_start`, the fold's training events (with `fold` added), `fold_done` and `done`;
    `is_cancelled()` is checked before every batch and fold (`CancelledError`).
    """
    started = time.perf_counter()
    if not isinstance(config, TrainingConfig):
        raise TypeError("find_suspects needs a training.TrainingConfig (e.g. suspects.suspect_config())")
    _check_patchset(patchset, config)
    folds, seed, fold_of, emit = _start(patchset, folds, seed, on_event)
    oof = np.full(len(patchset), np.nan)
    fold_splits: list[dict[str, np.ndarray]] = []
    reports: list[dict] = []
    for k in range(folds):
        if is_cancelled is not None and is_cancelled():
            raise CancelledError("The suspect search was cancelled; nothing was written.")
        predict = np.flatnonzero(fold_of == k)
        rest = np.flatnonzero(fold_of != k)
        if np.unique(patchset.y[rest]).size < 2:
            raise InputError(f"Fold {k + 1} leaves only one class to train on; label more nodes of both classes or use fewer folds.")
        train_rel, val_rel, _ = split_by_patient(patchset.patient_ids[rest], patchset.y[rest], (1.0 - VALIDATION_SHARE, VALIDATION_SHARE, 0.0), seed + 7919 * (k + 1))
        splits = {"train": rest[train_rel], "validation": rest[val_rel], "predict": predict}
        fold_splits.append(splits)
        emit({"event": "fold_start", "fold": k + 1, "folds": folds, **{f"{name}_nodes": int(v.size) for name, v in splits.items()}})
        fold_config = dataclasses.replace(config, seed=config.seed + k)

        def forward(event: dict, fold: int = k + 1) -> None:
            emit({**event, "fold": fold, "folds": folds})

        result = train(patchset, fold_config, on_event=forward if on_event is not None else None, is_cancelled=is_cancelled,
                       splits=(splits["train"], splits["validation"], predict))
        oof[predict] = predict_tta(result.model, patchset.x[predict], tta) if tta else result.probabilities["test"]
        report = {
            "fold": k + 1,
            "train_nodes": int(splits["train"].size),
            "validation_nodes": int(splits["validation"].size),
            "predict_nodes": int(predict.size),
            "predict_patients": int(len(set(patchset.patient_ids[predict].tolist()))),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "validation_auc": result.metrics["validation"]["auc"],
            "oof_auc_vs_given": rank_auc(patchset.y[predict], oof[predict]),
            "seconds": round(result.seconds, 1),
        }
        reports.append(json_safe(report))
        emit({"event": "fold_done", "folds": folds, **report})
    return _finish(
        patchset, oof, emit, fold=fold_of, fold_splits=fold_splits, fold_reports=reports, folds=folds, seed=seed, config=config,
        tta=bool(tta), seconds=time.perf_counter() - started, method="cnn",
    )


# --------------------------------------------------------------------------------------------
# output


def csv_text(result: SuspectResult) -> str:
    """The ranked table as CSV text (booleans as true/false, unknown truth as empty cells)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result.rows():
        writer.writerow({key: ("" if value is None else str(value).lower() if isinstance(value, bool) else value) for key, value in row.items()})
    return buffer.getvalue()


def write_outputs(result: SuspectResult, out_dir: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    """Write `suspects.csv` and `suspects.json` into `out_dir` (each atomically); returns their paths."""
    out_dir = ensure_folder(out_dir, f"--out {out_dir} is a file; choose a folder for suspects.csv and suspects.json.")
    csv_path, json_path = out_dir / "suspects.csv", out_dir / "suspects.json"
    summary = result.summary()
    if extra:
        summary.update(json_safe(extra))
    try:
        atomic_write_text(csv_path, csv_text(result))
        atomic_write_json(json_path, summary)
    except OSError as error:
        raise InputError(f"Cannot write into {out_dir} ({error.strerror}); choose a writable folder.") from None
    return csv_path, json_path


# --------------------------------------------------------------------------------------------
# command line



def _parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m LymphNodeClassifierLib suspects",
        description="Rank a dataset's node labels by how much out-of-fold models (patient-grouped folds) disagree with them.",
    )
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json)")
    parser.add_argument("--out", required=True, help="folder for suspects.csv (ranked) and suspects.json (summary); "
                        "the dataset folder itself puts the list into the module's Curation tab")
    parser.add_argument("--method", choices=METHODS, default="features",
                        help="OOF model: 'features' (default: logistic regression on node shape and attenuation features, seconds) "
                        "or 'cnn' (CNN fold models on the patches, minutes)")
    parser.add_argument("--folds", type=int, default=5, help="patient-grouped folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and the fold models (default 0)")
    parser.add_argument("--epochs", type=int, default=60, help="cnn: most epochs per fold model (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="cnn: torch threads (default 1: fastest on a busy machine)")
    parser.add_argument("--cache", default=None, help="folder for cached patch arrays")
    parser.add_argument("--no-tta", action="store_true", help="cnn: no test-time flips/turns for the OOF probabilities")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_input_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    out = check_writable_folder(args.out)  # before any work
    check_folds(args.folds)
    config = suspect_config(epochs=args.epochs, seed=check_seed(args.seed), num_threads=args.threads)
    dataset = Dataset.load(args.dataset)
    start = time.perf_counter()
    patchset = build_patchset(dataset, config.patch_spec(), config.window, cache_dir=args.cache, policy=InputPolicy.from_args(args))
    say = (lambda text: None) if args.quiet else (lambda text: print(text, flush=True))
    say(f"patches: {len(patchset)} nodes from {patchset.n_cases} cases in {time.perf_counter() - start:.1f} s")
    for line in patchset.problems[:10]:
        print(f"warning: skipped: {line}", file=sys.stderr)

    def show(event: dict) -> None:
        if event["event"] == "fold_done":
            say(f"fold {event['fold']}/{event['folds']}: {event['predict_nodes']} nodes predicted, best epoch {event['best_epoch']} "
                f"of {event['epochs_run']}, {event['seconds']:.1f} s")

    if args.method == "features":
        start = time.perf_counter()
        result = find_suspects_in_dataset(dataset, patchset, folds=args.folds, seed=args.seed)
        say(f"features: {len(result.feature_names)} per node, measured and ranked in {time.perf_counter() - start:.1f} s")
    else:
        result = find_suspects(patchset, config, folds=args.folds, seed=args.seed, on_event=show, tta=not args.no_tta)
    csv_path, json_path = write_outputs(result, out, extra={"dataset_folder": str(Path(args.dataset).resolve())})
    summary = result.summary()
    say(f"{summary['n']} nodes ranked in {summary['seconds']:.0f} s; cleanlab flags {summary['n_issues']}; "
        f"OOF AUC vs given labels {_fmt(summary['oof_auc_vs_given'])}")
    if summary["has_truth"]:
        say(f"phantom truth: {summary['n_flipped']} flipped labels, {_fmt(summary['flipped_found_in_top'])} of them in the top "
            f"{TOP_FRACTION:.0%} (chance {_fmt(summary['chance_found_in_top'])}); OOF AUC vs true labels {_fmt(summary['oof_auc_vs_true'])}")
    say(f"wrote {csv_path} and {json_path}")
    return 0


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """`suspects --dataset DIR --out DIR [--method features|cnn] [--folds K] [--seed S] [--epochs E]`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return exit_code(lambda: run(_parser().parse_args(argv)))
