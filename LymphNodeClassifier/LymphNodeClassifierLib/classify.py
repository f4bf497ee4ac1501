"""`classify`: the headless job, one case (`--ct/--labels`) or a whole cohort (`--dataset`).

Per case it writes `nodes.csv`, `nodes.seg.nrrd` (opens colour-coded in Slicer), `gradcam.nrrd` (on
the CT's voxel grid) and `report.png`. Outputs are first written into a hidden staging folder and
moved into place only when the case succeeded, so a failure never leaves a half-written result.

- The output folder is checked (a folder, writable) before any work.
- A rerun replaces the previous run's outputs as a whole: a case folder of `--dataset` is swapped
  for the new one (`fileio.replace_folder`; a symbolic link there is replaced, never followed),
  and `--ct` removes the output files of an earlier run that this run does not write (e.g.
  `report.png` after `--no-report`). A staging folder left by a killed run is removed by the next.
- Case folders are named by the case id, which the dataset format keeps safe (`fileio.name_problem`);
  a folder holding anything but a previous run's outputs is never replaced.
- Nodes of a dataset case follow its `node_definition` (one node per label value, or per component),
  as in `evaluate` and `train`; `--ct/--labels` splits connected components.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import SimpleITK as sitk

from .cli import ProgressLine
from .cohort import SUMMARY_FILE, CaseJob, JobOptions, cohort_summary, parse_shard, print_summary, run_jobs, shard_cases, write_shard
from .dataset import Dataset
from .errors import InputError, OneLineArgumentParser
from .fileio import (atomic_write_json, atomic_write_text, check_writable_folder, csv_text, path_inside, remove_stale_staging, replace_folder,
                     staging_folder)
from .gradcam import CAM_TARGETS, CLASS_NAMES
from .model import LoadedModel, load_model
from .model_registry import bundled_models, choose_model
from .pipeline import ClassificationResult, StageTimer, classify_images, window_from_card
from .segfile import write_segmentation_file
from .validate import InputPolicy, add_input_options, read_ct_and_labels

MODULE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_PATH = MODULE_DIR / "Resources" / "Models" / "lymph_node_phantom.pt"
SAMPLE_DATASET = MODULE_DIR / "Resources" / "SampleData"

NODE_COLUMNS = [
    "case_id", "node_id", "label_value", "centroid_R_mm", "centroid_A_mm", "centroid_S_mm",
    "volume_mm3", "short_axis_mm", "long_axis_mm", "touches_edge", "probability", "prediction", "warnings", "notes",
    "gradcam_class",  # the class the node's Grad-CAM explains ("" without Grad-CAM)
]
COHORT_COLUMNS = ["patient_id", *NODE_COLUMNS, "given_label", "excluded"]  # the --dataset run's nodes.csv
OUTPUT_FILES = ("nodes.csv", "nodes.seg.nrrd", "gradcam.nrrd", "report.png", "patches.png")  # every file a run may write
TILE_FIELD_OF_VIEW_MM = 60.0  # a node plus its surroundings, as a radiologist would zoom
TIMING_STAGES = ("read", "nodes", "patches", "model", "gradcam", "write", "report", "total")
GRADCAM_COMPRESSION_LEVEL = 1  # zlib's fastest: still a gzip NRRD any reader opens




def node_rows(case_id: str, result: ClassificationResult) -> list[dict]:
    rows = []
    notes = " | ".join(result.messages)  # case-level (geometry policy, field of view), the same on each row
    warnings = result.warnings or [[] for _ in result.nodes]
    for node, probability, prediction, node_warnings in zip(result.nodes, result.probabilities, result.predictions, warnings):
        rows.append(
            {
                "case_id": case_id, "node_id": node.node_id, "label_value": node.label_value,
                "centroid_R_mm": round(node.centroid_ras[0], 3), "centroid_A_mm": round(node.centroid_ras[1], 3),
                "centroid_S_mm": round(node.centroid_ras[2], 3), "volume_mm3": round(node.volume_mm3, 2),
                "short_axis_mm": round(node.short_axis_mm, 2), "long_axis_mm": round(node.long_axis_mm, 2),
                "touches_edge": int(node.touches_edge), "probability": round(float(probability), 6),
                "prediction": int(prediction), "warnings": " | ".join(node_warnings), "notes": notes,
                "gradcam_class": "" if result.cam_classes is None else CLASS_NAMES[int(result.cam_classes[len(rows)])],
            }
        )
    return rows


def render_tiles(ct: sitk.Image, result: ClassificationResult, window: tuple[float, float]):
    """Node tiles from real Slicer slice views when slicer-core + trame-slicer are installed, else None.

    Imported by name so the Lib itself never depends on Slicer: the patch fallback is used without it.
    """
    try:
        slice_views = importlib.import_module("LymphNodeClassifierLogic.slice_views")
        return slice_views.render_node_tiles(
            ct, result.component_image, result.nodes, result.probabilities, result.cam_volume, window=window,
            field_of_view_mm=TILE_FIELD_OF_VIEW_MM,
        )
    except ImportError:
        return None
    except Exception as error:  # SliceViewsUnavailable (no OpenGL, ...): fall back to patches, say why
        if type(error).__name__ != "SliceViewsUnavailable":
            raise
        print(f"note: Slicer slice views unavailable ({error}); report drawn from the patches.", file=sys.stderr)
        return None


def write_case_outputs(
    out_dir: Path,
    case_id: str,
    ct: sitk.Image,
    result: ClassificationResult,
    model: LoadedModel,
    timer: StageTimer,
    with_report: bool = True,
    whole_folder: bool = False,
) -> list[dict]:
    """Write one case's outputs into `out_dir` all-or-nothing, replacing an earlier run's outputs
    there; returns its node rows. With `whole_folder` `out_dir` is the case's own folder and is
    replaced as a whole (`fileio.replace_folder`), else only the `OUTPUT_FILES` in it change."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not whole_folder:
        out_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(out_dir.parent if whole_folder else out_dir)
    try:
        rows = node_rows(case_id, result)
        with timer.stage("write"):
            atomic_write_text(staging / "nodes.csv", csv_text(rows, NODE_COLUMNS, ignore_extra=True))
            write_segmentation_file(staging / "nodes.seg.nrrd", result.component_crop, result.nodes, result.probabilities, grid=result.grid)
            if result.cam_volume is not None:  # zlib level 1: ~half the time of the default level, ~15 % larger
                sitk.WriteImage(result.cam_volume, str(staging / "gradcam.nrrd"), True, GRADCAM_COMPRESSION_LEVEL)
        if with_report:
            with timer.stage("report"):
                from .model_registry import intended_use_text
                from .report import write_report

                window = window_from_card(model.card)
                write_report(
                    staging / "report.png",
                    result.nodes,
                    result.probabilities,
                    result.predictions,
                    tiles=render_tiles(ct, result, window),
                    patches=result.patches,
                    cams=result.cams,
                    threshold=result.decision_threshold,
                    title=f"{case_id}: {len(result.nodes)} node{'' if len(result.nodes) == 1 else 's'}, model {model.card.get('name', '')}",
                    window=window,
                    field_of_view_mm=TILE_FIELD_OF_VIEW_MM,
                    notes=[intended_use_text(model.card)] + result.messages + [f"node {node.node_id}: {warning}" for node, warnings in zip(result.nodes, result.warnings) for warning in warnings],
                    cam_classes=result.cam_classes,
                )
        if whole_folder:
            replace_folder(staging, out_dir)
        else:
            produced = {path.name for path in staging.iterdir()}
            for name in produced:
                os.replace(staging / name, out_dir / name)
            for name in set(OUTPUT_FILES) - produced:  # an earlier run's outputs that this run did not make
                (out_dir / name).unlink(missing_ok=True)
        return rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def classify_case_files(
    ct_path, labels_path, out_dir, model: LoadedModel | Callable[[], LoadedModel], case_id: str = "case", with_gradcam: bool = True,
    with_report: bool = True, timer: StageTimer | None = None, policy: InputPolicy = InputPolicy(), series_uid: str | None = None,
    *, per_label_value: bool = False, whole_folder: bool = False, note=None, gradcam_target: str = "predicted",
) -> tuple[list[dict], ClassificationResult]:
    """Read, classify and write one case; `note(text)` prints the pipeline's notes (default: stderr).

    `model` may be a function that loads it: it then runs while the images are read (in a background
    thread, `validate.read_ct_and_labels`), and a fresh process pays about the longer of the two, not
    both; the `model` stage is the load, the `read` stage only the wait for the images beyond it."""
    timer = timer or StageTimer()
    load = None if isinstance(model, LoadedModel) else model
    load_seconds = 0.0

    def timed_load() -> LoadedModel:
        nonlocal load_seconds
        start = time.perf_counter()
        try:
            return load()
        finally:
            load_seconds = time.perf_counter() - start
            timer.add("model", load_seconds)

    started = time.perf_counter()
    try:
        ct, labels, loaded = read_ct_and_labels(ct_path, labels_path, series_uid, meanwhile=timed_load if load is not None else None)
    finally:
        timer.add("read", time.perf_counter() - started - load_seconds)
    model = loaded if load is not None else model
    try:
        result = classify_images(ct, labels, model, with_gradcam=with_gradcam, per_label_value=per_label_value, timer=timer, policy=policy,
                                 gradcam_target=gradcam_target)
    except InputError as error:  # the checks see images only: name the files
        raise InputError(f"{str(error).rstrip('.')} (CT {ct_path}, labels {labels_path}).") from None
    for message in result.messages:
        (note or (lambda text: print(text, file=sys.stderr)))(f"note: {case_id}: {message}")
    for node, warnings in zip(result.nodes, result.warnings):
        for warning in warnings:
            (note or (lambda text: print(text, file=sys.stderr)))(f"warning: {case_id}: node {node.node_id} (label {node.label_value}): {warning}")
    return write_case_outputs(Path(out_dir), case_id, ct, result, model, timer, with_report, whole_folder), result


