"""LIDC-IDRI experiments: 5-fold patient-grouped out-of-fold AUC of CNN variants vs the size rules.

    python bench/lidc_experiments.py --dataset /tmp/lidc-dataset --out /tmp/lidc-work/runs grid [NAME ...]

Each configuration is one `crossval.cross_validate` on the same folds (seed 0: the folds depend
only on the patients and labels), written to OUT/NAME/ (metrics.json, predictions.csv, roc.png),
and one line is appended to OUT/summary.jsonl. `table` prints the markdown table of every run.
Compute: 2 CPU threads; 40 px patches at 0.8 mm (32 mm field of view: the largest LIDC nodule
in this set is 32 mm across) keep a 5-fold run of the small ResNet at a few minutes.

Fusion (issue 13 item 1; `crossval --fusion mean|concat`, fusion.py):

    python bench/lidc_experiments.py fusion-mean-from-cnn --cnn docs/lidc_cnn_v1_oof_predictions.csv --run OUT/fusion_mean_shipped_cnn
    python bench/lidc_experiments.py fusion-score --run DIR [--run DIR ...]

`fusion-mean-from-cnn` is `crossval --fusion mean` without retraining the CNN: the shipped
configuration's CNN is deterministic, so its OOF probabilities (the `fold` column, the same
folds) are what a `--fusion mean` run's image branch gives (checked fold by fold against a real
run); per fold the feature logistic regression is fitted on the same training part (the fold's
training patients minus the same inner validation part) and predicts the held-out fold; the
output is the mean of the two probabilities. No threshold (the CNN's validation probabilities
are not in the CSV): AUC, ECE and Brier only. `fusion-score` scores a run's predictions.csv
(`probability` and, with --fusion, `image_probability`) against both size rules, radiomics
(docs/lidc_baselines_oof.csv, same folds) and the shipped CNN, with patient-level paired CIs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LymphNodeClassifier"))

import torch  # noqa: E402

from LymphNodeClassifierLib.crossval import cross_validate, write_crossval  # noqa: E402
from LymphNodeClassifierLib.dataset import Dataset  # noqa: E402
from LymphNodeClassifierLib.patchset import build_patchset  # noqa: E402
from LymphNodeClassifierLib.training import TrainingConfig  # noqa: E402

LUNG = (-1000.0, 400.0)  # W1400 L-300: parenchyma, ground glass, solid, calcification all distinct
ABDOMEN = (-135.0, 215.0)  # the extension's default (soft tissue): lung and ground glass clip to 0
BASE = dict(architecture="resnet", views="triplanar", window=LUNG, patch_size=40, spacing_mm=(0.8, 0.8, 0.8),
            epochs=10, batch_size=32, patience=3, lr_patience=2, seed=0, num_threads=1, translation_px=3.0)
NO_AUG = dict(flips=False, rotation_degrees=0.0, translation_px=0.0)

GRID = {
    "resnet_lung_tri": {},
    "resnet_abdomen_tri": dict(window=ABDOMEN),
    "resnet_lung_axial": dict(views="axial"),
    "resnet_lung_tri_noaug": NO_AUG,
    "resnet_lung_tri_grow": dict(fov_rule="grow_to_fit"),
    "resnet_lung_tri_mask": dict(mask_channel=True),
    "custom_lung_tri": dict(architecture="custom", epochs=6),
    "resnet_lung_tri_long": dict(epochs=30, patience=6, lr_patience=3),
    "resnet_lung_tri_mask_long": dict(mask_channel=True, epochs=30, patience=6, lr_patience=3),
    # the image channels blanked (all 0 = air): what the mask's size and shape alone give a CNN
    "resnet_mask_only": dict(mask_channel=True, _blank_image=True),
    "resnet_lung_axial_mask": dict(views="axial", mask_channel=True),
    "resnet_lung_tri_mask_long_slow": dict(mask_channel=True, epochs=30, patience=6, lr_patience=3, learning_rate=5e-4, weight_decay=1e-3),
}


def run(dataset: Dataset, out: Path, name: str, overrides: dict, cache: str) -> dict:
    blank = overrides.get("_blank_image", False)
    config = TrainingConfig(**{**BASE, **{k: v for k, v in overrides.items() if not k.startswith("_")}})
    patchset = build_patchset(dataset, config.patch_spec(), config.window, cache_dir=cache)
    if blank:
        patchset.x = patchset.x.copy()
        patchset.x[:, :-1] = 0.0
    t0 = time.perf_counter()
    result = cross_validate(patchset, config, folds=5, seed=0, inner_val_fraction=0.2, n_boot=1000)
    result.metrics["experiment"] = name
    write_crossval(result, out / name, title=f"LIDC-IDRI: {name}")
    line = summary_line(name, result.metrics, time.perf_counter() - t0, overrides)
    with open(out / "summary.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(json.dumps(line), flush=True)
    return line


def summary_line(name: str, m: dict, seconds: float, overrides: dict) -> dict:
    return {
        "name": name, "auc": m["auc"], "auc_ci": m["ci95"]["auc"], "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
        "specificity": m["specificity"], "per_fold_auc": m["per_fold_auc"], "ece": m["calibration"]["ece"], "brier": m["calibration"]["brier"],
        "short_axis_auc": m["size_rules"]["short_axis_mm"]["auc"], "short_axis_ci": m["size_rules"]["short_axis_mm"]["ci95"]["auc"],
        "long_axis_auc": m["size_rules"]["long_axis_mm"]["auc"], "long_axis_ci": m["size_rules"]["long_axis_mm"]["ci95"]["auc"],
        "minus_long": m["size_rules"]["long_axis_mm"]["model_minus_rule_auc"],
        "epochs": [f["epochs_run"] for f in m["fold_details"]], "best_epochs": [f["best_epoch"] for f in m["fold_details"]],
        "fov_grown": m["dataset"].get("fov_grown"), "seconds": round(seconds, 1),
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
    }


def record(out: Path, name: str, run_dir: Path) -> None:
    """Append a `crossval` command's output folder (e.g. the shipped configuration's run) to the summary."""
    m = json.loads((run_dir / "metrics.json").read_text())
    with open(out / "summary.jsonl", "a") as handle:
        handle.write(json.dumps(summary_line(name, m, m.get("seconds", 0.0), {"command": m.get("command", "")})) + "\n")


def table(out: Path) -> str:
    rows = {}
    for text in (out / "summary.jsonl").read_text().splitlines():
        line = json.loads(text)
        rows[line["name"]] = line  # the latest run of a name
    f = lambda v, ci: f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    lines = ["| configuration | CNN OOF AUC [95 % CI] | long-axis rule AUC | short-axis rule AUC | CNN - long axis [95 % CI] | acc / sens / spec | min per-fold AUC | time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        d = r["minus_long"]
        lines.append(f"| {name} | {f(r['auc'], r['auc_ci'])} | {f(r['long_axis_auc'], r['long_axis_ci'])} | {f(r['short_axis_auc'], r['short_axis_ci'])} | "
                     f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {r['accuracy']:.3f} / {r['sensitivity']:.3f} / {r['specificity']:.3f} | "
                     f"{min(r['per_fold_auc']):.3f} | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def suspects(dataset: Dataset, run_dir: Path, image_path: Path, top: int = 12, features_csv: Path | None = None) -> dict:
    """Label-issue check on the real set: rank nodes by the out-of-fold disagreement |label - p|
    (the plain OOF ranking of the shipped cross-validation run) and
    measure how many nodules whose two LIDC label columns disagree (Diagnosis Malign with
    Malignancy_value <= 3, or Benign with 4-5) land in the top 20 %, against the 20 % of chance.
    The same for a size-only ranking (OOF logistic regression on the long axis, same folds), so a
    finding that size alone explains is not credited to the CNN. With `features_csv` (the
    suspects.csv of `suspects --method features` on the same dataset) its ranking is scored too.
    Draws the top suspects."""
    import csv as _csv

    import numpy as np
    import SimpleITK as sitk
    from scipy.stats import hypergeom
    from sklearn.linear_model import LogisticRegression

    from LymphNodeClassifierLib.geometry import prepare_label_image
    from LymphNodeClassifierLib.nodes import extract_nodes
    from LymphNodeClassifierLib.patches import PatchSpec, extract_patches
    from LymphNodeClassifierLib.report import patch_montage

    rows = list(_csv.DictReader((run_dir / "predictions.csv").open()))
    raw = json.loads(dataset.path.read_text())  # the LIDC columns survive import as extra node fields
    extra = {(n["case_id"], int(n["label_value"])): n for n in raw["nodes"]}
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    fold = np.array([int(r["fold"]) for r in rows])
    long_axis = np.array([float(r["long_axis_mm"]) for r in rows])
    nodes = [extra[(r["case_id"], int(r["label_value"]))] for r in rows]
    diagnosis = np.array([n["Diagnosis"] for n in nodes])
    score = np.array([int(n["Malignancy_value"]) for n in nodes])
    disagree = ((diagnosis == "Malign") & (score <= 3)) | ((diagnosis == "Benign") & (score >= 4))
    p_size = np.zeros_like(p)
    for k in np.unique(fold):
        fit = LogisticRegression().fit(np.log(long_axis[fold != k])[:, None], y[fold != k])
        p_size[fold == k] = fit.predict_proba(np.log(long_axis[fold == k])[:, None])[:, 1]
    n = y.size
    top_n = int(round(0.2 * n))
    out = {"nodes": n, "disagreeing": int(disagree.sum()), "top_n": top_n, "chance_share": top_n / n}
    orders = {"cnn_oof": np.argsort(-np.abs(y - p), kind="stable"), "size_only_oof": np.argsort(-np.abs(y - p_size), kind="stable")}
    if features_csv is not None:
        rank = {(r["case_id"], int(r["label_value"])): int(r["rank"]) for r in _csv.DictReader(Path(features_csv).open())}
        orders["features_finder"] = np.argsort([rank[(r["case_id"], int(r["label_value"]))] for r in rows], kind="stable")
    for name, order in orders.items():
        hits = int(disagree[order[:top_n]].sum())
        out[name] = {
            "in_top20": hits, "share_in_top20": hits / max(1, int(disagree.sum())),
            "p_value_hypergeom": float(hypergeom.sf(hits - 1, n, int(disagree.sum()), top_n)),
            "by_malignancy_value_in_top20": {str(v): int((disagree & (score == v))[order[:top_n]].sum()) for v in (1, 2, 3)},
        }
    out["disagreeing_by_malignancy_value"] = {str(v): int((disagree & (score == v)).sum()) for v in (1, 2, 3, 4, 5)}
    order = np.argsort(-np.abs(y - p), kind="stable")[:top]
    spec = PatchSpec(spacing_mm=(0.8, 0.8, 0.8), size=40, views="triplanar")
    patches, titles, probs = [], [], []
    for i in order:
        r = rows[i]
        case = dataset.case(r["case_id"])
        ct = sitk.ReadImage(str(dataset.ct_path(case)))
        labels, _, _ = prepare_label_image(ct, sitk.ReadImage(str(dataset.labels_path(case))))
        infos, component = extract_nodes(labels, per_label_value=True)
        info = [x for x in infos if x.label_value == int(r["label_value"])]
        patches += extract_patches(ct, component, info, spec, LUNG)
        node = nodes[i]
        titles.append(f"{r['case_id']}\nDiagnosis {node['Diagnosis']}\nMalignancy {node['Malignancy_value']}/5"
                      f"\nOOF p = {p[i]:.2f}\nlong axis {long_axis[i]:.1f} mm" + ("\nCOLUMNS DISAGREE" if disagree[i] else ""))
        probs.append(float(p[i]))
    patch_montage(patches, image_path, probabilities=probs, titles=titles)
    out["top"] = [{"case_id": rows[i]["case_id"], "label": int(y[i]), "diagnosis": str(diagnosis[i]), "malignancy_value": int(score[i]),
                   "oof_probability": float(p[i]), "long_axis_mm": float(long_axis[i]), "columns_disagree": bool(disagree[i])} for i in order]
    return out


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def fusion_mean_from_cnn(dataset: Dataset, cnn_csv: Path, run_dir: Path, cache: str, inner_val: float = 0.2, seed: int = 0) -> Path:
    """predictions.csv of `crossval --fusion mean` from the CNN's OOF probabilities (module docstring)."""
    import numpy as np

    from LymphNodeClassifierLib.fileio import atomic_write_text, csv_text
    from LymphNodeClassifierLib.fusion import attach_features, fit_feature_logistic
    from LymphNodeClassifierLib.training import _one_fold

    config = TrainingConfig(**{**BASE, "mask_channel": True, "fusion": "mean"})
    patchset = attach_features(dataset, build_patchset(dataset, config.patch_spec(), config.window, cache_dir=cache), config, cache)
    rows = {(r["case_id"], int(r["label_value"])): r for r in _read_csv(cnn_csv)}
    order = [rows[(str(c), int(v))] for c, v in zip(patchset.case_ids, patchset.label_values)]
    fold = np.array([int(r["fold"]) for r in order])
    cnn = np.array([float(r["probability"]) for r in order])
    y, groups = patchset.y.astype(np.int64), np.asarray(patchset.patient_ids).astype(str)
    assert (y == np.array([int(r["label"]) for r in order])).all()
    feature_p, chosen = np.full(y.size, np.nan), []
    for k in np.unique(fold):
        test, rest = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        validation = _one_fold(rest, y, groups, inner_val, seed + 1000 + int(k))  # crossval.cross_validate's inner split
        train_idx = np.setdiff1d(rest, validation)
        fitted = fit_feature_logistic(patchset.node_features[train_idx], y[train_idx], groups[train_idx], seed=seed + int(k))
        feature_p[test] = fitted["pipeline"].predict_proba(patchset.node_features[test])[:, 1]
        chosen.append(fitted["C"])
    out = [{**{key: order[i][key] for key in ("case_id", "patient_id", "label_value", "fold", "label", "short_axis_mm", "long_axis_mm")},
            "probability": 0.5 * (cnn[i] + feature_p[i]), "image_probability": cnn[i], "feature_probability": feature_p[i]} for i in range(y.size)]
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "predictions.csv", csv_text(out, list(out[0])))
    print(json.dumps({"run": str(run_dir), "C_per_fold": chosen}), flush=True)
    return run_dir


