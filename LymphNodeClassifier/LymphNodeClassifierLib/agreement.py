"""Inter-reader agreement: Cohen's kappa between every pair of readers, and between the model and
each reader, on the nodes both labelled; the nodes they disagree on.

`curate --dataset D --agreement [--predictions CSV] [--threshold T] [--out DIR]` writes (each
atomically, into DIR, default the dataset folder):

- `agreement.json`: per pair (`reader_pairs`, `model_vs_readers`): `n` nodes both labelled, the
  2 x 2 counts, `observed_agreement` and `kappa` (`sklearn.metrics.cohen_kappa_score`, unweighted,
  labels 0 / 1); a kappa that is undefined (no shared node, or both raters gave every shared node
  the same single label, so chance agreement is 1) is null with `kappa_undefined` saying why;
- `disagreements.csv`: one row per node and pair that disagree (DISAGREEMENT_COLUMNS).

The readers' labels are each reader's current read (`curation.node_reads`); excluded nodes and
nodes of excluded cases are left out. The model's label is its thresholded probability from a
predictions table (`evaluate`'s predictions.csv or `classify --dataset`'s nodes.csv): its
`prediction` column (the model card's decision threshold) unless `--threshold` is given, else
probability >= 0.5; a node with several rows (components of one label value) takes the highest.
"""

from __future__ import annotations

import math
import os
import warnings
from itertools import combinations
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score

from .curation import label_source, node_reads, read_table
from .dataset import Dataset
from .errors import InputError
from .fileio import atomic_write_json, atomic_write_text, csv_text, ensure_folder

MODEL = "model"  # the model's name as a rater
DEFAULT_THRESHOLD = 0.5
OUTPUT_FILES = ("agreement.json", "disagreements.csv")
DISAGREEMENT_COLUMNS = (
    "case_id", "patient_id", "label_value", "rater_a", "label_a", "rater_b", "label_b", "dataset_label", "label_source", "probability",
)
Key = tuple[str, int]


def read_predictions(path: str | os.PathLike, threshold: float | None = None) -> tuple[dict[Key, int], dict[Key, float], str]:
    """(model label per node, probability per node where the table has one, a description) from a
    predictions table with `case_id`, `label_value` and `probability` and / or `prediction`."""
    path = Path(path)
    if threshold is not None and not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
        raise InputError(f"--threshold {threshold} is not a probability between 0 and 1; pass e.g. 0.5.")
    fix = "pass evaluate's predictions.csv or classify --dataset's nodes.csv"
    rows = read_table(path, "predictions file", {"case_id", "label_value"}, fix)
    use_prediction = threshold is None and bool(rows) and "prediction" in rows[0]
    if rows and ("prediction" if use_prediction else "probability") not in rows[0]:
        raise InputError(f"The predictions file {path} has no probability column; {fix}.")
    labels: dict[Key, int] = {}
    probabilities: dict[Key, float] = {}
    for number, row in enumerate(rows, start=2):
        try:
            key = (row["case_id"], int(row["label_value"]))
            probability = float(row["probability"]) if (row.get("probability") or "").strip() else None
            if use_prediction:
                label = int(row["prediction"])
                if label not in (0, 1):
                    raise ValueError
            else:
                if probability is None or not math.isfinite(probability):
                    raise ValueError
                label = int(probability >= (DEFAULT_THRESHOLD if threshold is None else threshold))
        except (TypeError, ValueError):
            raise InputError(f"Row {number} of {path} has no valid label_value, probability or prediction; fix the row or recreate the file.") from None
        labels[key] = max(label, labels.get(key, 0))
        if probability is not None:
            probabilities[key] = max(probability, probabilities.get(key, -math.inf))
    rule = "its prediction column" if use_prediction else f"probability >= {DEFAULT_THRESHOLD if threshold is None else threshold}"
    return labels, probabilities, f"{path} ({rule})"


def pair_agreement(rater_a: str, rater_b: str, labels_a: list[int], labels_b: list[int]) -> dict:
    """Cohen's kappa, the 2 x 2 counts and the observed agreement of two raters on the same nodes."""
    a, b = np.asarray(labels_a, dtype=int), np.asarray(labels_b, dtype=int)
    n = int(a.size)
    out = {
        "rater_a": rater_a, "rater_b": rater_b, "n": n,
        "both_metastatic": int(np.sum((a == 1) & (b == 1))), "both_benign": int(np.sum((a == 0) & (b == 0))),
        "only_a_metastatic": int(np.sum((a == 1) & (b == 0))), "only_b_metastatic": int(np.sum((a == 0) & (b == 1))),
        "observed_agreement": float(np.mean(a == b)) if n else None, "kappa": None,
    }
    if n == 0:
        out["kappa_undefined"] = "no node labelled by both"
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when kappa is undefined; we say why below
        kappa = float(cohen_kappa_score(a, b, labels=[0, 1]))
    if math.isnan(kappa):
        out["kappa_undefined"] = "both gave every shared node the same single label (chance agreement is 1)"
    else:
        out["kappa"] = kappa
    return out