def _only_outputs(folder: Path) -> bool:
    """Whether `folder` holds nothing but a classify run's outputs (and staging leftovers)."""
    try:
        return all(entry.name in OUTPUT_FILES or entry.name.startswith(".") for entry in folder.iterdir())
    except OSError:
        return False


def _case_folder(out_dir: Path, case_id: str) -> Path:
    """The case's output folder, refused when the name is unsafe or the place holds other files."""
    folder = path_inside(out_dir, case_id)
    if folder.is_dir() and not folder.is_symlink() and not _only_outputs(folder):
        raise InputError(f"{folder} holds files that a classify run did not write, and would be replaced by case '{case_id}'s outputs; "
                         "choose an empty --out folder.")
    return folder


def classify_dataset(dataset: Dataset, out_dir: Path, model: LoadedModel, with_gradcam: bool, with_report: bool, timer: StageTimer,
                     policy: InputPolicy = InputPolicy(), gradcam_target: str = "predicted", *, workers: int = 1,
                     shard: tuple[int, int] | None = None) -> list[dict]:
    """Classify every non-excluded case; each case gets its own folder, plus one combined nodes.csv
    and summary.json (with `shard`, only that shard's cases, and `shards/shard-I-of-N.*` instead:
    see cohort.py; `workers` > 1 classifies in that many processes, same outputs).

    A case that fails is skipped (listed at the end) and its folder from an earlier run removed, as
    is an excluded case's; when every case fails nothing is written and the run is an error."""
    if not [case for case in dataset.cases if not case.excluded]:
        raise InputError(f"The dataset {dataset.folder} has no case that is not excluded; include at least one case.")
    mine = shard_cases(dataset.cases, shard)  # the shard's cases, excluded ones too (their old folders are its to remove)
    cases = [case for case in mine if not case.excluded]
    folders = {case.case_id: _case_folder(out_dir, case.case_id) for case in mine}  # refuse before any work
    missing = [dataset.missing_file(case) for case in cases]
    if cases and all(missing):
        raise InputError(f"None of the {len(cases)} cases can be read: {missing[0]}" + (f" (and {len(cases) - 1} more)" if len(cases) > 1 else "") + ".")
    records = {record.key: record for record in dataset.nodes}
    order = {case.case_id: index for index, case in enumerate(dataset.cases)}
    jobs = [CaseJob(order[case.case_id], case.case_id, str(dataset.ct_path(case)), str(dataset.labels_path(case)), str(folders[case.case_id]),
                    policy.for_case(case), case.per_label_value, missing_file or "") for case, missing_file in zip(cases, missing)]
    progress = ProgressLine("cases", len(cases))
    outcomes = run_jobs(jobs, model, JobOptions(with_gradcam, with_report, gradcam_target), workers, timer, progress)
    progress.done()
    patients = {case.case_id: case.patient_id for case in cases}
    all_rows: list[dict] = []
    failures = [outcome.failure for outcome in outcomes if outcome.failure]
    for outcome in outcomes:
        for row in outcome.rows or []:
            record = records.get((outcome.case_id, row["label_value"]))
            row["patient_id"] = patients[outcome.case_id]
            row["given_label"] = "" if record is None or record.metastatic is None else record.metastatic
            row["excluded"] = "" if record is None else int(record.excluded)
            all_rows.append(row)
    for failure in failures:
        print(f"skipped {failure}", file=sys.stderr)
    if cases and len(failures) == len(cases):
        raise InputError(f"All {len(cases)} cases were skipped (listed above); nothing was written. Fix the inputs and rerun.")
    classified = {outcome.case_id for outcome in outcomes if not outcome.failure}
    for case_id, folder in folders.items():  # an earlier run's results of cases without one now
        if case_id not in classified and folder.is_dir() and not folder.is_symlink() and _only_outputs(folder):
            shutil.rmtree(folder, ignore_errors=True)
    summary = cohort_summary(all_rows, len(cases), failures)
    if shard is not None:
        run = {"dataset": str(Path(dataset.folder).resolve()), "model": str(model.path), "gradcam": with_gradcam,
               "gradcam_class": gradcam_target, "report": with_report, "shards": shard[1]}
        write_shard(out_dir, shard, all_rows, COHORT_COLUMNS, {
            "run": run, "shard": shard[0], "cases_in_dataset_order": [[order[case.case_id], case.case_id] for case in cases],
            "skipped": failures, "summary": summary,
        })
        print(f"shard {shard[0]} of {shard[1]}: {len(cases)} cases; run 'merge-results --out {out_dir}' when every shard has finished")
    else:
        atomic_write_text(out_dir / "nodes.csv", csv_text(all_rows, COHORT_COLUMNS, ignore_extra=True))
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
    print_summary(summary)
    return all_rows


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib classify", description="Classify lymph nodes on CT (headless).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ct", help="CT volume file (NRRD, NIfTI, MHA) or DICOM series folder")
    source.add_argument("--dataset", help="dataset folder (dataset.json) to classify every case of")
    parser.add_argument("--labels", help="label volume masking the nodes (with --ct)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help="TorchScript model file with a model card, or a bundled model's name "
                        f"({', '.join(bundled_models())}); default: the active model, else {DEFAULT_MODEL_PATH.stem}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM (faster)")
    parser.add_argument("--gradcam-class", default="predicted", choices=CAM_TARGETS,
                        help="the class each node's Grad-CAM explains (default: the class predicted for it)")
    parser.add_argument("--no-report", action="store_true", help="skip report.png")
    parser.add_argument("--timings", action="store_true", help="print per-stage seconds as a JSON line last")
    parser.add_argument("--workers", type=int, default=1, help="with --dataset: classify in N processes on this machine (default 1)")
    parser.add_argument("--shard", help="with --dataset: classify only shard I of N (I/N, split by patient; see merge-results)")
    add_input_options(parser, series_uid=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ct and not args.labels:
        raise InputError("--ct needs --labels (the label volume masking the nodes).")
    if args.labels and not args.ct:
        raise InputError("--labels goes with --ct (one case); a --dataset names its label maps itself, so leave --labels out.")
    if (args.workers != 1 or args.shard) and not args.dataset:
        raise InputError("--workers and --shard split a cohort: use them with --dataset.")
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}.")
    shard = parse_shard(args.shard)
    timer = StageTimer()
    started = time.perf_counter()
    dataset = Dataset.load(args.dataset) if args.dataset else None
    model_path = choose_model(args.model)
    out_dir = check_writable_folder(args.out)  # before any work: a bad --out must not cost a run
    if shard is None:  # a shard's neighbours may be other machines' live runs: merge-results sweeps
        remove_stale_staging(out_dir, depth=2 if dataset is not None else 1)
    if dataset is not None:
        with timer.stage("model"):
            model = load_model(model_path, args.device)
        rows = classify_dataset(dataset, out_dir, model, not args.no_gradcam, not args.no_report, timer, InputPolicy.from_args(args),
                                gradcam_target=args.gradcam_class, workers=args.workers, shard=shard)
    else:
        case_id = Path(args.ct).name.split(".")[0]
        # the model loads while the CT and label map are read
        rows, _ = classify_case_files(args.ct, args.labels, out_dir, lambda: load_model(model_path, args.device), case_id,
                                      not args.no_gradcam, not args.no_report, timer,
                                      InputPolicy.from_args(args), args.series_uid, gradcam_target=args.gradcam_class)
        print_case_summary(rows, out_dir, args.no_gradcam, args.no_report)
    timer.seconds["total"] = time.perf_counter() - started
    if args.timings:
        print_timings(timer)
    return 0