def fusion_score(run_dir: Path, baselines_csv: Path, cnn_csv: Path) -> dict:
    """AUC [CI], differences to the size rules, radiomics and the shipped CNN [paired CIs], ECE, Brier of a run."""
    import numpy as np

    from LymphNodeClassifierLib.crossval import paired_auc_difference
    from LymphNodeClassifierLib.metrics import bootstrap_ci, calibration
    from sklearn.metrics import roc_auc_score

    rows = _read_csv(run_dir / "predictions.csv")
    base = {r["case_id"]: r for r in _read_csv(baselines_csv)}
    cnn = {r["case_id"]: r for r in _read_csv(cnn_csv)}
    assert all(int(base[r["case_id"]]["fold"]) == int(r["fold"]) for r in rows), "not the baselines' folds"
    y = np.array([int(r["label"]) for r in rows])
    groups = np.array([r["patient_id"] for r in rows])
    references = {
        "long_axis": np.array([float(r["long_axis_mm"]) for r in rows]), "short_axis": np.array([float(r["short_axis_mm"]) for r in rows]),
        "radiomics_all": np.array([float(base[r["case_id"]]["radiomics_all"]) for r in rows]),
        "shipped_cnn": np.array([float(cnn[r["case_id"]]["probability"]) for r in rows]),
    }
    out = {"run": str(run_dir)}
    for column in ("probability", "image_probability"):
        if column not in rows[0]:
            continue
        p = np.array([float(r[column]) for r in rows])
        cal = calibration(y, p, n_boot=0, groups=groups)
        out[column] = {
            "auc": float(roc_auc_score(y, p)), "auc_ci95": list(bootstrap_ci(y, p, 0.5, n_boot=1000, seed=0, groups=groups)["auc"]),
            "ece": cal["ece"], "brier": cal["brier"],
            "minus": {name: paired_auc_difference(y, p, ref, groups, 1000, 0) for name, ref in references.items()},
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="/tmp/lidc-dataset")
    parser.add_argument("--out", default="/tmp/lidc-work/runs")
    parser.add_argument("--cache", default="/tmp/lidc-work/cache")
    parser.add_argument("what", choices=["grid", "table", "suspects", "record", "fusion-mean-from-cnn", "fusion-score"])
    parser.add_argument("--cnn", default="docs/lidc_cnn_v1_oof_predictions.csv", help="fusion: the CNN-only model 1.0.0's OOF predictions (same folds)")
    parser.add_argument("--baselines", default="docs/lidc_baselines_oof.csv", help="fusion-score: every baseline's OOF probability")
    parser.add_argument("--run", default=None, action="append", help="suspects: the crossval output folder to rank; fusion-*: the run folder(s)")
    parser.add_argument("--image", default="docs/images/lidc_top_suspects.png")
    parser.add_argument("--features-suspects", default=None, help="suspects: suspects.csv of `suspects --method features` to score as well")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.what == "table":
        print(table(out))
        return 0
    if args.what == "record":  # record NAME with --run DIR
        record(out, args.names[0], Path(args.run[0]))
        return 0
    if args.what == "suspects":
        result = suspects(Dataset.load(args.dataset), Path(args.run[0]), Path(args.image),
                          features_csv=Path(args.features_suspects) if args.features_suspects else None)
        print(json.dumps(result, indent=1))
        return 0
    if args.what == "fusion-mean-from-cnn":
        fusion_mean_from_cnn(Dataset.load(args.dataset), Path(args.cnn), Path(args.run[0]), args.cache)
        return 0
    if args.what == "fusion-score":
        for run_dir in args.run:
            print(json.dumps(fusion_score(Path(run_dir), Path(args.baselines), Path(args.cnn))), flush=True)
        return 0
    torch.set_num_threads(1)  # two grid processes side by side on the 2 cores
    dataset = Dataset.load(args.dataset)
    for name in args.names or list(GRID):
        run(dataset, out, name, GRID[name], args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
