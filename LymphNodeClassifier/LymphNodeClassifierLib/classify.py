"""`classify`: the headless job, one case (`--ct/--labels`) or a whole cohort (`--dataset`).

Per case it writes `nodes.csv`, `nodes.seg.nrrd` (opens colour-coded in Slicer), `gradcam.nrrd` (on
the CT's voxel grid) and `report.png`. Outputs are first written into a hidden staging folder and
moved into place only when the case succeeded, so a failure never leaves a half-written result.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from .dataset import Dataset
from .errors import InputError
from .fileio import atomic_write_text, csv_text
from .model import LoadedModel, load_model
from .pipeline import ClassificationResult, StageTimer, classify_images, window_from_card
from .segfile import write_segmentation_file

MODULE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_PATH = MODULE_DIR / "Resources" / "Models" / "lymph_node_phantom.pt"
SAMPLE_DATASET = MODULE_DIR / "Resources" / "SampleData"

NODE_COLUMNS = [
    "case_id", "node_id", "label_value", "centroid_R_mm", "centroid_A_mm", "centroid_S_mm",
    "volume_mm3", "short_axis_mm", "long_axis_mm", "touches_edge", "probability", "prediction",
]
TILE_FIELD_OF_VIEW_MM = 60.0  # a node plus its surroundings, as a radiologist would zoom
TIMING_STAGES = ("read", "nodes", "patches", "model", "gradcam", "write", "report", "total")


def read_image(path: str | os.PathLike, what: str) -> sitk.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"The {what} file {path} does not exist; check the path.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"The {what} file {path} cannot be read as an image ({str(error).strip().splitlines()[-1][:120]}); use NRRD, NIfTI or MHA.") from error


def node_rows(case_id: str, result: ClassificationResult) -> list[dict]:
    rows = []
    for node, probability, prediction in zip(result.nodes, result.probabilities, result.predictions):
        rows.append(
            {
                "case_id": case_id, "node_id": node.node_id, "label_value": node.label_value,
                "centroid_R_mm": round(node.centroid_ras[0], 3), "centroid_A_mm": round(node.centroid_ras[1], 3),
                "centroid_S_mm": round(node.centroid_ras[2], 3), "volume_mm3": round(node.volume_mm3, 2),
                "short_axis_mm": round(node.short_axis_mm, 2), "long_axis_mm": round(node.long_axis_mm, 2),
                "touches_edge": int(node.touches_edge), "probability": round(float(probability), 6),
                "prediction": int(prediction),
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
) -> list[dict]:
    """Write one case's outputs into `out_dir` all-or-nothing; returns its node rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        rows = node_rows(case_id, result)
        with timer.stage("write"):
            (staging / "nodes.csv").write_text(csv_text(rows, NODE_COLUMNS, ignore_extra=True), encoding="utf-8")
            write_segmentation_file(staging / "nodes.seg.nrrd", result.component_image, result.nodes, result.probabilities)
            if result.cam_volume is not None:
                sitk.WriteImage(result.cam_volume, str(staging / "gradcam.nrrd"), True)
        if with_report:
            with timer.stage("report"):
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
                    notes=result.messages,
                )
        for produced in staging.iterdir():
            os.replace(produced, out_dir / produced.name)
        return rows
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def classify_case_files(
    ct_path, labels_path, out_dir, model: LoadedModel, case_id: str = "case", with_gradcam: bool = True,
    with_report: bool = True, timer: StageTimer | None = None,
) -> tuple[list[dict], ClassificationResult]:
    timer = timer or StageTimer()
    with timer.stage("read"):
        ct = read_image(ct_path, "CT")
        labels = read_image(labels_path, "label")
    result = classify_images(ct, labels, model, with_gradcam=with_gradcam, timer=timer)
    for message in result.messages:
        print(f"note: {case_id}: {message}", file=sys.stderr)
    return write_case_outputs(Path(out_dir), case_id, ct, result, model, timer, with_report), result


def progress_bar(done: int, total: int, label: str, started: float) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    elapsed = time.perf_counter() - started
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label} {elapsed:5.0f} s", end="", file=sys.stderr, flush=True)


