"""Cohorts beyond one process and one machine: `classify --dataset` with `--workers N` and `--shard I/N`,
and `merge-results`, which joins the shards' outputs.

- `--workers N`: N processes on this machine (spawned, so each has its own PyTorch, its own model
  and, for the reports, its own offscreen Slicer application); each takes whole cases. Torch and
  ITK threads are split between them (`threads_per_worker`). Rows come back in the dataset's case
  order, so the outputs are those of a single-process run.
- `--shard I/N` (1 <= I <= N): this run classifies only shard I of N. The split is by patient, so
  a patient's cases stay together: the dataset's patients (`patient_id`, else the case id; of all
  cases, excluded ones too, so that every case folder has one shard to tidy it) are sorted and dealt
  round-robin, patient k (0-based, sorted order) to shard k mod N + 1. It
  depends only on dataset.json, so N machines (a Slurm array, a Kubernetes indexed job) running
  shards 1..N of the same dataset into the same `--out` split the cohort exactly, each case once.
  A shard writes its case folders (the usual layout) and `shards/shard-I-of-N.csv` + `.json`
  instead of the cohort's `nodes.csv`, which N machines could not write together; it leaves other
  shards' cases and other runs' staging folders alone (their process ids are another machine's).
- `merge-results --out DIR`: once every shard has finished, joins `shards/shard-*-of-N.*` into
  `nodes.csv` and `summary.json`, the files a single run writes, rows in the dataset's case order;
  refuses (one line) when a shard is missing or the shards are of different runs.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import InputError, OneLineArgumentParser
from .fileio import atomic_write_json, atomic_write_text, csv_text, remove_stale_staging

SHARDS_FOLDER = "shards"
SUMMARY_FILE = "summary.json"
_SHARD_NAME = re.compile(r"^shard-(\d+)-of-(\d+)\.json$")


# -- shards --------------------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`"I/N"` -> (I, N) with 1 <= I <= N; None for None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise InputError(f"--shard must be I/N with 1 <= I <= N (e.g. 2/4: the second of four shards), got '{text}'.")
    return int(match.group(1)), int(match.group(2))


def shard_of_patients(patient_ids: Sequence[str], count: int) -> dict[str, int]:
    """{patient id: shard 1..count}: sorted patients dealt round-robin (balanced, deterministic)."""
    return {patient: k % count + 1 for k, patient in enumerate(sorted(set(patient_ids)))}


def patient_key(case) -> str:
    return str(case.patient_id or case.case_id)


def shard_cases(cases: Sequence, shard: tuple[int, int] | None) -> list:
    """The cases of `shard` (I, N), in their dataset order; all cases for None."""
    if shard is None:
        return list(cases)
    index, count = shard
    assignment = shard_of_patients([patient_key(case) for case in cases], count)
    return [case for case in cases if assignment[patient_key(case)] == index]


def shard_stem(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}"


# -- one case, in this process or a worker --------------------------------------------------------------


@dataclass(frozen=True)
class CaseJob:
    """What classifying one dataset case needs; plain values, so it crosses to a worker process."""

    index: int  # position among the dataset's cases: rows are put back in this order
    case_id: str
    ct_path: str
    labels_path: str
    folder: str
    policy: object
    per_label_value: bool
    missing: str = ""  # why a file cannot be read (the case is skipped), "" when all are there


@dataclass(frozen=True)
class JobOptions:
    with_gradcam: bool = True
    with_report: bool = True
    gradcam_target: str = "predicted"


@dataclass
class CaseOutcome:
    index: int
    case_id: str
    rows: list[dict] | None = None
    failure: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def classify_job(job: CaseJob, model, options: JobOptions, timer=None, note: Callable[[str], None] | None = None) -> CaseOutcome:
    """Classify one case into its folder; a user's error (InputError) becomes the outcome's failure."""
    from .classify import classify_case_files
    from .pipeline import StageTimer

    outcome = CaseOutcome(job.index, job.case_id)
    timer = timer if timer is not None else StageTimer()
    before = dict(timer.seconds)
    try:
        if job.missing:
            raise InputError(job.missing[0].upper() + job.missing[1:] + ".")
        outcome.rows, _ = classify_case_files(
            job.ct_path, job.labels_path, Path(job.folder), model, case_id=job.case_id, with_gradcam=options.with_gradcam,
            with_report=options.with_report, timer=timer, policy=job.policy, per_label_value=job.per_label_value,
            whole_folder=True, note=note or outcome.notes.append, gradcam_target=options.gradcam_target,
        )
    except InputError as error:
        outcome.failure = f"{job.case_id}: {error}"
    outcome.seconds = {stage: value - before.get(stage, 0.0) for stage, value in timer.seconds.items()}
    return outcome


_worker_model = None


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def _worker_start(model_path: str, device: str, threads: int) -> None:
    """Each worker: its share of the CPU threads, and the model loaded once."""
    global _worker_model
    import SimpleITK as sitk
    import torch

    from .model import load_model

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    _worker_model = load_model(model_path, device)


def _worker_classify(job: CaseJob, options: JobOptions) -> CaseOutcome:
    return classify_job(job, _worker_model, options)


def run_jobs(jobs: Sequence[CaseJob], model, options: JobOptions, workers: int, timer, progress) -> list[CaseOutcome]:
    """Every job's outcome in job order; `workers` > 1 runs them in that many spawned processes."""
    outcomes: list[CaseOutcome] = []
    if workers <= 1 or len(jobs) <= 1:
        for done, job in enumerate(jobs):
            progress.update(done)
            outcomes.append(classify_job(job, model, options, timer=timer, note=progress.note))
        progress.update(len(jobs))
        return outcomes
    if model.path is None:
        raise InputError("--workers needs a model loaded from a file (each worker loads it); save the model first.")
    workers = min(workers, len(jobs))
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch / OpenGL state
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                             initargs=(str(model.path), str(model.device), threads_per_worker(workers))) as pool:
        pending = {pool.submit(_worker_classify, job, options) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    outcome = future.result()  # a worker's crash (not a user's error) ends the run here
                    for text in outcome.notes:
                        progress.note(text)
                    for stage, seconds in outcome.seconds.items():  # summed over workers
                        timer.seconds[stage] = timer.seconds.get(stage, 0.0) + seconds
                    outcomes.append(outcome)
                    progress.update(len(outcomes))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return sorted(outcomes, key=lambda outcome: outcome.index)


# -- summary and merge ---------------------------------------------------------------------------------


def cohort_summary(rows: Sequence[dict], cases: int, failures: Sequence[str]) -> dict:
    """What `summary.json` holds: counts, skipped cases with the reason, and the AUC against the
    dataset's labels (non-excluded labelled nodes, when both classes are present)."""
    # rows as classified (ints) or read back from a shard's CSV (strings): compare as text
    labelled = [row for row in rows if str(row.get("given_label", "")) != "" and str(row.get("excluded", "")) in ("", "0")]
    summary = {
        "cases": cases, "cases_classified": cases - len(failures), "nodes": len(rows),
        "predicted_metastatic": sum(int(row["prediction"]) for row in rows), "skipped": list(failures),
        "auc_against_labels": None, "labelled_nodes": len(labelled),
    }
    if labelled and len({int(row["given_label"]) for row in labelled}) == 2:
        from sklearn.metrics import roc_auc_score

        summary["auc_against_labels"] = float(roc_auc_score([int(row["given_label"]) for row in labelled],
                                                            [float(row["probability"]) for row in labelled]))
    return summary


def print_summary(summary: dict) -> None:
    if summary["auc_against_labels"] is not None:
        print(f"AUC against the dataset's labels: {summary['auc_against_labels']:.3f} ({summary['labelled_nodes']} nodes)")


def write_shard(out_dir: Path, shard: tuple[int, int], rows: Sequence[dict], columns: Sequence[str], record: dict) -> None:
    folder = out_dir / SHARDS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{shard_stem(shard)}.csv", csv_text(rows, columns, ignore_extra=True))
    atomic_write_json(folder / f"{shard_stem(shard)}.json", record)  # written last: marks the shard complete


def merge_results(out_dir: str | os.PathLike) -> dict:
    """Join every shard of `out_dir` into `nodes.csv` and `summary.json`; returns the summary."""
    import csv

    from .classify import COHORT_COLUMNS

    out_dir = Path(out_dir)
    folder = out_dir / SHARDS_FOLDER
    found = {}
    for path in sorted(folder.glob("shard-*-of-*.json")) if folder.is_dir() else []:
        match = _SHARD_NAME.match(path.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    if not found:
        raise InputError(f"{folder} holds no shard results; run 'classify --dataset D --out {out_dir} --shard I/N' for every I first.")
    counts = {count for _, count in found}
    if len(counts) != 1:
        raise InputError(f"{folder} holds shards of different splits ({', '.join(f'of {n}' for n in sorted(counts))}); "
                         "remove the old ones and merge the shards of one run.")
    count = counts.pop()
    missing = [index for index in range(1, count + 1) if (index, count) not in found]
    if missing:
        raise InputError(f"Shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {count} "
                         f"{'have' if len(missing) > 1 else 'has'} no results in {folder} yet; run them (or wait for them) and merge again.")
    records = [json.loads(found[(index, count)].read_text(encoding="utf-8")) for index in range(1, count + 1)]
    runs = {json.dumps(record["run"], sort_keys=True) for record in records}
    if len(runs) != 1:
        raise InputError(f"The {count} shards in {folder} come from different runs (dataset, model or options differ); rerun them alike.")
    ordered: list[tuple[int, int, dict]] = []
    for index, record in enumerate(records, start=1):
        with open(folder / f"shard-{index}-of-{count}.csv", newline="", encoding="utf-8") as handle:
            shard_rows = list(csv.DictReader(handle))
        position = {case_id: k for k, case_id in record["cases_in_dataset_order"]}
        ordered += [(position[row["case_id"]], k, row) for k, row in enumerate(shard_rows)]
    rows = [row for _, _, row in sorted(ordered, key=lambda item: item[:2])]
    failures = [failure for record in records for failure in record["skipped"]]
    summary = cohort_summary(rows, sum(len(record["cases_in_dataset_order"]) for record in records), failures)
    summary["shards"] = count
    atomic_write_text(out_dir / "nodes.csv", csv_text(rows, COHORT_COLUMNS))
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    remove_stale_staging(out_dir, depth=2)  # every shard has finished: what is left is a kill's
    return summary


def merge_main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib merge-results",
                                   description="Join the outputs of 'classify --dataset --shard I/N' runs into one nodes.csv and summary.json.")
    parser.add_argument("--out", required=True, help="the --out folder the shards were classified into")
    args = parser.parse_args(argv)
    summary = merge_results(args.out)
    print(f"merged {summary['shards']} shards: {summary['cases_classified']} of {summary['cases']} cases, {summary['nodes']} nodes "
          f"-> {args.out}/nodes.csv, {SUMMARY_FILE}")
    for failure in summary["skipped"]:
        print(f"skipped {failure}", file=sys.stderr)
    print_summary(summary)
    return 0
