"""LIDC-IDRI: classical baselines and image + measurement stacking on the CNN's own patient folds.

    python bench/bench_radiomics.py [--data ../shared/data/lidc-nodules] [--cnn docs/lidc_cnn_v1_oof_predictions.csv]
        [--work /tmp/lidc-radiomics] [--oof-out docs/lidc_baselines_oof.csv] [--json-out FILE]

Every model here is scored out of fold on EXACTLY the folds of the CNN's cross-validation (the
`fold` column of `--cnn`, 5-fold StratifiedGroupKFold by patient, seed 0), so every number is
paired with the CNN's and the size rules' on the same 603 nodes:

- size rules: the mask's long and short axis (`nodes.py`, the CSV's columns), AUC of the raw mm;
- radiomics (what a SlicerRadiomics user would do): pyradiomics 3 shape, first-order and texture
  (GLCM, GLRLM, GLSZM, GLDM, NGTDM) features of each crop, resampled to 1 mm isotropic (linear),
  bin width 25 HU, the whole mask of the file as one nodule; shape only, and all classes;
- node_features: the project's own 22 shape / attenuation features (`node_features.py`, the
  suspect finder's);
- stacking: the CNN's out-of-fold logit joined with measured features (`node_features`, or the
  two axes, or the radiomics features);
- means: the plain average of the CNN's and a classical model's OOF probabilities (no fitting).

Each model: median imputation, standardisation, L2 logistic regression; its C is chosen INSIDE
each outer training part by a 4-fold patient-grouped inner CV (AUC), then the model is refit on
the whole outer training part and predicts the held-out fold. No test fold ever chooses anything.
The stacker's CNN input is the CNN's OOF logit: on a training node it comes from a CNN fold model
that did see the held-out fold's patients (the CNN run was not nested), a second-order leak of a
few coefficients that this script cannot remove without 20 more CNN trainings (said in the docs).

CIs: patient-level (cluster) percentile bootstrap, 1000 resamples (`metrics.bootstrap_ci`);
differences: paired on the same resamples (`crossval.paired_auc_difference`). Calibration:
`metrics.calibration` (Brier, ECE, 10 bins). Writes `--oof-out` (one OOF probability per node and
model; every AUC in docs/LIDC_RESULTS.md can be recomputed from it) and prints a markdown table.
Features are cached in `--work` (pyradiomics ~0.2 s per crop on one thread).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LymphNodeClassifier"))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from LymphNodeClassifierLib.crossval import paired_auc_difference  # noqa: E402
# the fused model's feature branch (fusion.py) and this baseline share one model and C search
from LymphNodeClassifierLib.fusion import C_GRID, INNER_FOLDS, choose_c, logistic_model  # noqa: E402
from LymphNodeClassifierLib.fileio import atomic_write_json, atomic_write_text, csv_text  # noqa: E402
from LymphNodeClassifierLib.metrics import bootstrap_ci, calibration  # noqa: E402

RADIOMICS_CLASSES = ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
# linear, not B-spline, resampling: B-spline extrapolates garbage (inf) on crops of 2 slices
RADIOMICS_SETTINGS = dict(binWidth=25, resampledPixelSpacing=[1, 1, 1], interpolator="sitkLinear", label=1, correctMask=True)
N_BOOT = 1000


# --------------------------------------------------------------------------------------------
# data


def read_cnn_oof(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = {key: np.array([row[key] for row in rows]) for key in ("case_id", "patient_id")}
    out["fold"] = np.array([int(row["fold"]) for row in rows])
    out["label"] = np.array([int(row["label"]) for row in rows])
    out["label_value"] = np.array([int(row["label_value"]) for row in rows])
    for key in ("probability", "short_axis_mm", "long_axis_mm"):
        out[key] = np.array([float(row[key]) for row in rows])
    return out


def radiomics_features(data: Path, case_ids: np.ndarray, cache: Path) -> tuple[list[str], np.ndarray]:
    """(names, (N, F)) pyradiomics features of each crop (cached as CSV)."""
    if cache.is_file():
        with open(cache, newline="", encoding="utf-8") as handle:
            rows = {row["case_id"]: row for row in csv.DictReader(handle)}
        names = [k for k in next(iter(rows.values())) if k != "case_id"]
        return names, np.array([[float(rows[c][n]) for n in names] for c in case_ids])
    import radiomics
    import SimpleITK as sitk
    from radiomics import featureextractor

    radiomics.setVerbosity(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(**RADIOMICS_SETTINGS)
    extractor.disableAllFeatures()
    for name in RADIOMICS_CLASSES:
        extractor.enableFeatureClassByName(name)
    with open(data / "labels.csv", newline="", encoding="utf-8") as handle:
        files = {row["case"]: row for row in csv.DictReader(handle)}
    table, started = [], time.perf_counter()
    for n, case_id in enumerate(case_ids, start=1):
        row = files[case_id]
        # float: pyradiomics 3.0 computes its bin edges in the image's own type, which overflows for int16 under numpy 2
        image = sitk.Cast(sitk.ReadImage(str(data / row["image"])), sitk.sitkFloat32)
        mask = sitk.Cast(sitk.ReadImage(str(data / row["mask"])) > 0, sitk.sitkUInt8)  # one nodule per file
        values = extractor.execute(image, mask)
        table.append({"case_id": case_id, **{k: float(v) for k, v in values.items() if not k.startswith("diagnostics")}})
        if n % 100 == 0:
            print(f"radiomics: {n}/{len(case_ids)} crops, {time.perf_counter() - started:.0f} s", flush=True)
    names = [k for k in table[0] if k != "case_id"]
    atomic_write_text(cache, csv_text(table, ["case_id", *names]))
    return names, np.array([[row[name] for name in names] for row in table])


def project_features(data: Path, cnn: dict, work: Path) -> tuple[list[str], np.ndarray]:
    """(names, (N, F)) `node_features` of each node, on the dataset made by the `import` command (cached)."""
    from LymphNodeClassifierLib.node_features import FEATURE_NAMES, feature_matrix

    cache = work / "node_features.csv"
    if cache.is_file():
        with open(cache, newline="", encoding="utf-8") as handle:
            rows = {row["case_id"]: row for row in csv.DictReader(handle)}
        return list(FEATURE_NAMES), np.array([[float(rows[c][n]) for n in FEATURE_NAMES] for c in cnn["case_id"]])
    from LymphNodeClassifierLib import cli
    from LymphNodeClassifierLib.dataset import Dataset

    folder = work / "dataset"
    if not (folder / "dataset.json").is_file():
        cli.main(["import", "--labels", str(data / "labels.csv"), "--root", str(data), "--out", str(folder), "--label-col", "Diagnosis",
                  "--positive", "Malign", "--negative", "Benign", "--patient-col", "patient_id", "--case-col", "case"])
    matrix = feature_matrix(Dataset.load(folder), cnn["case_id"], cnn["label_value"])
    rows = [{"case_id": c, **dict(zip(FEATURE_NAMES, (float(v) for v in values)))} for c, values in zip(cnn["case_id"], matrix)]
    atomic_write_text(cache, csv_text(rows, ["case_id", *FEATURE_NAMES]))
    return list(FEATURE_NAMES), matrix


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


# --------------------------------------------------------------------------------------------
# nested out-of-fold logistic regression


def nested_oof(x: np.ndarray, y: np.ndarray, groups: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """OOF probabilities on the given outer folds; C chosen inside each outer training part."""
    oof, chosen = np.full(y.size, np.nan), []
    for k in np.unique(fold):
        train, test = fold != k, fold == k
        c = choose_c(x[train], y[train], groups[train], seed=int(k))
        oof[test] = logistic_model(c).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
        chosen.append(c)
    return oof, chosen


# --------------------------------------------------------------------------------------------
# report


def score_block(y: np.ndarray, score: np.ndarray, groups: np.ndarray, fold: np.ndarray, references: dict[str, np.ndarray],
                probability: bool) -> dict:
    scaled = (score - score.min()) / ((score.max() - score.min()) or 1.0)  # ranks (AUC) unchanged
    out = {
        "auc": float(roc_auc_score(y, score)),
        "auc_ci95": list(bootstrap_ci(y, scaled, 0.5, n_boot=N_BOOT, seed=0, groups=groups)["auc"]),
        "per_fold_auc": [float(roc_auc_score(y[fold == k], score[fold == k])) for k in np.unique(fold)],
        "minus": {name: paired_auc_difference(y, score, ref, groups, N_BOOT, 0) for name, ref in references.items()},
    }
    if probability:
        cal = calibration(y, score, n_boot=N_BOOT, seed=0, groups=groups)
        out["calibration"] = {key: cal[key] for key in ("brier", "ece", "ci95")}
    return out


def _ci(pair) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]" if pair else ""


def markdown(results: dict) -> str:
    lines = ["| model | OOF AUC [95 % CI] | − long axis [95 % CI] | − short axis | − radiomics (all) | − CNN | ECE | Brier | C per fold |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, block in results.items():
        minus = block["minus"]
        cells = [f"{minus[ref]['difference']:+.3f} {_ci(minus[ref]['ci95'])}" if ref in minus else "—"
                 for ref in ("long_axis", "short_axis", "radiomics_all", "cnn")]
        cal = block.get("calibration")
        lo, hi = block["auc_ci95"]
        lines.append(f"| {name} | {block['auc']:.3f} [{lo:.3f}, {hi:.3f}] | " + " | ".join(cells) + " | "
                     + (f"{cal['ece']:.3f} | {cal['brier']:.3f}" if cal else "— | —") + " | "
                     + (", ".join(f"{c:g}" for c in block.get("c_per_fold", [])) or "—") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lidc-nodules"))
    parser.add_argument("--cnn", default=str(ROOT / "docs" / "lidc_cnn_v1_oof_predictions.csv"), help="the CNN's crossval predictions.csv")
    parser.add_argument("--work", default="/tmp/lidc-radiomics", help="feature caches and the imported dataset")
    parser.add_argument("--oof-out", default=None, help="CSV of every model's OOF probability per node")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    data, work = Path(args.data), Path(args.work)
    if not (data / "labels.csv").is_file():
        print(f"no LIDC data at {data}: pass --data ../shared/data/lidc-nodules", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    cnn = read_cnn_oof(Path(args.cnn))
    y, groups, fold = cnn["label"], cnn["patient_id"], cnn["fold"]
    for k in np.unique(fold):  # the folds must group patients, or nothing below is out of fold
        assert not set(groups[fold == k]) & set(groups[fold != k]), "a patient in two folds"

    started = time.perf_counter()
    rad_names, rad = radiomics_features(data, cnn["case_id"], work / "radiomics.csv")
    node_names, node = project_features(data, cnn, work)
    print(f"features: {rad.shape[1]} radiomics, {node.shape[1]} node_features, {time.perf_counter() - started:.0f} s", flush=True)
    shape = np.array([n.startswith("original_shape_") for n in rad_names])
    rad = np.where(np.isfinite(rad), rad, np.nan)
    cnn_logit = logit(cnn["probability"])[:, None]
    axes = np.log(np.stack([cnn["long_axis_mm"], cnn["short_axis_mm"]], axis=1))

    references = {"long_axis": cnn["long_axis_mm"], "short_axis": cnn["short_axis_mm"]}
    results: dict[str, dict] = {}
    results["long_axis (rule)"] = score_block(y, cnn["long_axis_mm"], groups, fold, {"short_axis": cnn["short_axis_mm"]}, False)
    results["short_axis (rule)"] = score_block(y, cnn["short_axis_mm"], groups, fold, {"long_axis": cnn["long_axis_mm"]}, False)
    oof_columns: dict[str, np.ndarray] = {}
    designs = {
        "radiomics_shape": rad[:, shape],
        "radiomics_all": rad,
        "node_features": node,
        "stack_cnn+axes": np.hstack([cnn_logit, axes]),
        "stack_cnn+node_features": np.hstack([cnn_logit, node]),
        "stack_cnn+radiomics_shape": np.hstack([cnn_logit, rad[:, shape]]),
        "stack_cnn+radiomics_all": np.hstack([cnn_logit, rad]),
        "stack_cnn+node_features+radiomics_all": np.hstack([cnn_logit, node, rad]),
    }
    for name, x in designs.items():
        t0 = time.perf_counter()
        oof_columns[name], chosen = nested_oof(x, y, groups, fold)
        print(f"{name}: OOF AUC {roc_auc_score(y, oof_columns[name]):.3f}, C {chosen}, {time.perf_counter() - t0:.0f} s", flush=True)
        results[name] = {"c_per_fold": chosen, "features": int(x.shape[1])}
    # parameter-free ensembles of OOF probabilities (nothing fitted, so nothing to leak): the mean
    for name, parts in (("mean_cnn+node_features", ("node_features",)), ("mean_cnn+radiomics_all", ("radiomics_all",)),
                        ("mean_cnn+node_features+radiomics_all", ("node_features", "radiomics_all"))):
        oof_columns[name] = np.mean([cnn["probability"], *(oof_columns[p] for p in parts)], axis=0)
        results[name] = {"features": 0}
        designs[name] = None
        print(f"{name}: OOF AUC {roc_auc_score(y, oof_columns[name]):.3f}", flush=True)
    # the CNN and every model against the same references
    refs_all = {**references, "cnn": cnn["probability"], "radiomics_all": oof_columns["radiomics_all"]}
    results["cnn (shipped, OOF)"] = score_block(y, cnn["probability"], groups, fold, {k: v for k, v in refs_all.items() if k != "cnn"}, True)
    for name in designs:
        own = {k: v for k, v in refs_all.items() if k != name}
        results[name] = {**score_block(y, oof_columns[name], groups, fold, own, True), **results[name]}
    order = ["long_axis (rule)", "short_axis (rule)", "cnn (shipped, OOF)", *designs]
    results = {name: results[name] for name in order}
    print(markdown(results))
    if args.oof_out:
        rows = [{"case_id": cnn["case_id"][i], "patient_id": groups[i], "fold": int(fold[i]), "label": int(y[i]),
                 "cnn": float(cnn["probability"][i]), "long_axis_mm": float(cnn["long_axis_mm"][i]),
                 "short_axis_mm": float(cnn["short_axis_mm"][i]), **{name: float(oof_columns[name][i]) for name in designs}}
                for i in range(y.size)]
        atomic_write_text(args.oof_out, csv_text(rows, ["case_id", "patient_id", "fold", "label", "cnn", "long_axis_mm", "short_axis_mm", *designs]))
    if args.json_out:
        atomic_write_json(args.json_out, {"results": results, "radiomics_settings": RADIOMICS_SETTINGS, "radiomics_classes": RADIOMICS_CLASSES,
                                          "c_grid": C_GRID, "inner_folds": INNER_FOLDS, "bootstrap": N_BOOT,
                                          "seconds": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