def print_case_summary(rows: Sequence[dict], out_dir: Path, no_gradcam: bool = False, no_report: bool = False) -> None:
    for row in rows:
        print(f"node {row['node_id']} (label {row['label_value']}): short axis {row['short_axis_mm']:.1f} mm, "
              f"probability {row['probability']:.2f} -> {'metastatic' if row['prediction'] else 'benign'}")
    print(f"wrote {out_dir}/nodes.csv, nodes.seg.nrrd" + ("" if no_gradcam else ", gradcam.nrrd") + ("" if no_report else ", report.png"))


def print_timings(timer: StageTimer) -> None:
    """The last stdout line: per-stage wall-clock seconds measured inside the process."""
    print(json.dumps({stage: round(timer.seconds.get(stage, 0.0), 4) for stage in TIMING_STAGES}))


def demo_main(argv: Sequence[str] | None = None) -> int:
    """`demo`: classify the bundled sample case into demo-output/, with the node patch montage."""
    from .report import patch_montage

    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib demo", description="Classify the bundled sample case.")
    parser.add_argument("--out", default="demo-output")
    args = parser.parse_args(argv)
    timer = StageTimer()
    started = time.perf_counter()
    dataset = Dataset.load(SAMPLE_DATASET)
    case = dataset.cases[0]
    out_dir = check_writable_folder(args.out)
    remove_stale_staging(out_dir, depth=1)
    rows, result = classify_case_files(dataset.ct_path(case), dataset.labels_path(case), out_dir, lambda: load_model(DEFAULT_MODEL_PATH, "auto"),
                                       case.case_id, timer=timer)
    # What the model sees for each node: the patches with their mask contours.
    patch_montage(result.patches, out_dir / "patches.png", probabilities=result.probabilities)
    print_case_summary(rows, out_dir)
    print(f"wrote {out_dir}/patches.png")
    timer.seconds["total"] = time.perf_counter() - started
    print_timings(timer)
    return 0
