"""Evaluation of a model on a labelled dataset, compared with the short-axis size rule.

`evaluate [--model M] --dataset D --out DIR [--threshold T] [--bootstrap N] [--seed S]` classifies
every labelled node of every non-excluded case (excluded nodes are left out, unlabelled ones are
listed under `skipped`) with the model card's preprocessing (`pipeline.patch_spec_from_card`,
`pipeline.window_from_card`, `patchset.build_patchset`, `inference.predict`) and writes:

- `DIR/predictions.csv`: one row per node: case_id, patient_id, label_value, probability,
  prediction (1 when probability >= threshold), label (the dataset's 0/1), short_axis_mm. Numbers
  are written at full precision so the metrics can be recomputed from this file exactly.
- `DIR/roc.png`: ROC curves of the model and of the size rule (AUC and 95 % CI in the legend,
  operating points marked) and the confusion matrices of both at their thresholds.
- `DIR/reliability.png`: the reliability diagram (fraction metastatic against mean predicted
  probability in 10 equal-width bins, nodes per bin); `metrics.json` holds the same under
  `calibration` with the Brier score and the expected calibration error (ECE) and their
  patient-level bootstrap CIs, and `threshold_rule` says how the card's threshold was chosen.
- `DIR/metrics.json` (written last): the model's metrics at the threshold (`metrics.binary_metrics`:
  auc, accuracy, sensitivity, specificity, ppv, npv, n, n_positive, confusion matrix, ...), their
  percentile bootstrap 95 % CIs (`metrics.bootstrap_ci`, patient-level resampling) under `ci95`,
  and the same for the size rule under `size_rule` (score: the node's short axis in mm; AUC of
  the short axis itself, and metastatic when short axis >= 10 mm, the usual cut-off). A metric
  that is undefined (e.g. AUC with one class only) is null and `undefined[metric]` says why.
  Phantom datasets also get the AUCs against the noise-free truth (`vs_truth`).

Every file is written atomically (`fileio`). The threshold defaults to the model card's
`decision_threshold`.

For other callers (the Training tab, other commands): `evaluate_predictions(patchset, probability,
threshold)` computes the metrics of probabilities already at hand, `evaluate_patchset(model,
patchset)` runs the model too, `write_evaluation(evaluation, out_dir)` writes the three files and
`evaluate_dataset(model, dataset, out_dir)` does everything.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from .cli import ProgressLine
from .dataset import Dataset
from .errors import InputError, OneLineArgumentParser
from .fileio import atomic_path, atomic_write_json, atomic_write_text, check_writable_folder, csv_text, ensure_folder
from .metrics import METRIC_NAMES, binary_metrics, bootstrap_ci, calibration, json_safe, plot_reliability, roc_points
from .model import LoadedModel, load_model
from .model_registry import choose_model
from .fusion import attach_features
from .patchset import PatchSet, build_patchset
from .validate import InputPolicy, add_input_options

SIZE_RULE_THRESHOLD_MM = 10.0  # short axis >= 10 mm: enlarged, called metastatic
PREDICTION_COLUMNS = ("case_id", "patient_id", "label_value", "probability", "prediction", "label", "short_axis_mm")
OUTPUT_FILES = ("metrics.json", "predictions.csv", "roc.png", "reliability.png")


@dataclass
class Evaluation:
    """Metrics (JSON-ready) and per-node probabilities of one model on one PatchSet."""

    metrics: dict
    probability: np.ndarray  # float64 (N,), row i = node i of `patchset`
    patchset: PatchSet

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])

    def predictions(self) -> list[dict]:
        """One dict per node with the columns of predictions.csv."""
        ps = self.patchset
        return [
            {
                "case_id": str(ps.case_ids[i]),
                "patient_id": str(ps.patient_ids[i]),
                "label_value": int(ps.label_values[i]),
                "probability": float(self.probability[i]),
                "prediction": int(self.probability[i] >= self.threshold),
                "label": int(ps.y[i]),
                "short_axis_mm": float(ps.short_axis_mm[i]),
            }
            for i in range(len(ps))
        ]


# --------------------------------------------------------------------------------------------
# metrics


def _check_count(value: Any, what: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"The {what} must be a whole number of at least 0, got {value!r}; use e.g. {example}.")
    return int(value)


def _ci(y: np.ndarray, score: np.ndarray, threshold: float, n_boot: int, seed: int, groups: np.ndarray, confidence: float) -> dict | None:
    if n_boot == 0:
        return None
    intervals = bootstrap_ci(y, score, threshold, n_boot=n_boot, seed=seed, groups=groups, confidence=confidence)
    return {name: (None if not all(math.isfinite(v) for v in pair) else [float(pair[0]), float(pair[1])]) for name, pair in intervals.items()}


def _auc_or_nan(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score)) if y.size and 0 < int(y.sum()) < y.size else math.nan


def evaluate_predictions(
    patchset: PatchSet,
    probability: Sequence[float],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    size_threshold_mm: float = SIZE_RULE_THRESHOLD_MM,
    confidence: float = 0.95,
) -> dict:
    """Metrics of `probability` (row i = node i of `patchset`) at `threshold`, JSON-safe.

    Top level: the model's `binary_metrics` plus `ci95` (patient-level percentile bootstrap;
    null with `n_boot` 0), `patients`, `bootstrap`; `size_rule`: the same for the short axis
    (AUC of `short_axis_mm`; metastatic when `short_axis_mm >= size_threshold_mm`).
    """
    y = np.asarray(patchset.y, dtype=np.int64)
    p = np.asarray(probability, dtype=np.float64)
    if p.shape != y.shape:
        raise InputError(f"There are {p.size} probabilities for {y.size} nodes; pass one probability per node of the patch set.")
    n_boot = _check_count(n_boot, "number of bootstrap resamples", 1000)
    seed = _check_count(seed, "seed", 0)
    try:
        size_threshold_mm = float(size_threshold_mm)
    except (TypeError, ValueError):
        raise InputError(f"The size-rule threshold {size_threshold_mm!r} is not a number; use e.g. 10 (mm).") from None
    if not (math.isfinite(size_threshold_mm) and size_threshold_mm > 0):
        raise InputError(f"The size-rule threshold must be a positive number of mm, got {size_threshold_mm!r}; use e.g. 10.")
    groups = np.asarray(patchset.patient_ids).astype(str)

    out = binary_metrics(y, p, threshold)
    out["ci95"] = _ci(y, p, out["threshold"], n_boot, seed, groups, confidence)
    out["roc"] = roc_points(y, p)
    out["calibration"] = calibration(y, p, n_boot=n_boot, seed=seed, groups=groups, confidence=confidence)

    # The size rule through a strictly increasing map of the short axis into [0, 1):
    # s / (s + T) >= 0.5 exactly when s >= T, and the ranks (hence the AUC) are those of s.
    short = np.asarray(patchset.short_axis_mm, dtype=np.float64)
    size_score = short / (short + size_threshold_mm)
    size = binary_metrics(y, size_score, 0.5)
    if math.isfinite(size["auc"]):
        size["auc"] = float(roc_auc_score(y, short))
    size["roc"] = roc_points(y, short)
    size.pop("threshold")  # 0.5 on the mapped score; `threshold_mm` is the rule's own
    size = {"score": "short_axis_mm", "rule": f"metastatic when short_axis_mm >= {size_threshold_mm:g}", "threshold_mm": size_threshold_mm, **size}
    size["ci95"] = _ci(y, size_score, 0.5, n_boot, seed, groups, confidence)
    out["size_rule"] = size

    out["patients"] = int(len(set(groups.tolist())))
    out["cases"] = int(len(set(np.asarray(patchset.case_ids).astype(str).tolist())))
    out["bootstrap"] = {"resamples": n_boot, "seed": seed, "confidence": float(confidence), "resampling": "patient (cluster bootstrap)", "method": "percentile"}
    if patchset.has_truth:
        truth = np.asarray(patchset.true_y, dtype=np.int64)
        out["vs_truth"] = {
            "auc": _auc_or_nan(truth, p), "size_rule_auc": _auc_or_nan(truth, short),
            "label_noise_nodes": int(np.count_nonzero(truth != y)),
        }
    return json_safe(out)


def _check_preprocessing(model: LoadedModel, patchset: PatchSet) -> None:
    from .pipeline import patch_spec_from_card, window_from_card

    if patchset.spec != patch_spec_from_card(model.card) or tuple(patchset.window) != tuple(window_from_card(model.card)):
        raise InputError(
            "The patches were extracted with another patch spec or window than the model card's; "
            "rebuild them with pipeline.patch_spec_from_card(card) and pipeline.window_from_card(card)."
        )


def evaluate_patchset(
    model: LoadedModel,
    patchset: PatchSet,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    size_threshold_mm: float = SIZE_RULE_THRESHOLD_MM,
    batch_size: int = 32,
) -> Evaluation:
    """Run `model` on every node of `patchset` and compute the metrics (`evaluate_predictions`).

    `threshold` defaults to the card's decision threshold. The patch set must have been built
    with the card's preprocessing (checked).
    """
    from .fusion import predict_fused, uses_node_features
    from .inference import predict

    if not isinstance(model, LoadedModel):
        raise TypeError("evaluate_patchset needs a LoadedModel from model.load_model")
    _check_preprocessing(model, patchset)
    if len(patchset) == 0:
        raise InputError("There is no labelled, non-excluded node to evaluate; label some nodes (or include excluded ones) first.")
    source = "model card" if threshold is None else "given"
    threshold = model.decision_threshold if threshold is None else threshold
    if uses_node_features(model.card):  # a fused model (fusion.py): its fused probability, from the nodes' features
        if patchset.node_features is None:
            raise InputError("This model fuses node features; build the patch set's features with fusion.attach_features first.")
        probability = predict_fused(model, patchset.x, patchset.node_features, batch_size=batch_size)[0]
    else:
        probability = predict(model, patchset.x, batch_size=batch_size)
    metrics = evaluate_predictions(patchset, probability, threshold, n_boot=n_boot, seed=seed, size_threshold_mm=size_threshold_mm)
    metrics["threshold_source"] = source
    metrics["threshold_rule"] = threshold_rule_of(model.card) if source == "model card" else "given by the caller"
    metrics["model"] = {
        "path": None if model.path is None else str(model.path),
        "name": model.card.get("name", ""),
        "model_version": model.card.get("model_version", ""),
        "architecture": model.card["architecture"]["name"],
        "card_decision_threshold": model.decision_threshold,
    }
    metrics["dataset"] = patchset.summary()
    metrics["skipped"] = list(patchset.problems)
    return Evaluation(metrics=metrics, probability=probability, patchset=patchset)


def threshold_rule_of(card: dict) -> str:
    """How the card's decision threshold was chosen ('youden', 'sensitivity:0.9', or the card's own words)."""
    training = card.get("training") or {}
    if training.get("threshold_rule"):
        return str(training["threshold_rule"])
    method = str(training.get("threshold_method", ""))
    return "youden" if "youden" in method.lower() else (method or "not recorded in the card")


# --------------------------------------------------------------------------------------------
# outputs


def predictions_csv(evaluation: Evaluation) -> str:
    return csv_text(evaluation.predictions(), PREDICTION_COLUMNS)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _auc_label(name: str, block: dict) -> str:
    ci = (block.get("ci95") or {}).get("auc")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    return f"{name}: AUC {_fmt(block['auc'])}{ci_text}"


def _confusion_panel(axis, block: dict, title: str) -> None:
    matrix = np.array(block["confusion_matrix"], dtype=float)
    axis.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1.0, matrix.max()))
    names = ("benign", "metastatic")
    for r in range(2):
        for c in range(2):
            colour = "white" if matrix[r, c] > matrix.max() / 2 else "black"
            axis.text(c, r, f"{int(matrix[r, c])}", ha="center", va="center", fontsize=14, color=colour)
    axis.set_xticks([0, 1], [f"pred. {n}" for n in names])
    axis.set_yticks([0, 1], names)
    axis.set_ylabel("label")
    summary = f"sens {_fmt(block['sensitivity'])}  spec {_fmt(block['specificity'])}\nPPV {_fmt(block['ppv'])}  NPV {_fmt(block['npv'])}"
    axis.set_title(f"{title}\n{summary}", fontsize=10)


def plot_evaluation(evaluation: Evaluation, path: str | os.PathLike) -> None:
    """roc.png: ROC curves (model, size rule) and both confusion matrices; written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global backend change inside Slicer

    metrics = evaluation.metrics
    size = metrics["size_rule"]
    y = np.asarray(evaluation.patchset.y)
    figure = Figure(figsize=(15, 5.4), dpi=100, layout="constrained")
    roc_axis, model_axis, size_axis = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    if metrics["auc"] is not None:
        for name, score, block, colour, point in (
            ("model", evaluation.probability, metrics, "#d62728", metrics["threshold"]),
            ("short-axis size rule", evaluation.patchset.short_axis_mm, size, "#1f77b4", size["threshold_mm"]),
        ):
            fpr, tpr, _ = roc_curve(y, score)
            roc_axis.plot(fpr, tpr, color=colour, lw=2, label=_auc_label(name, block))
            if block["sensitivity"] is not None and block["specificity"] is not None:
                roc_axis.plot(1 - block["specificity"], block["sensitivity"], "o", color=colour, ms=8,
                              label=f"  operating point ({'p' if name == 'model' else 'short axis'} >= {point:g}{'' if name == 'model' else ' mm'})")
        roc_axis.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        roc_axis.legend(loc="lower right", fontsize=9)
    else:
        roc_axis.text(0.5, 0.5, f"ROC undefined:\n{metrics['undefined'].get('auc', '')}", ha="center", va="center", wrap=True)
    roc_axis.set_xlim(0, 1)
    roc_axis.set_ylim(0, 1.01)
    roc_axis.set_aspect("equal")
    roc_axis.set_xlabel("1 - specificity")
    roc_axis.set_ylabel("sensitivity")
    roc_axis.set_title(f"ROC, {metrics['n']} nodes ({metrics['n_positive']} metastatic), {metrics['patients']} patients")
    _confusion_panel(model_axis, metrics, f"model, probability >= {metrics['threshold']:g}")
    _confusion_panel(size_axis, size, f"size rule, short axis >= {size['threshold_mm']:g} mm")
    name = (metrics.get("model") or {}).get("name", "")
    dataset = (metrics.get("dataset") or {}).get("name", "")
    figure.suptitle(f"{name} on {dataset}".strip() if name or dataset else "evaluation")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


