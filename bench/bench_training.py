"""Training benchmark: seconds to train on ~1,000 phantom node patches on 2 CPU threads, and the
held-out AUC reached, against the short-axis size rule on the same held-out nodes (the baseline).

    python bench/bench_training.py [--cases 260] [--held-out-cases 40] [--threads 2] [--work DIR]

The cohorts are generated once into --work (default .cache/bench_training, git-ignored) and
reused; patch extraction is timed separately from training. Target (README figure): training
<= 120 s to a held-out AUC >= 0.90, above the size rule.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "LymphNodeClassifier"))

from LymphNodeClassifierLib.dataset import Dataset  # noqa: E402
from LymphNodeClassifierLib.patchset import build_patchset  # noqa: E402
from LymphNodeClassifierLib.phantoms import generate_cohort  # noqa: E402
from LymphNodeClassifierLib.training import TrainingConfig, evaluate, predict_probabilities, train  # noqa: E402

TRAIN_SEED = 900  # never used by the bundled model or its tests
HELD_OUT_SEED = 901


def cohort(folder: Path, cases: int, seed: int) -> tuple[Dataset, float]:
    if (folder / "dataset.json").is_file():
        dataset = Dataset.load(folder)
        if dataset.generator and dataset.generator.get("cases") == cases and dataset.generator.get("seed") == seed:
            return dataset, 0.0
        raise SystemExit(f"{folder} holds another cohort; remove it or choose another --work folder")
    start = time.perf_counter()
    dataset = generate_cohort(folder, cases=cases, seed=seed)
    return dataset, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=260, help="training cohort studies (about 4-5 nodes each)")
    parser.add_argument("--held-out-cases", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=TrainingConfig().epochs)
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench_training"))
    args = parser.parse_args()
    work = Path(args.work)

    train_set, gen_train = cohort(work / f"train-{TRAIN_SEED}-{args.cases}", args.cases, TRAIN_SEED)
    held_set, gen_held = cohort(work / f"held-{HELD_OUT_SEED}-{args.held_out_cases}", args.held_out_cases, HELD_OUT_SEED)
    config = TrainingConfig(num_threads=args.threads, epochs=args.epochs, seed=0)

    start = time.perf_counter()
    patchset = build_patchset(train_set, config.patch_spec(), config.window)
    held = build_patchset(held_set, config.patch_spec(), config.window)
    extract = time.perf_counter() - start

    result = train(patchset, config)
    probability = predict_probabilities(result.model, held.x)
    metrics = evaluate(probability, held, result.decision_threshold, n_boot=200)

    per_epoch = sum(h["seconds"] for h in result.history) / len(result.history)
    print(f"generation       {gen_train + gen_held:7.1f} s  (0 = reused from {work})")
    print(f"patch extraction {extract:7.1f} s  ({len(patchset)} training + {len(held)} held-out nodes)")
    print(f"training         {result.seconds:7.1f} s  ({result.epochs_run} epochs, {per_epoch:.1f} s/epoch, best {result.best_epoch}, "
          f"{len(result.splits['train'])} training nodes, {args.threads} threads, {config.architecture}/{config.views})")
    print(f"held-out AUC     {metrics['auc']:7.3f}    (95% CI {metrics['ci95']['auc'][0]:.3f}-{metrics['ci95']['auc'][1]:.3f}, {metrics['n']} nodes)")
    print(f"size-rule AUC    {metrics['size_rule_auc']:7.3f}    (short axis, same nodes); model / size rule = {metrics['auc'] / metrics['size_rule_auc']:.3f}")
    ok = result.seconds <= 120 and metrics["auc"] >= 0.90 and metrics["auc"] > metrics["size_rule_auc"]
    print(f"target (<= 120 s to AUC >= 0.90, above the size rule): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
