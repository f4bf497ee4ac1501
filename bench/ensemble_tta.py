"""LIDC-IDRI: seed ensembles and test-time augmentation, out of fold on the shipped CNN's folds.

    python bench/ensemble_tta.py RUN [RUN ...] [--shipped docs/lidc_cnn_v1_oof_predictions.csv]
        [--baselines docs/lidc_baselines_oof.csv] [--bootstrap 1000] [--json-out FILE]

Each RUN is a `crossval --tta MODE [--ensemble K] [--first-member M]` output folder (its
`member_logits.csv`: every node's out-of-fold logit from each member under every TTA mode, and
`predictions.csv`). The runs' members are pooled in order (a run with `--first-member 1` adds
seed 1 to a run of member 0 on the same folds), then every (members 1..K) x (TTA mode) variant
is scored: OOF AUC with its patient-bootstrap 95 % CI, the paired differences to the long axis,
to the first run's seed-0 model without TTA (the gain of seeds / TTA on the same folds), to the
CNN-only 1.0.0 model's OOF probabilities (`--shipped`, the same nodes and folds) and to the
best classical combination so far (mean of CNN and node-feature model, `--baselines`), Brier
score and ECE; and, unfitted, the mean of each variant's probability with the node-feature
model's OOF probability (the "fusion" mean). Nothing is chosen on a held-out fold: every variant
is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LymphNodeClassifier"))

from LymphNodeClassifierLib.crossval import _auc, _sigmoid, paired_auc_difference  # noqa: E402
from LymphNodeClassifierLib.metrics import bootstrap_ci, calibration  # noqa: E402


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_run(run: Path) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """(case ids, folds, TTA mode -> (members, N) logits) of one crossval output folder."""
    rows = read_csv(run / "member_logits.csv")
    cases = sorted({r["case_id"] for r in rows})
    index = {c: i for i, c in enumerate(cases)}
    members = sorted({int(r["member"]) for r in rows})
    modes = [key[len("logit_"):] for key in rows[0] if key.startswith("logit_")]
    logits = {mode: np.full((len(members), len(cases)), np.nan) for mode in modes}
    folds = np.full(len(cases), -1)
    for r in rows:
        i = index[r["case_id"]]
        folds[i] = int(r["fold"])
        for mode in modes:
            logits[mode][members.index(int(r["member"])), i] = float(r[f"logit_{mode}"])
    return cases, folds, logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--shipped", type=Path, default=Path("docs/lidc_cnn_v1_oof_predictions.csv"))
    parser.add_argument("--baselines", type=Path, default=Path("docs/lidc_baselines_oof.csv"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    cases, folds, logits = read_run(args.runs[0])
    for run in args.runs[1:]:
        more_cases, more_folds, more = read_run(run)
        if more_cases != cases or not np.array_equal(more_folds, folds):
            raise SystemExit(f"error: {run} holds other nodes or folds than {args.runs[0]}; pool runs of one dataset with one --seed.")
        logits = {mode: np.concatenate([logits[mode], more[mode]]) for mode in logits}
    shipped = {r["case_id"]: r for r in read_csv(args.shipped)}
    baselines = {r["case_id"]: r for r in read_csv(args.baselines)}
    if set(shipped) != set(cases) or any(int(shipped[c]["fold"]) != f for c, f in zip(cases, folds)):
        raise SystemExit(f"error: {args.shipped} has other nodes or folds than the runs; run crossval with the shipped --seed 0 and --folds 5.")
    y = np.array([int(shipped[c]["label"]) for c in cases])
    groups = np.array([shipped[c]["patient_id"] for c in cases])
    long_axis = np.array([float(shipped[c]["long_axis_mm"]) for c in cases])
    cnn = np.array([float(shipped[c]["probability"]) for c in cases])
    features = np.array([float(baselines[c]["node_features"]) for c in cases])
    best_so_far = np.array([float(baselines[c]["mean_cnn+node_features"]) for c in cases])
    n_boot = args.bootstrap
    member0 = _sigmoid(logits["none"][0])  # the first run's single model without TTA: the paired reference of every gain

    def score(name: str, p: np.ndarray) -> dict:
        row = {"variant": name, "auc": _auc(y, p), "auc_ci95": list(bootstrap_ci(y, p, 0.5, n_boot=n_boot, groups=groups)["auc"])}
        for other, reference in (("long_axis", long_axis), ("seed0_no_tta", member0), ("shipped_cnn", cnn), ("mean_cnn+node_features", best_so_far)):
            d = paired_auc_difference(y, p, reference, groups, n_boot)
            row[f"minus_{other}"] = {"difference": d["difference"], "ci95": d["ci95"], "p_not_better": d["p_not_better"]}
        cal = calibration(y, p)
        row["brier"], row["ece"] = cal["brier"], cal["ece"]
        return row

    members = next(iter(logits.values())).shape[0]
    results = []
    results.append({"check": "member 0 without TTA vs the shipped CNN's OOF probabilities", "max_abs_difference": float(np.abs(member0 - cnn).max())})
    for count in range(1, members + 1):
        for mode in logits:
            p = _sigmoid(logits[mode][:count].mean(axis=0))
            results.append(score(f"{count} seed(s), tta {mode}", p))
            results.append(score(f"mean of ({count} seed(s), tta {mode}) and node_features", (p + features) / 2))

    def ci(pair) -> str:
        return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"

    print(f"{results[0]['check']}: max |difference| {results[0]['max_abs_difference']:.2e}")
    print("| variant | OOF AUC [95 % CI] | − long axis [CI] | − seed 0 without TTA [CI] | − shipped CNN [CI] | − mean CNN+node features [CI] | ECE | Brier |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results[1:]:
        print(f"| {r['variant']} | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | "
              f"{r['minus_long_axis']['difference']:+.3f} {ci(r['minus_long_axis']['ci95'])} | "
              f"{r['minus_seed0_no_tta']['difference']:+.3f} {ci(r['minus_seed0_no_tta']['ci95'] or [0.0, 0.0])} | "
              f"{r['minus_shipped_cnn']['difference']:+.3f} {ci(r['minus_shipped_cnn']['ci95'])} | "
              f"{r['minus_mean_cnn+node_features']['difference']:+.3f} {ci(r['minus_mean_cnn+node_features']['ci95'])} | "
              f"{r['ece']:.3f} | {r['brier']:.3f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