def classify_dataset(dataset: Dataset, out_dir: Path, model: LoadedModel, with_gradcam: bool, with_report: bool, timer: StageTimer) -> list[dict]:
    """Classify every non-excluded case; each case gets its own folder, plus one combined nodes.csv."""
    cases = [case for case in dataset.cases if not case.excluded]
    if not cases:
        raise InputError(f"The dataset {dataset.folder} has no case that is not excluded; include at least one case.")
    records = {record.key: record for record in dataset.nodes}
    all_rows: list[dict] = []
    started = time.perf_counter()
    failures = []
    for index, case in enumerate(cases):
        progress_bar(index, len(cases), "cases", started)
        try:
            rows, _ = classify_case_files(
                dataset.ct_path(case), dataset.labels_path(case), out_dir / case.case_id, model,
                case_id=case.case_id, with_gradcam=with_gradcam, with_report=with_report, timer=timer,
            )
        except InputError as error:
            failures.append(f"{case.case_id}: {error}")
            continue
        for row in rows:
            record = records.get((case.case_id, row["label_value"]))
            row["patient_id"] = case.patient_id
            row["given_label"] = "" if record is None or record.metastatic is None else record.metastatic
            row["excluded"] = "" if record is None else int(record.excluded)
        all_rows.extend(rows)
    progress_bar(len(cases), len(cases), "cases", started)
    print(file=sys.stderr)
    atomic_write_text(out_dir / "nodes.csv", csv_text(all_rows, ["patient_id", *NODE_COLUMNS, "given_label", "excluded"], ignore_extra=True))
    for failure in failures:
        print(f"skipped {failure}", file=sys.stderr)
    labelled = [row for row in all_rows if row["given_label"] != "" and not row["excluded"]]
    if labelled and len({row["given_label"] for row in labelled}) == 2:
        from sklearn.metrics import roc_auc_score

        auc = roc_auc_score([row["given_label"] for row in labelled], [row["probability"] for row in labelled])
        print(f"AUC against the dataset's labels: {auc:.3f} ({len(labelled)} nodes)")
    return all_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classify", description="Classify lymph nodes on CT (headless).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ct", help="CT volume file (NRRD, NIfTI, MHA)")
    source.add_argument("--dataset", help="dataset folder (dataset.json) to classify every case of")
    parser.add_argument("--labels", help="label volume masking the nodes (with --ct)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", help=f"TorchScript model with a model card (default: {DEFAULT_MODEL_PATH.name})")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM (faster)")
    parser.add_argument("--no-report", action="store_true", help="skip report.png")
    parser.add_argument("--timings", action="store_true", help="print per-stage seconds as a JSON line last")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.ct and not args.labels:
        raise InputError("--ct needs --labels (the label volume masking the nodes).")
    timer = StageTimer()
    started = time.perf_counter()
    with timer.stage("model"):
        model = load_model(args.model or DEFAULT_MODEL_PATH, args.device)
    out_dir = Path(args.out)
    if args.dataset:
        rows = classify_dataset(Dataset.load(args.dataset), out_dir, model, not args.no_gradcam, not args.no_report, timer)
    else:
        case_id = Path(args.ct).name.split(".")[0]
        rows, _ = classify_case_files(args.ct, args.labels, out_dir, model, case_id, not args.no_gradcam, not args.no_report, timer)
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

    parser = argparse.ArgumentParser(prog="demo", description="Classify the bundled sample case.")
    parser.add_argument("--out", default="demo-output")
    args = parser.parse_args(argv)
    timer = StageTimer()
    started = time.perf_counter()
    dataset = Dataset.load(SAMPLE_DATASET)
    case = dataset.cases[0]
    out_dir = Path(args.out)
    with timer.stage("model"):
        model = load_model(DEFAULT_MODEL_PATH, "auto")
    rows, result = classify_case_files(dataset.ct_path(case), dataset.labels_path(case), out_dir, model, case.case_id, timer=timer)
    # What the model sees for each node: the patches with their mask contours.
    patch_montage(result.patches, out_dir / "patches.png", probabilities=result.probabilities)
    print_case_summary(rows, out_dir)
    print(f"wrote {out_dir}/patches.png")
    timer.seconds["total"] = time.perf_counter() - started
    print_timings(timer)
    return 0