def agreement_report(dataset: Dataset, model_labels: dict[Key, int] | None = None, probabilities: dict[Key, float] | None = None,
                     model_source: str | None = None) -> tuple[dict, list[dict]]:
    """(agreement.json's content, disagreements.csv's rows) of a dataset's readers (and a model)."""
    probabilities = probabilities or {}
    nodes = [node for node in dataset.nodes if not node.excluded and not dataset.case(node.case_id).excluded]
    reads = {node.key: node_reads(node) for node in nodes}
    readers = sorted({reader for node_reads_ in reads.values() for reader in node_reads_})
    model = MODEL if MODEL not in readers else f"{MODEL} (predictions)"  # a reader may be called "model"
    raters = [(a, b) for a, b in combinations(readers, 2)]
    if model_labels is not None:
        raters += [(model, reader) for reader in readers]

    def label_of(rater: str, key: Key) -> int | None:
        return model_labels.get(key) if rater == model else reads[key].get(rater)

    pairs, disagreements = [], []
    for a, b in raters:
        keys = [node.key for node in nodes if label_of(a, node.key) is not None and label_of(b, node.key) is not None]
        pairs.append(pair_agreement(a, b, [label_of(a, key) for key in keys], [label_of(b, key) for key in keys]))
        for key in keys:
            if label_of(a, key) != label_of(b, key):
                node = dataset.node(*key)
                disagreements.append({
                    "case_id": key[0], "patient_id": dataset.case(key[0]).patient_id, "label_value": key[1],
                    "rater_a": a, "label_a": label_of(a, key), "rater_b": b, "label_b": label_of(b, key),
                    "dataset_label": "" if node.metastatic is None else node.metastatic, "label_source": label_source(node),
                    "probability": probabilities.get(key, ""),
                })
    report = {
        "dataset": str(dataset.folder),
        "kappa": "sklearn.metrics.cohen_kappa_score (unweighted, labels 0 benign / 1 metastatic) on the nodes both raters labelled",
        "nodes": len(nodes),
        "left_out": "excluded nodes and nodes of excluded cases",
        "readers": {reader: sum(reader in node_reads_ for node_reads_ in reads.values()) for reader in readers},
        "model": None if model_labels is None else {
            "name": model, "source": model_source, "nodes_with_a_prediction": sum(key in model_labels for key in reads),
        },
        "reader_pairs": [pair for pair in pairs if pair["rater_a"] != model],
        "model_vs_readers": [pair for pair in pairs if pair["rater_a"] == model],
        "disagreements": len(disagreements),
    }
    return report, disagreements


def write_agreement(report: dict, disagreements: list[dict], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write agreement.json and disagreements.csv into `out_dir` (each atomically)."""
    out_dir = ensure_folder(out_dir, f"--out {out_dir} is a file; choose a folder for agreement.json and disagreements.csv.")
    json_path, csv_path = out_dir / OUTPUT_FILES[0], out_dir / OUTPUT_FILES[1]
    atomic_write_text(csv_path, csv_text(disagreements, DISAGREEMENT_COLUMNS))
    atomic_write_json(json_path, report)
    return json_path, csv_path


def report_lines(report: dict) -> list[str]:
    """The report as lines for the terminal."""
    lines = [f"{report['nodes']} nodes (not excluded); readers: "
             + (", ".join(f"{name} ({count} nodes)" for name, count in report["readers"].items()) or "none yet")]
    if report["model"] is None:
        lines.append("model: no predictions given (--predictions: evaluate's predictions.csv or classify --dataset's nodes.csv)")
    else:
        lines.append(f"model: {report['model']['source']}, {report['model']['nodes_with_a_prediction']} nodes with a prediction")
    for pair in report["reader_pairs"] + report["model_vs_readers"]:
        kappa = f"kappa {pair['kappa']:.3f}" if pair["kappa"] is not None else f"kappa undefined ({pair['kappa_undefined']})"
        counts = "" if not pair["n"] else (
            f"; agree {pair['both_metastatic'] + pair['both_benign']} (both metastatic {pair['both_metastatic']}, both benign "
            f"{pair['both_benign']}), only {pair['rater_a']} metastatic {pair['only_a_metastatic']}, only {pair['rater_b']} metastatic "
            f"{pair['only_b_metastatic']}")
        lines.append(f"{pair['rater_a']} vs {pair['rater_b']}: {kappa} on {pair['n']} nodes{counts}")
    lines.append(f"{report['disagreements']} disagreements (node and pair)")
    return lines