def write_evaluation(evaluation: Evaluation, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write predictions.csv, roc.png, reliability.png and then metrics.json (each atomically) into `out_dir`."""
    out_dir = ensure_folder(out_dir, f"--out {out_dir} is a file; give a folder for the evaluation outputs.")
    paths = {name: out_dir / name for name in OUTPUT_FILES}
    atomic_write_text(paths["predictions.csv"], predictions_csv(evaluation))
    plot_evaluation(evaluation, paths["roc.png"])
    name = (evaluation.metrics.get("model") or {}).get("name", "") or "model"
    plot_reliability([(name, evaluation.patchset.y, evaluation.probability)], paths["reliability.png"],
                     f"Reliability of {name}, {evaluation.metrics['n']} nodes")
    atomic_write_json(paths["metrics.json"], evaluation.metrics)
    return paths


def evaluate_dataset(
    model: LoadedModel | str | os.PathLike,
    dataset: Dataset | str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    policy: InputPolicy = InputPolicy(),
) -> Evaluation:
    """Patches with the card's preprocessing -> model -> metrics; the files too when `out_dir` is given."""
    from .pipeline import patch_spec_from_card, window_from_card

    # options first: a typo should not cost a patch extraction
    n_boot = _check_count(n_boot, "number of bootstrap resamples", 1000)
    seed = _check_count(seed, "seed", 0)
    if threshold is not None:
        binary_metrics([], [], threshold)  # InputError for a threshold outside [0, 1]
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
    data = dataset if isinstance(dataset, Dataset) else Dataset.load(dataset)
    patchset = build_patchset(
        data, patch_spec_from_card(loaded.card), window_from_card(loaded.card), cache_dir=cache_dir,
        progress=progress, is_cancelled=is_cancelled, policy=policy,
    )
    attach_features(data, patchset, loaded.card, cache_dir, is_cancelled=is_cancelled, policy=policy)  # a fused model's card asks for them
    if len(patchset) == 0:
        raise InputError(f"The dataset {data.folder} has no labelled, non-excluded node to evaluate; label some nodes (or include excluded ones) first.")
    evaluation = evaluate_patchset(loaded, patchset, threshold, n_boot=n_boot, seed=seed)
    evaluation.metrics["dataset"]["folder"] = str(data.folder)
    if out_dir is not None:
        write_evaluation(evaluation, out_dir)
    return evaluation


# --------------------------------------------------------------------------------------------
# command line



def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="TorchScript model file with a model card, or a bundled model's name "
                        "(e.g. lung_nodule_lidc); default: the active model, else the bundled default, as classify")
    parser.add_argument("--dataset", required=True, help="labelled dataset folder (with dataset.json)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json, predictions.csv and roc.png")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model card's)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--cache", default=None, help="folder for cached patch arrays")
    add_input_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`evaluate --model M --dataset D --out DIR [--threshold T] [--bootstrap N] [--seed S]`."""
    args = build_parser().parse_args(argv)

    progress: list[ProgressLine] = []

    def show(done: int, total: int) -> None:
        if not progress:
            progress.append(ProgressLine("cases (patches)", total))
        progress[0].update(done)
        if done >= total:
            progress[0].done()

    model_path = choose_model(args.model)
    check_writable_folder(args.out)  # before any work
    evaluation = evaluate_dataset(model_path, args.dataset, args.out, args.threshold, args.bootstrap, args.seed, args.device, args.cache, progress=show,
                                  policy=InputPolicy.from_args(args))
    m = evaluation.metrics
    for problem in m["skipped"][:10]:
        print(f"skipped: {problem}", file=sys.stderr)
    if len(m["skipped"]) > 10:
        print(f"skipped: ... and {len(m['skipped']) - 10} more", file=sys.stderr)

    def line(name: str, block: dict) -> str:
        ci = (block.get("ci95") or {}).get("auc")
        auc = _fmt(block["auc"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        if block["auc"] is None:
            auc += f" ({block['undefined'].get('auc', '')})"
        rates = "  ".join(f"{key} {_fmt(block[key])}" for key in METRIC_NAMES if key != "auc")
        return f"{name:<10} AUC {auc}  {rates}"

    print(f"{m['n']} nodes ({m['n_positive']} metastatic) of {m['patients']} patients; threshold {m['threshold']:g} "
          f"({m['threshold_source']}, rule: {m['threshold_rule']})")
    print(line("model", m))
    print(line(f"size>={m['size_rule']['threshold_mm']:g}mm", m["size_rule"]))
    cal = m["calibration"]
    print(f"calibration: Brier {_fmt(cal['brier'])}  ECE {_fmt(cal['ece'])} ({cal['n_bins']} equal-width bins)")
    print(f"wrote {', '.join(str(Path(args.out) / name) for name in OUTPUT_FILES)}")
    return 0
